"""Tests of aejax.runtime.trainer: the step in the loop, checkpoints, resumption, errors of a run."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aejax import models, objectives, step
from aejax.data import batching, offline
from aejax.data import splits as data_splits
from aejax.runtime import checkpoints, placement, trainer
from aejax.runtime import config as run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**overrides):
    c = run_config.default_config()
    c.model.update(input_shape=(64,), hidden=(32,), code_size=4, activation="tanh")
    c.num_epochs = 3
    c.batch_size = 64
    c.eval_batch_size = 100  # 256 examples -> a padded last batch
    c.log_every_steps = 5
    c.checkpoint_every_steps = 7
    c.progress = False
    c.figures = False
    c.optimizer.learning_rate = 3e-3
    for k, v in overrides.items():
        target = c
        *path, last = k.split(".")
        for p in path:
            target = target[p]
        target[last] = v
    return c


def params_of(workdir):
    """Final parameters from the newest checkpoint of a run."""
    ckpts = checkpoints.Checkpoints(os.path.join(workdir, "checkpoints"), async_save=False)
    step = ckpts.steps()[-1]
    state, _ = ckpts.read(step)
    ckpts.close()
    return state["state"]["params"], step


def assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------- the step


def test_train_step_matches_manual_adam_update(small_splits):
    """One step equals value_and_grad + optax by hand, and folds the step into the key."""
    model = models.MLPAutoencoder(input_shape=(64,), hidden=(16,), code_size=4)
    x = jnp.asarray(small_splits.train[0][:32])
    params = models.init(model, jax.random.PRNGKey(0), x)
    objective = objectives.build("bce", {})
    per_example = step.make_per_example_fn(model, objective)
    tx = optax.adam(1e-2)
    state = step.TrainState.create(params, tx)
    train_step = jax.jit(step.make_train_step(per_example, tx))
    new_state, metrics = train_step(state, {"x": x}, jax.random.PRNGKey(1))

    def loss(p):
        logits, _ = model.apply({"params": p}, x)
        return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, x), axis=1))

    value, grads = jax.value_and_grad(loss)(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    expected = optax.apply_updates(params, updates)
    np.testing.assert_allclose(metrics["loss"], value, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert int(new_state.step) == 1 and int(new_state.bad_step) == -1
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-5)


def test_step_compiles_once_per_run(small_splits, tmp_path, monkeypatch):
    """The jitted step is traced once for a whole run: epochs, logging, checkpoints, validation."""
    traces = []
    original = step.make_train_step

    def counting(per_example, tx, **kwargs):
        inner = original(per_example, tx, **kwargs)

        def wrapped(state, batch, rng):
            traces.append(1)  # runs only while tracing
            return inner(state, batch, rng)

        return wrapped

    monkeypatch.setattr(trainer, "make_train_step", counting)
    summary = trainer.train_and_evaluate(small_config(), str(tmp_path), splits=small_splits)
    assert summary["steps"] == 3 * (1024 // 64)
    assert len(traces) == 1


def test_one_call_of_the_loops_step_equals_that_many_pure_steps(small_splits):
    """``fused_step`` runs k steps per call: the same as k calls of one step (bitwise) and as k
    pure steps on the batches of the epoch's order, picked by ``state.step % steps_per_epoch``
    (so a call may start mid-epoch, as after a resume); the metric sums add up per step."""
    model = models.MLPAutoencoder(input_shape=(64,), hidden=(16,), code_size=4)
    x_all = small_splits.train[0][:320]  # 5 batches of 64
    per_example = step.make_per_example_fn(model, objectives.build("bce", {}))
    tx = optax.adam(1e-2)
    params = models.init(model, jax.random.PRNGKey(0), jnp.asarray(x_all[:64]))
    names = step.metric_names(per_example, params, jnp.asarray(x_all[:64]))
    place = placement.Placement.create("none", 1)
    run = place.fused_step(step.make_train_step(per_example, tx), 64, 5)
    perm = place.permutation(jax.random.PRNGKey(3), len(x_all), 0)
    rng = jax.random.PRNGKey(1)
    fresh = lambda: jax.tree.map(jnp.array, (step.TrainState.create(params, tx),
                                             {k: jnp.zeros((), jnp.float32) for k in names}))
    x_dev = jnp.asarray(x_all)

    start = fresh()
    start = run(*start, x_dev, perm, 2, rng)  # steps 0 and 1: the call below starts at batch 2
    many = run(*jax.tree.map(jnp.array, start), x_dev, perm, 3, rng)
    one_by_one = jax.tree.map(jnp.array, start)
    for _ in range(3):
        one_by_one = run(*one_by_one, x_dev, perm, 1, rng)
    assert_trees_equal(many, one_by_one)

    state, acc = jax.tree.map(jnp.array, start)
    train_step = jax.jit(step.make_train_step(per_example, tx))
    order = np.asarray(perm)
    sums = jax.tree.map(jnp.zeros_like, acc)
    for b in (2, 3, 4):
        state, metrics = train_step(state, {"x": x_dev[order[b * 64:(b + 1) * 64]]}, rng)
        sums = jax.tree.map(jnp.add, sums, metrics)
    assert int(many[0].step) == 5
    for a, b in zip(jax.tree.leaves(many[0].params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for k in sums:  # many[1] also holds the sums of the first two steps
        np.testing.assert_allclose(many[1][k] - start[1][k], sums[k], rtol=1e-4, atol=1e-6)


def test_a_convolutional_step_runs_straight_on_a_cpu_and_ends_as_the_loop_does():
    """On a CPU a step with convolutions runs as a one-step program called per step: the same
    steps, parameters and metric sums as the loop's program (to float tolerance: XLA picks other
    convolution kernels there), and it stops after a non-finite step as the loop does."""
    # XLA's convolutions throughout (with so few channels "auto" would compute every layer as
    # shifted slices and products on a CPU, leaving the loop nothing to decide).
    model = models.ConvAutoencoder(features=(4, 2, 2), conv_lowering="xla")
    x_all = np.asarray(jax.random.uniform(jax.random.PRNGKey(0), (96, 28, 28, 1)))
    per_example = step.make_per_example_fn(model, objectives.build("bce", {}))
    tx = optax.adam(1e-2)
    params = models.init(model, jax.random.PRNGKey(0), jnp.asarray(x_all[:32]))
    names = step.metric_names(per_example, params, jnp.asarray(x_all[:32]))
    place = placement.Placement.create("none", 1)
    perm = place.permutation(jax.random.PRNGKey(3), len(x_all), 0)
    rng = jax.random.PRNGKey(1)
    fresh = lambda: jax.tree.map(jnp.array, (step.TrainState.create(params, tx),
                                             {k: jnp.zeros((), jnp.float32) for k in names}))
    mlp = models.MLPAutoencoder(input_shape=(28, 28, 1), hidden=(), code_size=4)
    with_nan = x_all.copy()
    with_nan[np.asarray(perm)[32:64]] = np.nan  # batch 1 of the order: both stop after it
    train_step = step.make_train_step(per_example, tx)
    looped, auto = (place.fused_step(train_step, 32, 3, loop=loop) for loop in (True, None))
    for data in (x_all, with_nan):
        a_state, a_acc = looped(*fresh(), jnp.asarray(data), perm, 3, rng)
        b_state, b_acc = auto(*fresh(), jnp.asarray(data), perm, 3, rng)
        assert auto.loops is False
        assert int(a_state.step) == int(b_state.step) and int(a_state.bad_step) == int(b_state.bad_step)
        for a, b in zip(jax.tree.leaves((a_state.params, a_acc)), jax.tree.leaves((b_state.params, b_acc))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(b_state.bad_step) == 1 and int(b_state.step) == 2
    # A step without convolutions keeps the loop.
    per_mlp = step.make_per_example_fn(mlp, objectives.build("bce", {}))
    p_mlp = models.init(mlp, jax.random.PRNGKey(0), jnp.asarray(x_all[:32]))
    run = place.fused_step(step.make_train_step(per_mlp, tx), 32, 3)
    acc = {k: jnp.zeros((), jnp.float32) for k in step.metric_names(per_mlp, p_mlp, jnp.asarray(x_all[:32]))}
    run(step.TrainState.create(p_mlp, tx), acc, jnp.asarray(x_all), perm, 2, rng)
    assert run.loops is True


def test_evaluate_masked_mean_counts_padding_right(small_splits):
    """Evaluating in padded batches equals the plain mean over every example."""
    model = models.MLPAutoencoder(input_shape=(64,), hidden=(16,), code_size=4)
    x = small_splits.test[0][:250]  # 250 = 2 full batches of 100 + 50 padded
    params = models.init(model, jax.random.PRNGKey(0), jnp.asarray(x[:10]))
    per_example = step.make_per_example_fn(model, objectives.build("bce", {}))
    xs, masks = batching.pad_batches(x, 100)
    assert xs.shape == (3, 100, 64) and masks.sum() == 250
    got = jax.jit(step.make_evaluate(per_example))(params, xs, masks, jax.random.PRNGKey(0), 0)
    total, metrics = per_example(params, {"x": jnp.asarray(x)}, jax.random.PRNGKey(0), 0)
    np.testing.assert_allclose(got["loss"], np.mean(total), rtol=1e-5)
    np.testing.assert_allclose(got["mse_per_pixel"], np.mean(metrics["mse_per_pixel"]), rtol=1e-5)


# --------------------------------------------------------------------------- the loop


def test_run_learns_and_writes_its_outputs(small_splits, tmp_path):
    c = small_config(num_epochs=4)
    c.figures = True
    summary = trainer.train_and_evaluate(c, str(tmp_path), splits=small_splits)
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    train_lines = [l for l in lines if l["split"] == "train"]
    val_lines = [l for l in lines if l["split"] == "validation"]
    assert len(val_lines) == 4 and [l["epoch"] for l in val_lines] == [1, 2, 3, 4]
    assert train_lines[-1]["loss"] < 0.9 * train_lines[0]["loss"]
    assert val_lines[-1]["loss"] < val_lines[0]["loss"]
    on_disk = json.load(open(tmp_path / "summary.json"))
    assert on_disk["test"] == summary["test"]
    assert set(summary["figures"]) == {"reconstructions.png", "learning_curves.png",
                                       "pca_vs_autoencoder.png"}
    for name in summary["figures"]:
        assert (tmp_path / name).stat().st_size > 1000
    # The test metric is the reconstruction error of the best-validation parameters.
    assert summary["best_epoch"] == 1 + int(np.argmin([l["loss"] for l in val_lines]))


def test_nonlinear_autoencoder_beats_pca_on_curved_data(small_splits, tmp_path):
    """The data lie on a curved 4-d manifold: a 4-unit code should beat 4 principal components."""
    c = small_config(num_epochs=30)
    c.model.update(hidden=(64,), code_size=4, activation="tanh")
    c.optimizer.update(learning_rate=3e-3, schedule="cosine")
    summary = trainer.train_and_evaluate(c, str(tmp_path), splits=small_splits)
    assert summary["pca"]["code_size"] == 4
    assert summary["test"]["mse_per_pixel"] < summary["pca"]["test"]["mse_per_pixel"]
    assert summary["autoencoder_beats_pca"]


def test_logged_param_norm_is_the_norm_of_the_parameters_at_that_step(small_splits, tmp_path):
    c = small_config(num_epochs=1, log_every_steps=4, checkpoint_every_steps=8)
    trainer.train_and_evaluate(c, str(tmp_path), splits=small_splits)
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    by_step = {l["step"]: l for l in lines if l["split"] == "train"}
    assert sorted(by_step) == [4, 8, 12, 16]
    ckpts = checkpoints.Checkpoints(str(tmp_path / "checkpoints"), async_save=False)
    try:
        for step in (8, 16):
            tree, _ = ckpts.read(step)
            expected = optax.tree.norm(tree["state"]["params"])
            np.testing.assert_allclose(by_step[step]["param_norm"], expected, rtol=1e-6)
    finally:
        ckpts.close()
    assert by_step[4]["param_norm"] != by_step[16]["param_norm"]


def test_early_stopping_stops_after_patience(small_splits, tmp_path):
    c = small_config(num_epochs=10, early_stopping_patience=2, early_stopping_min_delta=1e9)
    summary = trainer.train_and_evaluate(c, str(tmp_path), splits=small_splits)
    # Epoch 1 sets the best; nothing can beat it by 1e9, so two more epochs end the run.
    assert summary["epochs_run"] == 3 and summary["stopped_early"] and summary["best_epoch"] == 1


def test_bfloat16_run_learns_with_float32_parameters(small_splits, tmp_path):
    c = small_config(compute_dtype="bfloat16")
    summary = trainer.train_and_evaluate(c, str(tmp_path), splits=small_splits)
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl") if '"train"' in l]
    assert lines[-1]["loss"] < 0.9 * lines[0]["loss"] and np.isfinite(summary["test"]["loss"])
    params, _ = params_of(str(tmp_path))
    assert all(np.asarray(p).dtype == np.float32 for p in jax.tree.leaves(params))


def test_streaming_path_ends_with_the_device_resident_parameters(small_splits, tmp_path, caplog):
    """Batches streamed from host memory (prefetched to the device) in the device path's order.

    The same batches in the same order through the same step: the parameters agree bit for bit,
    and a streamed run resumed mid-epoch ends where the uninterrupted one does.
    """
    trainer.train_and_evaluate(small_config(), str(tmp_path / "device"), splits=small_splits)
    stream = small_config(keep_checkpoints=10, **{"data.on_device": False})
    trainer.train_and_evaluate(stream, str(tmp_path / "stream"), splits=small_splits)
    got, step = params_of(str(tmp_path / "stream"))
    want, _ = params_of(str(tmp_path / "device"))
    assert step == 3 * 16
    assert_trees_equal(got, want)

    shutil.copytree(tmp_path / "stream", tmp_path / "resumed")
    ckdir = tmp_path / "resumed" / "checkpoints"
    for name in os.listdir(ckdir):
        if name.isdigit() and int(name) > 21:  # as if killed after step 21, mid-epoch 2
            shutil.rmtree(ckdir / name)
    with caplog.at_level(logging.INFO, logger="aejax"):
        summary = trainer.train_and_evaluate(stream, str(tmp_path / "resumed"), splits=small_splits)
    assert "Resumed from step 21" in caplog.text and "Streaming the training set" in caplog.text
    assert summary["steps"] == 48
    assert_trees_equal(params_of(str(tmp_path / "resumed"))[0], want)


def test_counter_binarization_trains_differently_and_resumes_bitwise(small_splits, tmp_path):
    """``data.binarize_method="counter"``: other draws than threefry's, and a run resumed
    mid-epoch from a checkpoint ends with the uninterrupted run's parameters, bit for bit."""
    counter = small_config(keep_checkpoints=10, **{"data.binarize": True,
                                                   "data.binarize_method": "counter"})
    trainer.train_and_evaluate(counter, str(tmp_path / "counter"), splits=small_splits)
    trainer.train_and_evaluate(small_config(**{"data.binarize": True}), str(tmp_path / "threefry"),
                               splits=small_splits)
    want, _ = params_of(str(tmp_path / "counter"))
    other, _ = params_of(str(tmp_path / "threefry"))
    assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(want),
                                                          jax.tree.leaves(other))) > 1e-4
    shutil.copytree(tmp_path / "counter", tmp_path / "resumed")
    ckdir = tmp_path / "resumed" / "checkpoints"
    for name in os.listdir(ckdir):
        if name.isdigit() and int(name) > 21:
            shutil.rmtree(ckdir / name)
    trainer.train_and_evaluate(counter, str(tmp_path / "resumed"), splits=small_splits)
    assert_trees_equal(params_of(str(tmp_path / "resumed"))[0], want)


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_is_bitwise(tmp_path):
    params = models.init(models.MLPAutoencoder(input_shape=(8,), hidden=(5,), code_size=2),
                         jax.random.PRNGKey(3), jnp.ones((2, 8)))
    tx = optax.adam(1e-3)
    state = step.TrainState.create(params, tx)
    # Make the optimizer state non-trivial.
    grads = jax.tree.map(lambda p: jnp.sin(p * 7.0), params)
    _, opt_state = tx.update(grads, state.opt_state, params)
    state = state.replace(opt_state=opt_state, step=jnp.asarray(17, jnp.int32))
    ckpts = checkpoints.Checkpoints(str(tmp_path), async_save=False)
    ckpts.save(17, {"state": state}, {"epoch": 2})
    target = {"state": step.TrainState.create(params, tx)}
    saved_step, restored, meta = ckpts.restore_latest(target)
    ckpts.close()
    assert saved_step == 17 and meta == {"epoch": 2}
    assert type(restored["state"].opt_state[0]) is type(state.opt_state[0])  # optax NamedTuples back
    assert_trees_equal(restored["state"], state)


