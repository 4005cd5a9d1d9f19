"""The run's writers: TensorBoard read back with TensorBoard's own reader, W&B offline, timings."""

import glob
import importlib.util
import json
import logging
import os
import signal
import struct
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aejax import models, objectives
from aejax.runtime import trainer, writers
from conftest import low_rank_images
from test_trainer import interrupt, metrics_lines, small_config

# TensorBoard's reader uses TensorFlow when it can import it, and its own stub when this marker
# module exists: the files must read back without TensorFlow.
sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

STEPS_PER_EPOCH = 1024 // 64


def read_events(workdir):
    """Scalars ``{tag: [(step, value)]}``, images ``{tag: [step]}`` and the hparams plugin's
    content, as TensorBoard reads the event files of ``workdir``."""
    everything = {event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0,
                  event_accumulator.TENSORS: 0}
    acc = event_accumulator.EventAccumulator(str(workdir), size_guidance=everything)
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]}
    images = {t: [e.step for e in acc.Images(t)] for t in tags["images"]}
    try:
        hparams = acc.PluginTagToContent("hparams")
    except KeyError:  # none written
        hparams = {}
    return scalars, images, hparams


def expected_scalars(lines):
    """What TensorBoard should hold for ``metrics.jsonl`` lines: each number of each line at its
    step, tagged ``split/name`` (float32, as TensorBoard stores it)."""
    want = {}
    for line in lines:
        for name, value in line.items():
            if name not in ("step", "split"):
                want.setdefault(f"{line['split']}/{name}", []).append(
                    (line["step"], float(np.float32(value))))
    return want


def assert_same_curves(got, want):
    assert sorted(got) == sorted(want)
    for t in want:
        assert [s for s, _ in got[t]] == [s for s, _ in want[t]], t  # no step repeated or missing
        np.testing.assert_array_equal([v for _, v in got[t]], [v for _, v in want[t]], err_msg=t)


def wandb_history(workdir):
    """``[(run id, {step: {key: value}})]`` from each offline W&B run file under ``workdir``, in
    the order the runs started (the file format: LevelDB's log with a W&B header)."""
    from wandb.proto import wandb_internal_pb2

    out = []
    for path in sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))):
        data = open(path, "rb").read()
        assert data[:4] == b":W&B"
        pos, pieces, history, run_id = 7, b"", {}, None
        while pos + 7 <= len(data):
            room = 32768 - pos % 32768
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if room < 7 or (kind, length) == (0, 0):  # a block's padding
                pos += room
                continue
            pieces = (b"" if kind in (1, 2) else pieces) + data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind not in (1, 4):  # FIRST, MIDDLE: the record goes on in the next block
                continue
            record = wandb_internal_pb2.Record.FromString(pieces)
            if record.WhichOneof("record_type") == "run":
                run_id = record.run.run_id
            elif record.WhichOneof("record_type") == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                       for i in record.history.item}
                history.setdefault(record.history.step.num, {}).update(row)
        out.append((run_id, history))
    return out


@pytest.fixture(scope="module")
def runs(small_splits, tmp_path_factory):
    """One run in one workdir: 1 epoch, then resumed for a 2nd, then run again once finished
    (with W&B offline when wandb is installed). Returns the workdir, the event files after
    each call, and the summaries."""
    work = tmp_path_factory.mktemp("writers")
    with_wandb = importlib.util.find_spec("wandb") is not None
    files, summaries = [], []
    with pytest.MonkeyPatch.context() as env:
        for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # not in ~
            env.setenv(name, str(tmp_path_factory.mktemp("wandb_home")))
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        env.setenv("WANDB_CONSOLE", "off")
        for epochs in (1, 2, 2):
            c = small_config(num_epochs=epochs, pca_baseline=False)
            c.wandb.enabled = with_wandb
            summaries.append(trainer.train_and_evaluate(c, str(work), splits=small_splits))
            files.append(sorted(glob.glob(str(work / writers.EVENT_FILES))))
    return work, files, summaries, with_wandb


def test_tensorboard_holds_every_line_of_metrics_jsonl_once(runs):
    work, files, _, _ = runs
    lines = metrics_lines(work)
    assert [l["epoch"] for l in lines if l["split"] == "validation"] == [1, 2]
    scalars, _, _ = read_events(work)
    assert_same_curves(scalars, expected_scalars(lines))
    # The resumed call added its own file; the finished run's second call wrote nothing.
    assert len(files[0]) == 1 and len(files[1]) == 2 and files[2] == files[1]


def test_images_each_epoch_and_the_config_as_hparams(runs):
    work, _, _, _ = runs
    _, images, hparams = read_events(work)
    assert images == {"images/reconstructions": [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]}
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(
        hparams["_hparams_/session_start_info"]).session_start_info.hparams
    assert start["optimizer.learning_rate"].number_value == pytest.approx(3e-3)
    assert start["model.hidden"].string_value == "[32]"
    assert start["tensorboard"].bool_value
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/experiment"])
    assert [m.name.tag for m in experiment.experiment.metric_infos] == ["validation/loss"]


