"""Benchmarks, printed as JSON lines: ``python -m experiments.bench [--quick] [--parallel-only]``.

Everything is measured side by side in one run, so ratios hold on a shared, noisy machine:
a float32 matmul roofline, the library's train step for the 784-128-32-128-784 autoencoder
(batch 256, Adam) against it, the same step data-parallel (sharded and pmap, as the train loop
runs them) with its overhead over the single-device step, one epoch of full Fashion-MNIST, and
the contractive penalty's modes as ratios to the plain step.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from aejax import data, models, objectives, parallel, train

BATCH = 256


def emit(**record) -> None:
    record.setdefault("device", jax.devices()[0].device_kind)
    print(json.dumps(record), flush=True)


def best_time(fn, *, repeats: int, number: int) -> float:
    """Best wall time of ``number`` calls, over ``repeats`` tries (the least disturbed one)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(number):
            out = fn()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / number)
    return min(times)


def matmul_roofline(n: int = 2048, repeats: int = 5) -> float:
    """float32 GFLOP/s of an n x n matmul in JAX."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    jax.block_until_ready(f(a, b))
    t = best_time(lambda: f(a, b), repeats=repeats, number=5)
    return 2 * n**3 / t / 1e9


def step_runner(model, terms, x_all, *, reconstruction="bce", lr=1e-3, mode="none",
                num_devices=1):
    """The train loop's own fused step (gather + step + metric accumulation), ready to time.

    ``mode`` and ``num_devices`` choose the loop's placement (:class:`aejax.parallel.Placement`).
    """
    opt = train.default_config().optimizer
    opt.learning_rate = lr
    objective = objectives.build(reconstruction, terms)
    per_example = train.make_per_example_fn(model, objective, reconstruction=reconstruction)
    tx = train.build_optimizer(opt, 10_000, 100)
    params = models.init(model, jax.random.PRNGKey(0), x_all[:BATCH])
    template = train.metrics_template(per_example, params, x_all[:BATCH])
    place = parallel.Placement.create(mode, num_devices)
    step_fn = (parallel.make_device_step(per_example, tx, axis_name=parallel.PMAP_AXIS)
               if mode == "pmap" else train.make_train_step(per_example, tx))
    run = place.fused_step(step_fn, BATCH)
    x = place.data(np.asarray(x_all))
    perm = place.permutation(place.constant(jax.random.PRNGKey(1)), len(x_all), 0)
    rng = place.constant(jax.random.PRNGKey(2))
    spe = len(x_all) // BATCH
    holder = {"state": place.state(train.TrainState.create(params, tx, template)),
              "acc": place.state(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)),
              "i": 0}

    def one():
        holder["state"], holder["acc"] = run(holder["state"], holder["acc"], x, perm,
                                             holder["i"] % spe, rng)
        holder["i"] += 1
        return holder["acc"]

    jax.block_until_ready(one())  # compile
    return one, sum(np.size(p) for p in jax.tree.leaves(params) if np.ndim(p) == 2)


def input_pipeline(model, x_all, t_loop: float, *, repeats: int) -> dict:
    """Cost of the device-resident input pipeline: the loop's step against the bare pure step.

    The loop's step gathers its shuffled batch from the on-device dataset and accumulates the
    metrics; the bare step gets one fixed, already-placed batch. Their difference is what the
    input pipeline (and the metric sums) cost per step.
    """
    objective = objectives.build("bce", {})
    per_example = train.make_per_example_fn(model, objective)
    tx = train.build_optimizer(train.default_config().optimizer, 10_000, 100)
    batch = {"x": jax.device_put(x_all[:BATCH])}
    params = models.init(model, jax.random.PRNGKey(0), batch["x"])
    bare = jax.jit(train.make_train_step(per_example, tx), donate_argnums=0)
    holder = {"state": train.TrainState.create(
        jax.tree.map(jnp.copy, params), tx, train.metrics_template(per_example, params, batch["x"]))}
    rng = jax.random.PRNGKey(2)

    def one():
        holder["state"], metrics = bare(holder["state"], batch, rng)
        return metrics

    jax.block_until_ready(one())
    t_bare = best_time(one, repeats=repeats, number=100)
    return dict(name="input_pipeline", model="784-128-32-128-784", batch=BATCH,
                bare_step_per_s=round(1 / t_bare, 1), loop_step_per_s=round(1 / t_loop, 1),
                overhead_fraction=round((t_loop - t_bare) / t_loop, 3))


def parallel_steps(model, x_all, *, repeats: int, number: int = 100) -> list[dict]:
    """steps/s of the loop's step in every parallel mode on one device, and on all if several.

    The modes are timed in turns, ``repeats`` rounds of ``number`` steps each, and each keeps its
    best round: a burst of load on a shared machine then hits every mode alike.
    """
    cases = [("none", 1), ("sharded", 1), ("pmap", 1)]
    if jax.device_count() > 1:
        cases += [("sharded", jax.device_count()), ("pmap", jax.local_device_count())]
    runners = {case: step_runner(model, {}, x_all, mode=case[0], num_devices=case[1])[0]
               for case in cases}
    best = {case: float("inf") for case in cases}
    for _ in range(repeats):
        for case, run in runners.items():
            best[case] = min(best[case], best_time(run, repeats=1, number=number))
    base = best[("none", 1)]
    return [dict(name="parallel_step", mode=mode, devices=n, model="784-128-32-128-784",
                 batch=BATCH, steps_per_s=round(1 / t, 1), time_ratio_to_single_device=round(t / base, 3))
            for (mode, n), t in best.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and no fwd-mode Jacobian")
    parser.add_argument("--skip-epoch", action="store_true", help="skip the full-epoch timing (no data)")
    parser.add_argument("--parallel-only", action="store_true",
                        help="only the data-parallel steps against the single-device step")
    args = parser.parse_args()
    repeats = 3 if args.quick else 5
    x_all = jax.random.uniform(jax.random.PRNGKey(0), (BATCH * 40, 784), jnp.float32)
    ae = models.MLPAutoencoder(hidden=(128,), code_size=32, activation="relu")
    if args.parallel_only:
        for record in parallel_steps(ae, x_all, repeats=2 * repeats):
            emit(**record)
        return

    roofline = matmul_roofline()
    emit(name="matmul_roofline", n=2048, gflops=round(roofline, 1))

    plain, num_weights = step_runner(ae, {}, x_all)
    t_plain = best_time(plain, repeats=repeats, number=100)
    flops = 6 * num_weights * BATCH
    emit(name="train_step", model="784-128-32-128-784", batch=BATCH, optimizer="adam",
         steps_per_s=round(1 / t_plain, 1), gflops=round(flops / t_plain / 1e9, 1),
         fraction_of_roofline=round(flops / t_plain / 1e9 / roofline, 3))
    emit(**input_pipeline(ae, x_all, t_plain, repeats=repeats))
    for record in parallel_steps(ae, x_all, repeats=2 * repeats):
        emit(**record)

    modes = ["best", "dense", "rev", "auto", "estimate"] + ([] if args.quick else ["fwd"])
    for mode in modes:
        term = {"contractive": {"weight": 0.1, "mode": mode}}
        run, _ = step_runner(ae, term, x_all)
        number = 3 if mode == "fwd" else 30
        t = best_time(run, repeats=repeats if mode != "fwd" else 1, number=number)
        resolved = {"best": "one_hidden: exact quadratic form per example",
                    "dense": "exact, Gram matrix of the first layer",
                    "estimate": "unbiased estimate, 1 probe"}.get(mode, f"exact, jax {mode}-mode")
        emit(name="contractive_step", mode=mode, method=resolved, encoder="784-128-32 relu",
             steps_per_s=round(1 / t, 1), ratio_to_plain=round(t / t_plain, 2))
    # Closed form for the one-layer sigmoid encoder, against the plain step of the same model.
    sig = models.MLPAutoencoder(hidden=(), code_size=128, code_activation="sigmoid")
    sig_plain, _ = step_runner(sig, {}, x_all)
    sig_cf, _ = step_runner(sig, {"contractive": {"weight": 0.1, "mode": "sigmoid"}}, x_all)
    t_sp = best_time(sig_plain, repeats=repeats, number=100)
    t_sc = best_time(sig_cf, repeats=repeats, number=100)
    emit(name="contractive_step", mode="sigmoid", method="closed form", encoder="784-128 sigmoid",
         steps_per_s=round(1 / t_sc, 1), ratio_to_plain=round(t_sc / t_sp, 2))

    if not args.skip_epoch:
        emit(**epoch_time())


def epoch_time() -> dict:
    """Seconds for one epoch (train + validation) of full Fashion-MNIST, compile excluded.

    Runs the real loop (``train_and_evaluate``) for 1 and for 3 epochs; the difference over 2 is
    the time of an epoch, so start-up and compilation cancel out.
    """
    import tempfile

    splits = data.load("fashion_mnist", flat=True)
    c = train.default_config()
    c.update(progress=False, figures=False, pca_baseline=False, checkpoint_every_steps=10**9)
    times = {}
    for epochs in (1, 3):
        c.num_epochs = epochs
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            train.train_and_evaluate(c, d, splits=splits)
            times[epochs] = time.perf_counter() - t
    return dict(name="epoch", dataset="fashion_mnist", model="784-128-32-128-784", batch=BATCH,
                train_examples=len(splits.train[0]), validation_examples=len(splits.validation[0]),
                seconds=round((times[3] - times[1]) / 2, 3))


if __name__ == "__main__":
    main()