def test_checkpoint_of_an_earlier_layout_resumes(small_splits, tmp_path):
    """Checkpoints of earlier versions hold ``bad_metrics`` with other metric names (e.g.
    ``update_norm``): the run resumes from them; none is set aside as corrupt."""
    trainer.train_and_evaluate(small_config(num_epochs=1), str(tmp_path), splits=small_splits)
    ckdir = tmp_path / "checkpoints"
    ckpts = checkpoints.Checkpoints(str(ckdir), async_save=False)
    last = ckpts.steps()[-1]
    tree, meta = ckpts.read(last)
    assert "bad_metrics" not in tree["state"]  # not saved any more
    tree["state"]["bad_metrics"] = {"loss": np.float32(0), "update_norm": np.float32(0)}
    shutil.rmtree(ckdir / str(last))
    ckpts.close()
    ckpts = checkpoints.Checkpoints(str(ckdir), async_save=False)
    ckpts.save(last, tree, meta)
    ckpts.close()
    summary = trainer.train_and_evaluate(small_config(num_epochs=2), str(tmp_path), splits=small_splits)
    assert summary["steps"] == 2 * (1024 // 64)
    assert not [p for p in os.listdir(ckdir) if "corrupt" in p]


def test_checkpoint_of_another_model_is_a_clear_error_and_moves_nothing(small_splits, tmp_path):
    trainer.train_and_evaluate(small_config(num_epochs=1), str(tmp_path), splits=small_splits)
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    with pytest.raises(checkpoints.CheckpointMismatchError,
                       match=r"other shapes: .*encoder_0/kernel \(64, 32\) on disk, \(64, 16\) now"
                             r".*new workdir"):
        trainer.train_and_evaluate(small_config(num_epochs=2, **{"model.hidden": (16,)}),
                                 str(tmp_path), splits=small_splits)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def finished_and_partial_runs(small_splits, tmp_path):
    """A finished 3-epoch run (``ref``) and the first 2 epochs of the same run (``work``):
    ``(ref, ref's parameters, work, work's checkpoint directory)``."""
    ref = tmp_path / "ref"
    trainer.train_and_evaluate(small_config(), str(ref), splits=small_splits)
    ref_params, _ = params_of(str(ref))
    work = tmp_path / "work"
    trainer.train_and_evaluate(small_config(num_epochs=2), str(work), splits=small_splits)
    return ref, ref_params, work, work / "checkpoints"


def test_corrupt_latest_checkpoint_is_skipped_and_run_ends_the_same(small_splits, tmp_path):
    ref, ref_params, work, ckdir = finished_and_partial_runs(small_splits, tmp_path)
    latest = max(int(s) for s in os.listdir(ckdir) if s.isdigit())
    # Corrupt every data file of the newest checkpoint.
    for root, _, files in os.walk(ckdir / str(latest)):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"\x00garbage")
    with pytest.warns(RuntimeWarning, match=f"step {latest}"):
        trainer.train_and_evaluate(small_config(), str(work), splits=small_splits)
    assert any(name.startswith(f"{latest}.corrupt") for name in os.listdir(ckdir))
    got, _ = params_of(str(work))
    assert_trees_equal(got, ref_params)


