"""The data-parallel steps against the single-device step on 8 CPU devices; prints one JSON line.

Run by tests/test_placement.py in a subprocess (the device count is fixed when JAX starts):
``XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/placement_check.py RTOL ATOL
[WORKDIR]``; with WORKDIR it also runs ``train_and_evaluate`` in every parallel mode there.
Compiling dominates its time; the test also passes ``--xla_backend_optimization_level=0``, which
halves that and, applying to both sides of every comparison, changes nothing compared.
"""

import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aejax import models, objectives, step
from aejax.data import batching
from aejax.data import splits as data_splits
from aejax.runtime import checkpoints, placement, trainer
from aejax.runtime import config as run_config

NUM_STEPS = 5
BATCH = 64


def allclose(a, b, rtol, atol) -> dict:
    """``np.allclose`` over every leaf of two trees, with the largest absolute difference."""
    la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    assert len(la) == len(lb)
    ok = all(np.allclose(x, y, rtol=rtol, atol=atol) for x, y in zip(la, lb))
    diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(la, lb))
    return {"allclose": bool(ok), "max_abs_diff": diff}


def random_params(model, x, seed: int = 0):
    """Parameters shaped as ``models.init`` makes them, drawn in numpy: no init to compile."""
    shapes = jax.eval_shape(lambda: models.init(model, jax.random.PRNGKey(0), x))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)


def run(step_fn, state, batches, rng, place):
    """``NUM_STEPS`` steps; the final state and every step's metrics."""
    metrics = []
    for batch in batches:
        state, m = step_fn(state, place(batch), rng)
        metrics.append(m)
    return state, metrics


def stack(tree, d):
    """One copy of ``tree`` per device on a leading axis, placed as ``jax.pmap`` places its
    outputs (so the second call of a pmapped step does not retrace)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    sharding = NamedSharding(Mesh(np.array(jax.local_devices()[:d]), ("batch",)),
                             PartitionSpec("batch"))
    return jax.device_put(jax.tree.map(lambda a: np.stack([np.asarray(a)] * d), tree), sharding)


# jax.pmap's layout: a leading device axis on every batch entry.
split = lambda batch, d: {k: np.asarray(v).reshape((d, -1) + np.shape(v)[1:]) for k, v in batch.items()}
first = lambda tree: jax.tree.map(lambda a: a[0], tree)


def sharded_step(per_example, tx, place):
    """The loop's sharded step, one step per call: ``(state, batch, rng) -> (state, metrics)``."""
    run_one = place.stream_step(step.make_train_step(per_example, tx))

    def one(state, batch, rng):
        zeros = place.replicate({k: np.zeros((), np.float32) for k in names["current"]})
        return run_one(state, zeros, place.batch(len(batch["x"]), batch), rng)

    return one


names = {}


def counting(per_example):
    """``per_example`` that counts its calls: one per trace of a step built on it."""
    calls = {"n": 0}

    def fn(*args):
        calls["n"] += 1
        return per_example(*args)

    return fn, calls