def test_throughput_eta_and_epoch_times_are_logged(runs):
    work, _, summaries, _ = runs
    lines = metrics_lines(work)
    train = [l for l in lines if l["split"] == "train"]
    for l in train:
        assert l["steps_per_second"] > 0 and l["eta_seconds"] >= 0
        assert l["examples_per_second"] == pytest.approx(64 * l["steps_per_second"])
    # The ETA counts the steps left of the run (2 epochs from the second call on).
    assert train[-1]["eta_seconds"] == 0
    assert train[-2]["eta_seconds"] == pytest.approx((32 - train[-2]["step"]) / train[-2]["steps_per_second"])
    epochs = [l for l in lines if l["split"] == "epoch"]
    assert [(l["step"], l["epoch"]) for l in epochs] == [(16, 1), (32, 2)]
    # Each call's first epoch compiles: here each epoch is the first of its call.
    assert [l["includes_compile"] for l in epochs] == [True, True]
    for l in epochs:
        assert l["steps_per_second"] * l["seconds"] == pytest.approx(STEPS_PER_EPOCH)
        assert l["examples_per_second"] == pytest.approx(64 * l["steps_per_second"])
    assert sum(l["seconds"] for l in epochs) <= summaries[-1]["train_seconds"] + 0.01


def test_wandb_offline_run_continues_on_resume_with_every_step_once(runs):
    work, _, _, with_wandb = runs
    if not with_wandb:
        pytest.skip("wandb is not installed (optional: pip install wandb)")
    history = wandb_history(work)
    assert len(history) == 2 and history[0][0] == history[1][0]  # one W&B run, resumed
    steps = [sorted(h) for _, h in history]
    assert steps == [[5, 10, 15, 16], [20, 25, 30, 32]]
    logged = {t: [] for t in expected_scalars(metrics_lines(work))}
    for _, h in history:
        for step in sorted(h):
            for key, value in h[step].items():
                if key in logged:
                    logged[key].append((step, float(np.float32(value))))
    assert_same_curves(logged, expected_scalars(metrics_lines(work)))
    images = [step for _, h in history for step, row in h.items()
              if any(k.startswith("images/reconstructions") for k in row)]
    assert images == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]


def test_killed_run_resumes_the_same_curves(small_splits, tmp_path, caplog):
    """SIGKILL mid-epoch, then resume: TensorBoard holds each line of metrics.jsonl once."""
    work = tmp_path / "work"
    code, _ = interrupt(tmp_path, work, 4, signal.SIGKILL, after_step=20)
    assert code == -signal.SIGKILL
    assert glob.glob(str(work / writers.EVENT_FILES))
    c = small_config(num_epochs=4, checkpoint_every_steps=3)  # as interrupt() runs it
    with caplog.at_level(logging.INFO, logger="aejax"):
        trainer.train_and_evaluate(c, str(work), splits=small_splits)
    resumed = int(caplog.text.split("Resumed from step ")[1].split()[0])
    lines = metrics_lines(work)
    log_steps = sorted(set(range(5, 16 * 4, 5)) | {16 * (e + 1) for e in range(4)})
    assert [l["step"] for l in lines if l["split"] == "train"] == log_steps
    scalars, images, _ = read_events(work)
    assert_same_curves(scalars, expected_scalars(lines))
    assert images["images/reconstructions"] == [16 * (e + 1) for e in range(4)]
    # The epochs the killed process and the resumed one started compile.
    compiled = [l["epoch"] for l in lines if l["split"] == "epoch" and l["includes_compile"]]
    assert compiled == sorted({1, resumed // 16 + 1})


def test_a_resume_drops_the_events_after_its_checkpoint_and_a_cut_record(tmp_path):
    writer = writers.TensorBoardWriter(str(tmp_path), resume_step=None)
    for step in range(1, 11):
        writer.write_scalars(step, "train", {"loss": 1.0 / step})
    writer.close()
    (path,) = glob.glob(str(tmp_path / writers.EVENT_FILES))
    whole = open(path, "rb").read()
    with open(path, "ab") as f:  # a record cut short, as a kill can leave it
        f.write(whole[-30:-5])
    writers.TensorBoardWriter(str(tmp_path), resume_step=6).close()
    scalars, _, _ = read_events(tmp_path)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    writers.TensorBoardWriter(str(tmp_path), resume_step=None).close()  # a fresh start
    assert not glob.glob(str(tmp_path / writers.EVENT_FILES))


def test_image_grid_puts_rows_of_images_together():
    flat = np.linspace(0, 1, 3 * 64, dtype=np.float32).reshape(3, 64)
    grid = writers.image_grid([flat, 1 - flat])
    assert grid.shape == (2 * 8 + 1, 3 * 8 + 2) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid[:8, 9:17], np.round(flat[1].reshape(8, 8) * 255))
    assert writers.image_grid([np.zeros((2, 28, 28, 1))]).shape == (28, 2 * 28 + 1)
    assert writers.image_grid([np.zeros((2, 1000))]) is None  # codes, not images


def test_a_vaes_epoch_images_include_prior_samples():
    model = models.create("vae", input_shape=(64,), hidden=(16,), latent_size=2)
    x = jnp.asarray(low_rank_images(4))
    params = models.init(model, jax.random.PRNGKey(0), x)
    pictures = trainer.epoch_images(model, objectives.reconstruction("bce"), params, x,
                                    latent_size=2)
    assert sorted(pictures) == ["images/prior_samples", "images/reconstructions"]
    assert pictures["images/prior_samples"].shape == (2 * 8 + 1, 4 * 8 + 3)
    again = trainer.epoch_images(model, objectives.reconstruction("bce"), params, x,
                                 latent_size=2)
    np.testing.assert_array_equal(again["images/prior_samples"], pictures["images/prior_samples"])