def test_no_verified_checkpoint_stops_the_run_unless_asked_to_start_afresh(small_splits, tmp_path):
    ref, ref_params, work, ckdir = finished_and_partial_runs(small_splits, tmp_path)
    for step_dir in [ckdir / s for s in os.listdir(ckdir) if s.isdigit()]:
        for root, _, files in os.walk(step_dir):
            for f in files:
                with open(os.path.join(root, f), "wb") as fh:
                    fh.write(b"\x00garbage")
    old_log = (work / "metrics.jsonl").read_text()
    with pytest.warns(RuntimeWarning), pytest.raises(checkpoints.CheckpointError,
                                                     match="start_fresh_if_unreadable=True"):
        trainer.train_and_evaluate(small_config(), str(work), splits=small_splits)
    # Asked to, the run starts afresh: the same end as a run never interrupted; the old log is
    # kept beside the new one.
    trainer.train_and_evaluate(small_config(start_fresh_if_unreadable=True), str(work),
                               splits=small_splits)
    got, _ = params_of(str(work))
    assert_trees_equal(got, ref_params)
    [kept] = [n for n in os.listdir(work) if n.startswith("metrics.jsonl.corrupt-")]
    assert (work / kept).read_text() == old_log
    assert_same_metrics(metrics_lines(work), metrics_lines(ref))