def uneven_masks(num_devices: int) -> np.ndarray:
    """0/1 masks whose shards hold different numbers of real examples (one shard none at all)."""
    masks = (np.random.default_rng(7).random((NUM_STEPS, BATCH)) > 0.3).astype(np.float32)
    masks[2, : BATCH // num_devices] = 0.0
    return masks


def main(rtol: float, atol: float) -> dict:
    t0 = time.time()
    d = jax.device_count()
    assert d == 8, f"expected 8 CPU devices, got {d}; set XLA_FLAGS before JAX starts"
    xs = np.random.default_rng(0).random((NUM_STEPS, BATCH, 16), dtype=np.float32)
    masks = uneven_masks(d)
    tx = optax.adam(1e-2)
    rng = jax.random.PRNGKey(1)
    place = placement.Placement.create("sharded", d)
    mlp = models.MLPAutoencoder(input_shape=(16,), hidden=(8,), code_size=4, activation="tanh")
    vae = models.VAE(input_shape=(16,), hidden=(8,), latent_size=4)
    cases = {
        # The BCE case carries uneven masks: the weighting by counts is what makes it pass.
        "bce": (mlp, objectives.build("bce", {}), True),
        "contractive": (mlp, objectives.build("bce", {"contractive": {"weight": 0.1, "mode": "rev"}}),
                        False),
        "vae": (vae, objectives.build("bce", {"kl": {"weight": 1.0}}), False),
    }
    out = {"devices": d, "cases": {}}
    for name, (model, objective, masked) in cases.items():
        per_example = step.make_per_example_fn(model, objective)
        params = random_params(model, jnp.asarray(xs[0]))
        names["current"] = step.metric_names(per_example, params, jnp.asarray(xs[0]))
        # A fresh copy each time: the parallel steps donate (delete) the state they are given.
        fresh = lambda: step.TrainState.create(jax.tree.map(jnp.copy, params), tx)
        batches = [dict(x=xs[i], **({"mask": masks[i]} if masked else {})) for i in range(NUM_STEPS)]

        single = jax.jit(step.make_train_step(per_example, tx))
        ref, ref_metrics = run(single, fresh(), batches, rng, lambda b: b)
        # The pmap step draws per-shard noise; its single-device twin draws the same.
        pmap_ref, pmap_ref_metrics = ref, ref_metrics
        if name == "vae":
            twin = jax.jit(step.make_train_step(step.shardwise(per_example, d), tx))
            pmap_ref, pmap_ref_metrics = run(twin, fresh(), batches, rng, lambda b: b)

        counted, pcalls = counting(per_example)
        pstep = step.make_pmap_step(counted, tx)
        pstate, pmetrics = run(pstep, stack(fresh(), d), batches, rng, lambda b: split(b, d))
        pmap_traces = pcalls["n"]
        leaves = jax.tree.leaves(jax.device_get(pstate.params))
        res = {"pmap": {
            "params": allclose(first(pstate).params, pmap_ref.params, rtol, atol),
            "metrics": allclose(first(pmetrics), pmap_ref_metrics, rtol, atol),
            "replicas_identical": all(bool(np.all(a == a[:1])) for a in leaves),
            "traces": pmap_traces}}
        if name == "vae":
            again, _ = run(pstep, stack(fresh(), d), batches, rng, lambda b: split(b, d))
            res["pmap"]["reproducible"] = all(
                bool(np.array_equal(a, b)) for a, b in zip(
                    jax.tree.leaves(jax.device_get(again.params)), leaves))
            res["pmap"]["max_abs_diff_to_whole_batch_noise"] = allclose(
                first(pstate).params, ref.params, rtol, atol)["max_abs_diff"]
            res["pmap"]["traces_after_rerun"] = pcalls["n"]

        counted, scalls = counting(per_example)
        sstep = sharded_step(counted, tx, place)
        sstate, smetrics = run(sstep, place.replicate(fresh()), batches, rng, lambda b: b)
        res["sharded"] = {"params": allclose(sstate.params, ref.params, rtol, atol),
                          "metrics": allclose(smetrics, ref_metrics, rtol, atol),
                          "traces": scalls["n"]}
        res["moved_from_init"] = allclose(ref.params, params, rtol, atol)["max_abs_diff"]

        if name == "bce":
            res["padding"] = check_padding(single, ref, pstep, pstate, sstep, sstate, rng, place,
                                           rtol, atol)
            res["pmap"]["traces_after_padding"] = pcalls["n"]
            res["sharded"]["traces_after_padding"] = scalls["n"]
        out["cases"][name] = res
    out["seconds"] = round(time.time() - t0, 1)
    return out


def check_padding(single, ref, pstep, pstate, sstep, sstate, rng, place, rtol, atol) -> dict:
    """A 60-example batch: refused as is; padded to 64 with mask 0, exact against 60 on one device."""
    d = jax.device_count()
    x60 = np.random.default_rng(3).random((60, 16), dtype=np.float32)
    errors = {}
    for where, call in (("placement_batch", lambda: place.batch(60, {"x": x60})),
                        ("sharded_step", lambda: sstep(sstate, {"x": x60}, rng))):
        try:
            call()
            errors[where] = None
        except ValueError as e:
            errors[where] = str(e)
    x64, mask = batching.pad_rows(x60, d)
    padded = {"x": x64, "mask": mask}
    want, want_metrics = single(ref, {"x": x60}, rng)
    pstate, pmetrics = pstep(pstate, split(padded, d), rng)
    sstate, smetrics = sstep(sstate, padded, rng)
    return {"errors": errors, "padded_size": int(padded["x"].shape[0]),
            "pmap": allclose(first(pstate).params, want.params, rtol, atol),
            "pmap_metrics": allclose(first(pmetrics), want_metrics, rtol, atol),
            "sharded": allclose(sstate.params, want.params, rtol, atol),
            "sharded_metrics": allclose(smetrics, want_metrics, rtol, atol)}


def loop_config(**overrides):
    """A short run: 2 epochs of 4 global batches of 64, checkpoints mid-epoch, padded evaluation."""
    c = run_config.default_config()
    c.model.update(input_shape=(16,), hidden=(8,), code_size=4, activation="tanh")
    c.update(num_epochs=2, batch_size=BATCH, eval_batch_size=30, log_every_steps=3,
             checkpoint_every_steps=3, keep_checkpoints=10, progress=False, figures=False,
             pca_baseline=False)
    c.optimizer.learning_rate = 1e-2
    for key, value in overrides.items():
        target = c
        *path, last = key.split(".")
        for p in path:
            target = target[p]
        target[last] = value
    return c


def loop_splits() -> data_splits.Splits:
    # Low-rank images, as tests/conftest.py makes them, but 16 pixels: compiling stays cheap.
    z = np.random.default_rng(0).normal(size=(384, 3))
    x = (1 / (1 + np.exp(-z @ np.random.default_rng(1).normal(size=(3, 16)) * 1.5))).astype(np.float32)
    y = np.zeros(len(x), np.int32)
    return data_splits.Splits((x[:256], y[:256]), (x[256:320], y[256:320]), (x[320:], y[320:]))


def final_params(workdir):
    ckpts = checkpoints.Checkpoints(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        tree, meta = ckpts.read()
    finally:
        ckpts.close()
    return tree["state"]["params"], meta


def loop_checks(rtol: float, atol: float, root: str) -> dict:
    """``train_and_evaluate`` with parallel none, sharded and pmap: same parameters, one trace."""
    splits = loop_splits()
    traces = {"step": 0}
    make_step = trainer.make_train_step

    def counted(*args, **kwargs):
        inner = make_step(*args, **kwargs)

        def traced(*a):
            traces["step"] += 1  # runs only while tracing
            return inner(*a)
        return traced

    trainer.make_train_step = counted
    out, out_params = {}, {}

    def run(name, **overrides):
        before = dict(traces)
        workdir = os.path.join(root, name)
        summary = trainer.train_and_evaluate(loop_config(**overrides), workdir, splits=splits)
        params, meta = final_params(workdir)
        out_params[name] = params
        out[name] = {"traces": sum(traces.values()) - sum(before.values()), "test": summary["test"],
                     "meta": {k: meta[k] for k in ("parallel", "num_devices")}}
        return params, summary

    # The sharded step draws the single-device step's noise (here the corruption's); the pmap
    # step draws its own per device, so it is compared on a noiseless objective.
    # Evaluation batches of 32 split over 8 devices as they are: evaluation draws the same noise.
    noise = {"corruption.kind": "gaussian", "corruption.std": 0.3, "eval_batch_size": 32}
    ref, ref_summary = run("none_noisy", parallel="none", **noise)
    params, summary = run("sharded", parallel="sharded", **noise)
    out["sharded"]["params"] = allclose(params, ref, rtol, atol)
    out["sharded"]["test_metrics"] = allclose(summary["test"], ref_summary["test"], rtol, atol)
    ref, ref_summary = run("none", parallel="none")
    params, summary = run("pmap", parallel="pmap")
    out["pmap"]["params"] = allclose(params, ref, rtol, atol)
    out["pmap"]["test_metrics"] = allclose(summary["test"], ref_summary["test"], rtol, atol)
    # The streaming path (host batches prefetched to the devices) in the same order.
    stream = {"data.on_device": False}
    for name, mode, extra, want in (("sharded_stream", "sharded", noise, out_params["sharded"]),
                                    ("pmap_stream", "pmap", {}, out_params["pmap"])):
        params, _ = run(name, parallel=mode, **stream, **extra)
        out[name]["params"] = allclose(params, want, rtol, atol)
        out[name]["params_bitwise"] = all(bool(np.array_equal(a, b)) for a, b in zip(
            jax.tree.leaves(params), jax.tree.leaves(want)))
    out["noise_moved_params"] = allclose(out_params["none_noisy"], ref, rtol, atol)["max_abs_diff"]
    init = models.init(trainer.build_experiment(loop_config(), splits).model,
                       jax.random.split(jax.random.PRNGKey(0), 4)[0], jnp.asarray(splits.train[0][:BATCH]))
    out["moved_from_init"] = allclose(ref, init, rtol, atol)["max_abs_diff"]
    out["auto_mode"] = run_config.resolve_parallel(loop_config())

    # An interrupted pmap run: its checkpoint after step 3 (the run's later ones removed).
    pmap_ref, _ = final_params(os.path.join(root, "pmap"))
    for copy in ("pmap_interrupted", "pmap_interrupted_8"):
        shutil.copytree(os.path.join(root, "pmap"), os.path.join(root, copy))
        ckdir = os.path.join(root, copy, "checkpoints")
        for name in os.listdir(ckdir):
            if name.isdigit() and int(name) > 3:
                shutil.rmtree(os.path.join(ckdir, name))
    try:
        trainer.train_and_evaluate(loop_config(parallel="sharded"),
                                 os.path.join(root, "pmap_interrupted"), splits=splits)
        out["pmap_resumed_as_sharded"] = None
    except run_config.ConfigError as e:
        out["pmap_resumed_as_sharded"] = str(e)
    params, _ = run("pmap_interrupted", parallel="pmap")
    out["pmap_interrupted"]["params_equal_uninterrupted"] = all(
        bool(np.array_equal(a, b)) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(pmap_ref)))
    try:
        trainer.build_experiment(loop_config(parallel="sharded", batch_size=60), splits)
        out["batch_60"] = None
    except run_config.ConfigError as e:
        out["batch_60"] = str(e)
    trainer.make_train_step = make_step
    return out


if __name__ == "__main__":
    result = main(float(sys.argv[1]), float(sys.argv[2]))
    if len(sys.argv) > 3:
        t0 = time.time()
        result["loop"] = loop_checks(float(sys.argv[1]), float(sys.argv[2]), sys.argv[3])
        result["loop"]["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(result))
