"""Tests of aejax.runtime.placement: the pmap and sharded steps equal the single-device step.

The 8-device checks run tests/placement_check.py in a subprocess, because the CPU device count is
fixed when JAX starts and the rest of this pytest process keeps 1 device.
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

from aejax import models, objectives, step
from aejax.runtime import config as run_config
from aejax.runtime import placement, trainer
from placement_check import first, random_params, split, stack  # tests/ is on sys.path

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
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "placement_check.py"),
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
        assert "60 examples" in message and "8 devices" in message and "pad_rows" in message
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
    from placement_check import loop_config, loop_splits

    with pytest.raises(run_config.ConfigError, match="parallel='pmap' on 8 devices.*on 1"):
        trainer.train_and_evaluate(loop_config(parallel="pmap"), str(loop_root / "pmap_interrupted_8"),
                                 splits=loop_splits())


# --------------------------------------------------------------------------- in this process


def test_parallel_mode_is_checked_and_auto_is_none_on_one_device(small_splits):
    from placement_check import loop_config

    assert run_config.resolve_parallel(loop_config()) == ("none", 1)
    with pytest.raises(run_config.ConfigError, match="Unknown parallel mode 'dp'"):
        trainer.build_experiment(loop_config(parallel="dp"), small_splits)


def test_one_device_steps_equal_single_device_step():
    """jax.pmap, and the loop's sharded and per-device steps, on one device = the jitted step."""
    x = np.random.default_rng(0).random((3, 16, 16), dtype=np.float32)
    mask = np.ones((3, 16), np.float32)
    mask[1, :5] = 0.0
    model = models.MLPAutoencoder(input_shape=(16,), hidden=(8,), code_size=4, activation="tanh")
    per_example = step.make_per_example_fn(model, objectives.build("bce", {}))
    tx = optax.adam(1e-2)
    params = random_params(model, jnp.asarray(x[0]))
    names = step.metric_names(per_example, params, jnp.asarray(x[0]))
    fresh = lambda: step.TrainState.create(jax.tree.map(jnp.copy, params), tx)
    batches = [{"x": x[i], "mask": mask[i]} for i in range(3)]
    rng = jax.random.PRNGKey(1)
    calls = {"n": 0}

    def counted(*args):
        calls["n"] += 1
        return per_example(*args)

    single = jax.jit(step.make_train_step(per_example, tx))
    pstep = step.make_pmap_step(counted, tx)
    ref, pstate = fresh(), stack(fresh(), 1)
    loops = {}
    for mode in ("sharded", "pmap"):
        place = placement.Placement.create(mode, 1)
        body = step.make_train_step(counted, tx, axis_name="data" if mode == "pmap" else None)
        loops[mode] = (place, place.stream_step(body), place.replicate(fresh()))
    got = {}
    for b in batches:
        ref, ref_metrics = single(ref, b, rng)
        pstate, pmetrics = pstep(pstate, split(b, 1), rng)
        got["jax.pmap"] = (first(pstate), first(pmetrics))
        for mode, (place, run, state) in loops.items():
            zeros = place.replicate({k: np.zeros((), np.float32) for k in names})
            state, metrics = run(state, zeros, place.batch(16, b), rng)
            loops[mode] = (place, run, state)
            got[mode] = (state, metrics)
    assert calls["n"] == 3  # one trace each
    for name, (state, metrics) in got.items():
        assert int(state.step) == 3, name
        for a, b in zip(jax.tree.leaves((state.params, metrics)),
                        jax.tree.leaves((ref.params, ref_metrics))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL,
                                       err_msg=name)


def test_placement_refuses_too_many_devices_and_uneven_batches():
    with pytest.raises(ValueError, match="available"):
        placement.Placement.create("sharded", jax.device_count() + 1)
    with pytest.raises(ValueError, match="Unknown parallel mode 'dp'"):
        placement.Placement.create("dp", 1)
