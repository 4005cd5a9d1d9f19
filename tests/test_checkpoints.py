"""Tests of aejax.runtime.checkpoints: checksums, corrupt checkpoints set aside, failed writes."""

import json
import os
import subprocess
import sys
import textwrap
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from aejax import models, step
from aejax.runtime import checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_state(seed: int) -> dict:
    """A small checkpointed tree: a train state with a non-trivial Adam state."""
    params = models.init(models.MLPAutoencoder(input_shape=(64,), hidden=(32,), code_size=4),
                         jax.random.PRNGKey(seed), jnp.ones((2, 64)))
    tx = optax.adam(1e-3)
    state = step.TrainState.create(params, tx)
    grads = jax.tree.map(lambda p: jnp.sin(p * (7.0 + seed)), params)
    _, opt_state = tx.update(grads, state.opt_state, params)
    return {"state": state.replace(opt_state=opt_state, step=jnp.asarray(seed, jnp.int32))}


def target() -> dict:
    return train_state(0)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def saved(directory, steps=(1, 2)) -> dict:
    """Checkpoints ``steps`` in ``directory`` (synchronously); returns ``{step: tree}``."""
    ckpts = checkpoints.Checkpoints(str(directory), async_save=False)
    trees = {}
    for s in steps:
        trees[s] = train_state(s)
        ckpts.save(s, trees[s], {"epoch": s})
    ckpts.close()
    return trees


def flip_bytes(step_dir) -> str:
    """XORs 16 bytes of the largest array data file of a checkpoint where they change one leaf.

    An OCDBT data file also holds bytes that no read uses (superseded tree nodes, whose place in
    the file varies from write to write), so the bytes are flipped at the middle first and then at
    other places until reading the step reports a leaf that differs from its checksum.
    """
    data = [os.path.join(root, f) for root, _, files in os.walk(os.path.join(step_dir, "state"))
            if os.path.basename(root) == "d" for f in files]
    path = max(data, key=os.path.getsize)
    with open(path, "rb") as f:
        original = f.read()
    directory, step = os.path.split(os.fspath(step_dir))
    for fraction in (0.5, 0.3, 0.7, 0.4, 0.6, 0.2, 0.8):
        at = int(len(original) * fraction)
        raw = bytearray(original)
        raw[at:at + 16] = bytes(b ^ 0xFF for b in raw[at:at + 16])
        with open(path, "wb") as f:
            f.write(raw)
        reader = checkpoints.Checkpoints(directory, async_save=False)
        try:
            reader.read(int(step))
        except checkpoints.CheckpointError as e:
            if "differs from its checksum" in str(e):
                return path
        finally:
            reader.close()
    raise AssertionError(f"no 16 bytes of {path} made a leaf differ from its checksum")


def set_aside(directory) -> list:
    return sorted(n for n in os.listdir(directory) if ".corrupt-" in n)


# --------------------------------------------------------------------------- checksums


