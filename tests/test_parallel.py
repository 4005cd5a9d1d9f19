"""Tests of aejax.parallel: the pmap and sharded steps equal the single-device step.

The 8-device checks run tests/parallel_check.py in a subprocess, because the CPU device count is
fixed when JAX starts and the rest of this session keeps 1 device.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aejax import models, objectives, parallel, train
from parallel_check import random_params  # tests/ is on sys.path, as for conftest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# float32 sums taken in another order (per-shard partial sums, then the all-reduce) differ in
# the last bits; 5 Adam steps (lr 1e-2) carry that to about 1e-7 in the parameters (measured:
# at most 6e-8) and 1e-6 relative in the metrics. An error in the reduction (a pmean of shard
# means under uneven masks, a missing psum) moves parameters by about 1e-3 or more.
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def loop_root(tmp_path_factory):
    """Where the 8-device subprocess runs train_and_evaluate (its workdirs are checked here too)."""
    return tmp_path_factory.mktemp("parallel_loop")


@pytest.fixture(scope="module")
def eight_devices(loop_root) -> dict:
    # Compiling dominates; optimization level 0 halves it and applies to both sides compared.
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "parallel_check.py"),
                           str(RTOL), str(ATOL), str(loop_root)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["bce", "contractive", "vae"])
@pytest.mark.parametrize("kind", ["pmap", "sharded"])
def test_parallel_step_equals_single_device_step(eight_devices, case, kind):
    assert eight_devices["devices"] == 8
    res = eight_devices["cases"][case]
    # The comparison means something only if training moved the parameters well past ATOL.
    assert res["moved_from_init"] > 1e3 * ATOL
    got = res[kind]
    assert got["params"]["allclose"], got
    assert got["metrics"]["allclose"], got


@pytest.mark.parametrize("case", ["bce", "contractive", "vae"])
@pytest.mark.parametrize("kind", ["pmap", "sharded"])
def test_parallel_step_traced_once(eight_devices, case, kind):
    got = eight_devices["cases"][case][kind]
    assert got["traces"] == 1
    for later in ("traces_after_padding", "traces_after_rerun"):
        assert got.get(later, 1) == 1, later


def test_pmap_replicas_stay_identical(eight_devices):
    for case in ("bce", "contractive", "vae"):
        assert eight_devices["cases"][case]["pmap"]["replicas_identical"], case


def test_pmap_vae_noise_is_per_shard_and_reproducible(eight_devices):
    vae = eight_devices["cases"]["vae"]["pmap"]
    assert vae["reproducible"]
    # Per-shard keys really draw other noise than the whole-batch step (hence the twin reference).
    assert vae["max_abs_diff_to_whole_batch_noise"] > 1e3 * ATOL


def test_non_divisible_batch_is_refused_or_padded_exactly(eight_devices):
    pad = eight_devices["cases"]["bce"]["padding"]
    for where, message in pad["errors"].items():
        assert message is not None, f"{where} accepted a batch of 60 on 8 devices"
        assert "60 examples" in message and "8 devices" in message and "pad_to_multiple" in message
    assert pad["padded_size"] == 64
    for key in ("pmap", "pmap_metrics", "sharded", "sharded_metrics"):
        assert pad[key]["allclose"], (key, pad[key])


# --------------------------------------------------------------------------- the train loop, 8 devices


@pytest.mark.parametrize("mode", ["sharded", "pmap"])
def test_loop_in_parallel_mode_ends_with_the_single_device_parameters(eight_devices, mode):
    """train_and_evaluate(parallel=mode) on 8 devices: the parameters and test metrics of parallel='none'.

    Same tolerance as the steps, for the same reason: 8 Adam steps at lr 1e-2 over float32
    sums taken in another order (measured: at most 6e-8 in the parameters).
    """
    loop = eight_devices["loop"]
    assert loop["moved_from_init"] > 1e3 * ATOL
    got = loop[mode]
    assert got["params"]["allclose"], got
    assert got["test_metrics"]["allclose"], got
    assert got["meta"] == {"parallel": mode, "num_devices": 8}


@pytest.mark.parametrize("mode", ["sharded", "pmap"])
def test_loop_streaming_path_ends_with_the_device_resident_parameters(eight_devices, mode):
    got = eight_devices["loop"][f"{mode}_stream"]
    assert got["params"]["allclose"], got
    assert got["traces"] == 1


def test_loop_sharded_draws_the_single_device_noise(eight_devices):
    # The sharded run above trains with Gaussian corruption; without noise it would end elsewhere.
    assert eight_devices["loop"]["noise_moved_params"] > 1e3 * ATOL


def test_loop_compiles_its_step_once_in_every_mode(eight_devices):
    loop = eight_devices["loop"]
    for name in ("none", "none_noisy", "sharded", "pmap", "pmap_interrupted"):
        assert loop[name]["traces"] == 1, name


def test_loop_auto_is_sharded_on_several_devices(eight_devices):
    assert eight_devices["loop"]["auto_mode"] == ["sharded", 8]


def test_loop_refuses_a_batch_that_does_not_split(eight_devices):
    message = eight_devices["loop"]["batch_60"]
    assert message is not None
    assert "batch_size 60" in message and "8 devices" in message and "batch_size=64" in message


def test_interrupted_pmap_run_resumes_only_as_pmap_on_as_many_devices(eight_devices, loop_root,
                                                                       small_splits):
    loop = eight_devices["loop"]
    message = loop["pmap_resumed_as_sharded"]
    assert message is not None and "parallel='pmap' on 8 devices" in message
    assert loop["pmap_interrupted"]["params_equal_uninterrupted"]
    # Here, with one device: refused before anything is trained.
    from parallel_check import loop_config, loop_splits

    with pytest.raises(train.ConfigError, match="parallel='pmap' on 8 devices.*on 1"):
        train.train_and_evaluate(loop_config(parallel="pmap"), str(loop_root / "pmap_interrupted_8"),
                                 splits=loop_splits())


# --------------------------------------------------------------------------- in this process


def test_parallel_mode_is_checked_and_auto_is_none_on_one_device(small_splits):
    from parallel_check import loop_config

    assert train.resolve_parallel(loop_config()) == ("none", 1)
    with pytest.raises(train.ConfigError, match="Unknown parallel 'dp'"):
        train.build_experiment(loop_config(parallel="dp"), small_splits)


def test_one_device_steps_equal_single_device_step():
    x = np.random.default_rng(0).random((3, 16, 16), dtype=np.float32)
    mask = np.ones((3, 16), np.float32)
    mask[1, :5] = 0.0
    model = models.MLPAutoencoder(input_shape=(16,), hidden=(8,), code_size=4, activation="tanh")
    per_example = train.make_per_example_fn(model, objectives.build("bce", {}))
    tx = optax.adam(1e-2)
    params = random_params(model, jnp.asarray(x[0]))
    template = train.metrics_template(per_example, params, jnp.asarray(x[0]))
    fresh = lambda: train.TrainState.create(jax.tree.map(jnp.copy, params), tx, template)
    batches = [{"x": x[i], "mask": mask[i]} for i in range(3)]
    rng = jax.random.PRNGKey(1)
    calls = {"n": 0}

    def counted(*args):
        calls["n"] += 1
        return per_example(*args)

    single = jax.jit(train.make_train_step(per_example, tx))
    pstep = parallel.make_pmap_step(counted, tx)
    mesh = parallel.make_mesh(1)
    sstep = parallel.make_sharded_step(counted, tx, mesh)
    ref, pstate, sstate = fresh(), parallel.replicate(fresh(), 1), parallel.replicate_on(fresh(), mesh)
    for b in batches:
        ref, ref_metrics = single(ref, b, rng)
        pstate, pmetrics = pstep(pstate, parallel.shard_batch(b, 1), rng)
        sstate, smetrics = sstep(sstate, parallel.shard(b, mesh), rng)
    assert calls["n"] == 2  # one trace each
    for got, metrics in ((parallel.unreplicate(pstate), parallel.unreplicate(pmetrics)),
                         (sstate, smetrics)):
        assert int(got.step) == 3
        for a, b in zip(jax.tree.leaves((got.params, metrics)), jax.tree.leaves((ref.params, ref_metrics))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL)


def test_pad_to_multiple_keeps_rows_and_masks_padding():
    batch = {"x": np.ones((5, 3), np.float32), "mask": np.array([1, 0, 1, 1, 1], np.float32)}
    padded = parallel.pad_to_multiple(batch, 4)
    assert padded["x"].shape == (8, 3)
    np.testing.assert_array_equal(padded["mask"], [1, 0, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(padded["x"][5:], 0.0)
    assert parallel.pad_to_multiple({"x": np.ones((8, 3))}, 4)["mask"].tolist() == [1.0] * 8


def test_shard_batch_shapes_and_errors():
    batch = {"x": np.zeros((12, 3), np.float32), "mask": np.ones(12, np.float32)}
    shards = parallel.shard_batch(batch, 4)
    assert shards["x"].shape == (4, 3, 3) and shards["mask"].shape == (4, 3)
    with pytest.raises(ValueError, match="12 examples does not split evenly over 8 devices"):
        parallel.shard_batch(batch, 8)
    with pytest.raises(ValueError, match="different leading sizes"):
        parallel.shard_batch({"x": np.zeros((12, 3)), "mask": np.ones(8)}, 4)
    with pytest.raises(ValueError, match="available"):
        parallel.make_mesh(jax.device_count() + 1)