RUN_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from conftest import low_rank_images
    from test_trainer import small_config
    import numpy as np
    from aejax.runtime import trainer
    from aejax.data import splits as data_splits
    x = low_rank_images(1536)
    y = np.zeros(len(x), np.int32)
    splits = data_splits.Splits((x[:1024], y[:1024]), (x[1024:1280], y[1024:1280]), (x[1280:], y[1280:]))
    if float(sys.argv[4]):
        from distributed_check import slow_down
        slow_down(float(sys.argv[4]))
    c = small_config(num_epochs=int(sys.argv[2]), checkpoint_every_steps=int(sys.argv[3]))
    trainer.train_and_evaluate(c, sys.argv[1], splits=splits)
""")


def metrics_lines(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def assert_same_metrics(got, want):
    """The same lines in the same order: every step once, every value to float tolerance
    (but the wall-clock timings)."""
    assert [(l["step"], l["split"]) for l in got] == [(l["step"], l["split"]) for l in want]
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for k in a:
            if k in trainer.TIMING_FIELDS:
                continue
            if isinstance(a[k], str):
                assert a[k] == b[k]
            else:
                np.testing.assert_allclose(a[k], b[k], rtol=1e-6, err_msg=f"step {a['step']} {k}")


def interrupt(tmp_path, work, epochs, sig, after_step, *, checkpoint_every_steps=3,
              step_delay=0.0):
    """Starts RUN_SCRIPT in ``work`` and sends ``sig`` once a checkpoint reaches ``after_step``.

    ``step_delay``: seconds every step sleeps first (the run's numbers are unchanged), so that a
    run with few checkpoints still runs long enough after ``after_step`` to be interrupted.
    """
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT.format(tests=os.path.dirname(__file__)))
    proc = subprocess.Popen([sys.executable, str(script), str(work), str(epochs),
                             str(checkpoint_every_steps), str(step_delay)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckdir = work / "checkpoints"
    deadline = time.time() + 300  # start-up and compiling, on a loaded machine
    sent = None
    while time.time() < deadline and proc.poll() is None:
        steps = [int(s) for s in os.listdir(ckdir) if s.isdigit()] if ckdir.exists() else []
        if steps and max(steps) >= after_step:
            proc.send_signal(sig)
            sent = max(steps)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=60)
    assert sent is not None, "the run ended before the signal could be sent"
    return proc.returncode, err


# A checkpoint every 8 steps, not aligned with the log lines (every 5): a resume must restore
# the train means of the steps since the last log line. The interrupted process sleeps 20 ms a
# step, so that about 4 s of its run are left after the step the signal waits for.
CHECKPOINT_EVERY, STEP_DELAY = 8, 0.02


@pytest.fixture(scope="module")
def uninterrupted(small_splits, tmp_path_factory):
    """The reference: 12 epochs with a checkpoint every 8 steps, never interrupted."""
    ref = tmp_path_factory.mktemp("uninterrupted")
    c = small_config(num_epochs=12, checkpoint_every_steps=CHECKPOINT_EVERY)
    summary = trainer.train_and_evaluate(c, str(ref), splits=small_splits)
    return c, summary, params_of(str(ref)), metrics_lines(ref)


def test_killed_run_resumes_to_the_same_parameters_and_logs(small_splits, tmp_path, uninterrupted):
    """SIGKILL mid-run, then resume: bitwise the parameters, and line for line the metrics, of
    an uninterrupted run (the log is flushed at every checkpoint; the train means of the steps
    since the last log line are in the checkpoint)."""
    c, ref_summary, (ref_params, ref_step), ref_lines = uninterrupted
    work = tmp_path / "work"
    code, _ = interrupt(tmp_path, work, 12, signal.SIGKILL, after_step=20,
                        checkpoint_every_steps=CHECKPOINT_EVERY, step_delay=STEP_DELAY)
    assert code == -signal.SIGKILL
    assert max(int(s) for s in os.listdir(work / "checkpoints") if s.isdigit()) < ref_step
    summary = trainer.train_and_evaluate(c, str(work), splits=small_splits)
    assert summary["steps"] == ref_step
    assert_trees_equal(params_of(str(work))[0], ref_params)
    assert_same_metrics(metrics_lines(work), ref_lines)
    assert summary["test"] == ref_summary["test"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signalled_run_saves_stops_and_resumes_bitwise(small_splits, tmp_path, uninterrupted, sig):
    """SIGTERM (a preemption) or SIGINT: the run stops at the next step boundary with a
    checkpoint of that step, and resumes to the uninterrupted run's parameters and log."""
    c, ref_summary, (ref_params, ref_step), ref_lines = uninterrupted
    work = tmp_path / "work"
    code, err = interrupt(tmp_path, work, 12, sig, after_step=20,
                          checkpoint_every_steps=CHECKPOINT_EVERY, step_delay=STEP_DELAY)
    assert code != 0 and f"Stopped by {signal.Signals(sig).name} at step" in err
    stopped_at = int(err.split(" at step ")[1].split(":")[0])
    assert stopped_at < ref_step
    assert stopped_at in [int(s) for s in os.listdir(work / "checkpoints") if s.isdigit()]
    assert all(l["step"] <= stopped_at for l in metrics_lines(work))
    summary = trainer.train_and_evaluate(c, str(work), splits=small_splits)
    assert summary["steps"] == ref_step
    assert_trees_equal(params_of(str(work))[0], ref_params)
    assert_same_metrics(metrics_lines(work), ref_lines)


def test_a_second_run_in_a_held_workdir_fails_at_once(small_splits, tmp_path):
    from aejax.runtime import lock

    with lock.WorkdirLock(str(tmp_path)):
        t = time.time()
        with pytest.raises(lock.WorkdirLockedError, match=rf"in use by process {os.getpid()} on"):
            trainer.train_and_evaluate(small_config(), str(tmp_path), splits=small_splits)
        assert time.time() - t < 5
    assert not (tmp_path / "checkpoints").exists()  # refused before anything was written


# --------------------------------------------------------------------------- errors


def test_nonfinite_loss_names_step_and_term_and_keeps_last_checkpoint(small_splits, tmp_path):
    c = small_config(num_epochs=50, checkpoint_every_steps=2)
    c.loss.reconstruction = "mse_linear"
    c.optimizer.update(name="sgd", learning_rate=50.0, momentum=0.0)
    with pytest.raises(step.NonFiniteLossError, match=r"step \d+.*reconstruction") as e:
        trainer.train_and_evaluate(c, str(tmp_path), splits=small_splits)
    assert "last good checkpoint" in str(e.value)
    params, saved_step = params_of(str(tmp_path))
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))
    bad_step = int(str(e.value).split("step ")[1].split(" ")[0])
    assert saved_step <= bad_step