def test_checksums_are_saved_with_the_state_and_round_trip(tmp_path):
    trees = saved(tmp_path)
    with open(tmp_path / "2" / "checksums" / "metadata") as f:
        on_disk = json.load(f)
    assert on_disk["version"] == 1 and on_disk["algorithm"] == "zlib.crc32"
    leaves = jax.tree_util.tree_flatten_with_path(trees[2])[0]
    assert len(on_disk["leaves"]) == len(leaves)
    kernel = on_disk["leaves"]["state/params/encoder_0/kernel"]
    assert kernel["dtype"] == "float32" and kernel["shape"] == [64, 32]
    assert kernel == checkpoints.leaf_checksums(trees[2])["state/params/encoder_0/kernel"]
    ckpts = checkpoints.Checkpoints(str(tmp_path), async_save=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a verified checkpoint warns about nothing
        got_step, state, meta = ckpts.restore_latest(target())
    read_state, read_meta = ckpts.read(2)
    ckpts.close()
    assert got_step == 2 and meta == {"epoch": 2} and read_meta == {"epoch": 2}
    assert type(state["state"].opt_state[0]) is type(trees[2]["state"].opt_state[0])
    assert_trees_equal(state, trees[2])
    assert_trees_equal(read_state["state"]["params"], trees[2]["state"].params)


def test_async_save_round_trips_too(tmp_path):
    ckpts = checkpoints.Checkpoints(str(tmp_path))
    tree = train_state(5)
    ckpts.save(5, tree, {"epoch": 1})
    ckpts.close()
    ckpts = checkpoints.Checkpoints(str(tmp_path))
    got_step, state, meta = ckpts.restore_latest(target())
    ckpts.close()
    assert got_step == 5 and meta == {"epoch": 1}
    assert_trees_equal(state, tree)


def test_flipped_bytes_are_detected_set_aside_and_the_previous_step_restored(tmp_path):
    trees = saved(tmp_path)
    flip_bytes(tmp_path / "2")
    ckpts = checkpoints.Checkpoints(str(tmp_path), async_save=False)
    with pytest.raises(checkpoints.CheckpointError,
                       match="step 2 .* is corrupt: 1 leaf differs from its checksum"):
        ckpts.read(2)  # reading for inspection moves nothing
    assert set_aside(tmp_path) == []
    with pytest.warns(RuntimeWarning,
                      match=r"step 2 .*is corrupt \(1 leaf differs from its checksum") as caught:
        got_step, state, meta = ckpts.restore_latest(target())
    ckpts.close()
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert got_step == 1 and meta == {"epoch": 1}
    assert_trees_equal(state, trees[1])
    [moved] = set_aside(tmp_path)
    assert moved.startswith("2.corrupt-")
    assert checkpoints.Checkpoints(str(tmp_path)).steps() == [1]


@pytest.mark.parametrize("start_fresh", [False, True])
def test_no_verified_checkpoint_is_an_error_naming_the_directory(tmp_path, start_fresh):
    saved(tmp_path)
    for s in (1, 2):
        flip_bytes(tmp_path / str(s))
    ckpts = checkpoints.Checkpoints(str(tmp_path), async_save=False)
    with pytest.warns(RuntimeWarning, match="differs from its checksum"):
        if start_fresh:
            assert ckpts.restore_latest(target(), start_fresh_if_unreadable=True) is None
        else:
            with pytest.raises(checkpoints.CheckpointError) as e:
                ckpts.restore_latest(target())
            message = str(e.value)
            assert str(tmp_path) in message and "\n" not in message
            assert "none of the 2 checkpoints" in message
            assert "start_fresh_if_unreadable" in message
    ckpts.close()
    assert len(set_aside(tmp_path)) == 2  # kept for inspection, never deleted


def test_set_aside_leftovers_without_a_valid_checkpoint_are_an_error(tmp_path):
    saved(tmp_path, steps=(3,))
    os.replace(tmp_path / "3", tmp_path / "3.corrupt-1700000000")
    ckpts = checkpoints.Checkpoints(str(tmp_path), async_save=False)
    with pytest.raises(checkpoints.CheckpointError,
                       match=r"no checkpoint but 1 moved aside as corrupt \(3\.corrupt-1700000000"):
        ckpts.restore_latest(target())
    assert ckpts.restore_latest(target(), start_fresh_if_unreadable=True) is None
    # Once a new checkpoint is written, the leftovers are only kept for inspection.
    tree = train_state(4)
    ckpts.save(4, tree, {"epoch": 1})
    got_step, state, _ = ckpts.restore_latest(target())
    ckpts.close()
    assert got_step == 4
    assert_trees_equal(state, tree)


def test_empty_directory_restores_nothing(tmp_path):
    ckpts = checkpoints.Checkpoints(str(tmp_path / "new"), async_save=False)
    assert ckpts.restore_latest(target()) is None
    with pytest.raises(checkpoints.CheckpointError, match="No checkpoint in"):
        ckpts.read()
    ckpts.close()


def test_checkpoint_of_the_previous_version_without_checksums_restores(tmp_path):
    """The previous version wrote the state and meta items only; those restore unverified."""
    tree = train_state(7)
    old = ocp.CheckpointManager(str(tmp_path), options=ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=False), item_handlers={
        "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
    old.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                        meta=ocp.args.JsonSave({"epoch": 3})))
    old.close()
    assert not (tmp_path / "7" / "checksums").exists()
    ckpts = checkpoints.Checkpoints(str(tmp_path), async_save=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got_step, state, meta = ckpts.restore_latest(target())
    ckpts.close()
    assert got_step == 7 and meta == {"epoch": 3}
    assert_trees_equal(state, tree)
    assert set_aside(tmp_path) == []


# --------------------------------------------------------------------------- failed writes


def test_a_file_where_the_directory_should_be_is_an_error_at_once(tmp_path):
    (tmp_path / "checkpoints").write_text("x")
    with pytest.raises(checkpoints.CheckpointError, match="it is a file, not a directory"):
        checkpoints.Checkpoints(str(tmp_path / "checkpoints"))


def test_a_failed_write_is_an_error_and_keeps_the_previous_checkpoint(tmp_path):
    directory = tmp_path / "checkpoints"
    first = saved(directory, steps=(1,))[1]
    ckpts = checkpoints.Checkpoints(str(directory))
    os.replace(directory, tmp_path / "moved")
    directory.write_text("x")  # the directory is gone; orbax's writes fail
    start = time.time()
    with pytest.raises(checkpoints.CheckpointError, match="Could not write the checkpoint of step"):
        ckpts.save(2, train_state(2), {"epoch": 2})
        ckpts.wait()  # an async failure surfaces here, if not in save
    ckpts.close()  # reported once: closing afterwards neither raises nor hangs
    assert time.time() - start < 10
    os.remove(directory)
    os.replace(tmp_path / "moved", directory)
    ckpts = checkpoints.Checkpoints(str(directory), async_save=False)
    got_step, state, _ = ckpts.restore_latest(target())
    ckpts.close()
    assert got_step == 1
    assert_trees_equal(state, first)


@pytest.fixture
def full_disk(tmp_path):
    """A 3 MB tmpfs (root only): room for one checkpoint of :func:`big_tree`, not two."""
    mount_point = tmp_path / "full"
    mount_point.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)],
                          capture_output=True)
    if made.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): " + made.stderr.decode().strip())
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def big_tree(seed: int) -> dict:
    """2 MB of random bits (incompressible)."""
    return {"w": jnp.asarray(np.random.default_rng(seed).integers(0, 2**32, 500_000, np.uint32))}