def test_unwritable_workdir_is_a_clear_error(small_splits, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="Cannot write to workdir"):
        trainer.train_and_evaluate(small_config(), str(blocker / "run"), splits=small_splits)


@pytest.mark.parametrize("key,value,match", [
    ("model.name", "transformer", "Unknown model 'transformer'"),
    ("optimizer.name", "adagrad", "Unknown optimizer.name 'adagrad'"),
    ("optimizer.schedule", "cyclic", "Unknown optimizer.schedule"),
    ("loss.reconstruction", "l3", "Unknown reconstruction 'l3'"),
    ("corruption.kind", "blur", "Unknown corruption 'blur'"),
])
def test_unknown_names_are_clear_errors(small_splits, tmp_path, key, value, match):
    with pytest.raises(ValueError, match=match):
        trainer.train_and_evaluate(small_config(**{key: value}), str(tmp_path), splits=small_splits)


@pytest.mark.parametrize("key", ["log_every_steps", "checkpoint_every_steps"])
def test_nonpositive_intervals_are_clear_errors(small_splits, tmp_path, key):
    with pytest.raises(run_config.ConfigError, match="must be positive"):
        trainer.train_and_evaluate(small_config(**{key: 0}), str(tmp_path), splits=small_splits)


def test_unknown_config_key_suggests_the_right_one(small_splits, tmp_path):
    c = small_config()
    c.unlock()
    c.num_epoch = 3
    with pytest.raises(run_config.ConfigError, match="Did you mean 'num_epochs'"):
        trainer.train_and_evaluate(c, str(tmp_path), splits=small_splits)


def test_unknown_model_option_is_a_clear_error(small_splits, tmp_path):
    c = small_config()
    c.model.widths = (3,)
    with pytest.raises(ValueError, match=r"no option\(s\) \['widths'\]"):
        trainer.train_and_evaluate(c, str(tmp_path), splits=small_splits)


def test_nan_in_data_is_a_clear_error(small_splits, tmp_path):
    x = small_splits.train[0].copy()
    x[3, 5] = np.nan
    bad = data_splits.Splits((x, small_splits.train[1]), small_splits.validation, small_splits.test)
    with pytest.raises(offline.DataError, match="NaN"):
        trainer.train_and_evaluate(small_config(), str(tmp_path), splits=bad)


def test_unknown_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(run_config.ConfigError, match="Unknown dataset 'cifar'"):
        trainer.train_and_evaluate(small_config(**{"data.name": "cifar"}), str(tmp_path))