@pytest.mark.parametrize("surfaces_at", ["save", "wait", "close"])
def test_a_full_disk_during_an_async_save_surfaces_at_the_next_call(full_disk, surfaces_at):
    directory = full_disk / "checkpoints"
    ckpts = checkpoints.Checkpoints(str(directory))
    ckpts.save(1, big_tree(1), {"epoch": 1})
    ckpts.wait()
    ckpts.save(2, big_tree(2), {"epoch": 2})  # returns while the write goes on, then fails
    start = time.time()
    with pytest.raises(checkpoints.CheckpointError,
                       match=r"step 2 .*No space left on device.*step 1 is intact") as e:
        if surfaces_at == "save":
            ckpts.save(3, big_tree(3), {"epoch": 3})
        elif surfaces_at == "wait":
            ckpts.wait()
        else:
            ckpts.close()
    assert "\n" not in str(e.value) and time.time() - start < 10
    ckpts.close()
    ckpts = checkpoints.Checkpoints(str(directory), async_save=False)
    got_step, state, _ = ckpts.restore_latest(big_tree(0))
    ckpts.close()
    assert got_step == 1
    assert_trees_equal(state, big_tree(1))


FAILED_WRITE_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import jax.numpy as jnp
    from aejax.runtime import checkpoints
    directory = sys.argv[1]
    ckpts = checkpoints.Checkpoints(directory)
    ckpts.save(1, {"w": jnp.ones(1000)}, {"epoch": 1})
    ckpts.wait()
    os.replace(directory, directory + ".moved")
    with open(directory, "w") as f:
        f.write("x")
    print(time.time(), flush=True)
    ckpts.save(2, {"w": jnp.zeros(1000)}, {"epoch": 2})
    ckpts.close()  # raises the failure; then the interpreter must exit, not wait for orbax
""")


def test_a_failed_write_lets_the_process_exit_at_once(tmp_path):
    """Orbax's non-daemon threads, left waiting by a failed write, must not hold the exit."""
    script = tmp_path / "fail.py"
    script.write_text(FAILED_WRITE_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "checkpoints")], cwd=REPO,
                         capture_output=True, text=True, timeout=30)
    ended = time.time()
    assert out.returncode == 1, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(
        "aejax.runtime.checkpoints.CheckpointError: Could not write the checkpoint of step 2")
    assert ended - float(out.stdout) < 10
    assert os.path.isdir(tmp_path / "checkpoints.moved" / "1")


def test_command_line_with_a_file_at_the_checkpoints_exits_2_with_one_line(fashion_data_dir,
                                                                           tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    (work / "checkpoints").write_text("x")
    out = subprocess.run([sys.executable, "-m", "experiments.main",
                          "--config=experiments/configs/tiny.py", f"--workdir={work}"], cwd=REPO,
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 2
    [line] = out.stderr.strip().splitlines()
    assert line.startswith(f"error: Cannot keep checkpoints in {work / 'checkpoints'}: it is a")


def test_command_line_on_a_full_disk_exits_2_with_one_error_line(fashion_data_dir, full_disk):
    """The disk fills during a run: the write fails in the background, the run ends."""
    work = full_disk / "w"  # one checkpoint of this model fits in the 3 MB, not two
    out = subprocess.run([sys.executable, "-m", "experiments.main",
                          "--config=experiments/configs/tiny.py", f"--workdir={work}",
                          "--config.model.hidden=(96,)"], cwd=REPO,
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr
    assert [ln for ln in lines if not ln.startswith("[aejax]")] == [lines[-1]]  # one error line
    assert lines[-1].startswith(f"error: Could not write the checkpoint of step 20 to {work}")
    assert "No space left on device" in lines[-1] and "step 15 is intact" in lines[-1]
    assert os.listdir(work / "checkpoints" / "15")
