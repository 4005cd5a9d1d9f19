"""Benchmarks, printed as JSON lines: ``python -m experiments.bench [--quick] [--parallel-only]``.

Everything is measured side by side in one run, so ratios hold on a shared, noisy machine:
a float32 matmul roofline; the train loop's step for the 784-128-32-128-784 autoencoder
(batch 256, Adam; 50 steps per call, as the loop runs them between log steps) against it; the
input pipeline's share of that step; the same step data-parallel (sharded and pmap, as the loop
runs them) against the single-device step, and ``jax.pmap`` itself; the contractive penalty's
modes and the VAE as ratios to the plain step; one epoch of full Fashion-MNIST. Every record
names the device (``device``), so a run on a GPU gives its figures as they are.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aejax import models, objectives, step
from aejax.runtime.placement import Placement

BATCH = 256
# Steps per call of the loop's step: the loop runs every step up to its next log step in one
# call, and logs every 50 steps by default (config.default_config().log_every_steps).
STEPS_PER_CALL = 50


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


class Timings(dict):
    """``{name: [seconds per step in each round]}`` from :func:`interleaved`."""

    def best(self, name) -> float:
        """The least disturbed round: for absolute rates."""
        return min(self[name])

    def ratio(self, name, base) -> float:
        """Median over rounds of ``name``'s time over ``base``'s in the same round.

        Both were timed seconds apart, so load that comes and goes between rounds cancels.
        """
        return float(np.median([a / b for a, b in zip(self[name], self[base])]))


def interleaved(runners: dict, *, rounds: int) -> Timings:
    """Seconds per step of each ``{name: (fn, number[, steps_per_call])}``, timed in turns.

    Every round times each runner once (``number`` calls, after one untimed call that lets the
    caches and thread pool settle after the previous runner), so a burst of load from other
    jobs on a shared machine hits all of them alike.
    """
    times = Timings({name: [] for name in runners})
    for _ in range(rounds):
        for name, (fn, number, *steps) in runners.items():
            jax.block_until_ready(fn())
            times[name].append(best_time(fn, repeats=1, number=number) / (steps[0] if steps else 1))
    return times


def matmul_runner(n: int = 2048):
    """A jitted float32 ``n x n`` matmul, compiled, and its FLOPs: the roofline's probe."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    jax.block_until_ready(f(a, b))
    return (lambda: f(a, b)), 2 * n**3


def setup(model, x_all, terms=None, *, reconstruction="bce", lr=1e-3, binarize=False):
    """``(per_example, tx, params, fresh_state, zero_metrics)`` as the loop builds them (Adam at
    a constant rate, the default config's optimizer)."""
    per_example = step.make_per_example_fn(model, objectives.build(reconstruction, terms or {}),
                                           binarize=binarize)
    tx = optax.adam(optax.constant_schedule(lr), b1=0.9, b2=0.999)
    x = np.asarray(x_all[:BATCH])
    params = models.init(model, jax.random.PRNGKey(0), x)
    names = step.metric_names(per_example, params, x)
    fresh_state = lambda: jax.tree.map(np.asarray, step.TrainState.create(params, tx))
    zero_metrics = lambda: {k: np.zeros((), np.float32) for k in names}
    return per_example, tx, params, fresh_state, zero_metrics


def step_runner(model, terms, x_all, *, reconstruction="bce", lr=1e-3, mode="none",
                num_devices=1, steps_per_call=STEPS_PER_CALL, binarize=False):
    """The train loop's own fused step (gather + step + metric sums), ready to time.

    Returns ``(run, steps_per_call, num_weights)``: each ``run()`` takes ``steps_per_call``
    steps in one call, as the loop does between two log steps. ``mode`` and ``num_devices``
    choose the loop's placement (:class:`aejax.runtime.placement.Placement`).
    """
    per_example, tx, params, fresh_state, zero_metrics = setup(
        model, x_all, terms, reconstruction=reconstruction, lr=lr, binarize=binarize)
    place = Placement.create(mode, num_devices)
    step_fn = step.make_train_step(per_example, tx, axis_name="data" if place.per_device else None)
    spe = len(x_all) // BATCH
    run = place.fused_step(step_fn, BATCH, spe)
    x = place.replicate(np.asarray(x_all))
    perm = place.permutation(place.replicate(jax.random.PRNGKey(1)), len(x_all), 0)
    rng = place.replicate(jax.random.PRNGKey(2))
    holder = {"state": place.replicate(fresh_state()), "acc": place.replicate(zero_metrics())}

    def one():
        holder["state"], holder["acc"] = run(holder["state"], holder["acc"], x, perm,
                                             steps_per_call, rng)
        return holder["acc"]

    jax.block_until_ready(one())  # compile
    return one, steps_per_call, sum(np.size(p) for p in jax.tree.leaves(params) if np.ndim(p) == 2)


def fixed_batch_runner(model, x_all, *, steps_per_call=STEPS_PER_CALL):
    """The loop's program (``steps_per_call`` steps per call, metric sums) on one fixed batch.

    The same loop as :meth:`aejax.runtime.placement.Placement.fused_step` but without the input
    pipeline (the slice of the epoch's order and the gather of the batch): against the loop
    it gives what the input pipeline costs.
    """
    per_example, tx, _, fresh_state, zero_metrics = setup(model, x_all)
    batch = {"x": jax.device_put(np.asarray(x_all[:BATCH]))}
    step_fn = step.make_train_step(per_example, tx)

    def body(_, carry, batch, rng):
        state, metrics = step_fn(carry[0], batch, rng)
        return state, jax.tree.map(jnp.add, carry[1], metrics)

    run = jax.jit(lambda state, acc, batch, n, rng: jax.lax.fori_loop(
        0, n, functools.partial(body, batch=batch, rng=rng), (state, acc)), donate_argnums=(0, 1))
    holder = {"state": jax.device_put(fresh_state()), "acc": jax.device_put(zero_metrics())}
    rng = jax.random.PRNGKey(2)

    def one():
        holder["state"], holder["acc"] = run(holder["state"], holder["acc"], batch,
                                             steps_per_call, rng)
        return holder["acc"]

    jax.block_until_ready(one())
    return one, steps_per_call


def bare_runner(model, x_all, *, literal_pmap: bool = False):
    """The pure step (``step.make_train_step``), jitted, on one fixed already-placed batch.

    Against the loop's fused step it gives the cost of the device-resident input pipeline: the
    loop's step gathers its shuffled batch from the on-device dataset and adds the metrics to
    the accumulator; the bare step does neither. With ``literal_pmap`` it is
    ``step.make_pmap_step`` instead (``jax.pmap``, the state stacked on a leading axis of
    one device) on the same batch, for what ``jax.pmap`` itself costs.
    """
    per_example, tx, _, fresh_state, _ = setup(model, x_all)
    x, state = np.asarray(x_all[:BATCH]), fresh_state()
    if literal_pmap:
        step_fn = step.make_pmap_step(per_example, tx)
        batch = {"x": x[None]}  # a leading device axis of one device
        state = jax.tree.map(lambda a: a[None], state)
    else:
        step_fn = jax.jit(step.make_train_step(per_example, tx), donate_argnums=0)
        batch = {"x": x}
    batch, state = jax.device_put(batch), jax.device_put(state)
    holder = {"state": state}
    rng = jax.random.PRNGKey(2)

    def one():
        holder["state"], metrics = step_fn(holder["state"], batch, rng)
        return metrics

    jax.block_until_ready(one())
    return one


def parallel_steps(model, x_all, *, repeats: int, number: int = 100) -> list[dict]:
    """steps/s of the loop's step in every parallel mode on one device, and on all if several.

    The modes are timed in turns (:func:`interleaved`), ``repeats`` rounds of ``number`` steps.
    Also timed: ``jax.pmap`` itself (``step.make_pmap_step``, for scripts) against the bare
    jitted step, both on one fixed batch on one device.
    """
    cases = [("none", 1), ("sharded", 1), ("pmap", 1)]
    if jax.device_count() > 1:
        cases += [("sharded", jax.device_count()), ("pmap", jax.local_device_count())]
    runners = {}
    for case in cases:
        run, steps, _ = step_runner(model, {}, x_all, mode=case[0], num_devices=case[1])
        runners[case] = (run, max(number // steps, 1), steps)
    runners["bare"] = (bare_runner(model, x_all), number)
    runners["jax.pmap"] = (bare_runner(model, x_all, literal_pmap=True), number)
    times = interleaved(runners, rounds=repeats)
    records = [dict(name="parallel_step", mode=mode, devices=n, model="784-128-32-128-784",
                    batch=BATCH, steps_per_s=round(1 / times.best((mode, n)), 1),
                    time_ratio_to_single_device=round(times.ratio((mode, n), ("none", 1)), 3))
               for mode, n in cases]
    records.append(dict(name="jax_pmap_step", step="step.make_pmap_step", devices=1,
                        model="784-128-32-128-784", batch=BATCH,
                        steps_per_s=round(1 / times.best("jax.pmap"), 1),
                        time_ratio_to_jit_step=round(times.ratio("jax.pmap", "bare"), 3)))
    return records


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

    matmul, matmul_flops = matmul_runner()
    plain, spc, num_weights = step_runner(ae, {}, x_all)
    plain_runner = (plain, 100 // spc, spc)
    times = interleaved({"matmul": (matmul, 3), "loop": plain_runner,
                        "fixed": (fixed_batch_runner(ae, x_all)[0], 100 // spc, spc),
                        "bare": (bare_runner(ae, x_all), 100)}, rounds=4 * repeats)
    emit(name="matmul_roofline", n=2048, gflops=round(matmul_flops / times.best("matmul") / 1e9, 1))
    t_plain = times.best("loop")
    flops = 6 * num_weights * BATCH
    emit(name="train_step", model="784-128-32-128-784", batch=BATCH, optimizer="adam",
         steps_per_call=spc, steps_per_s=round(1 / t_plain, 1), gflops=round(flops / t_plain / 1e9, 1),
         fraction_of_roofline=round(times.ratio("matmul", "loop") * flops / matmul_flops, 3))
    emit(name="input_pipeline", model="784-128-32-128-784", batch=BATCH,
         loop_step_per_s=round(1 / t_plain, 1),
         fixed_batch_step_per_s=round(1 / times.best("fixed"), 1),
         overhead_fraction=round(1 - times.ratio("fixed", "loop"), 3))
    emit(name="one_step_per_call", model="784-128-32-128-784", batch=BATCH,
         step="jit(step.make_train_step), one fixed batch",
         steps_per_s=round(1 / times.best("bare"), 1),
         loop_speedup=round(times.ratio("bare", "loop"), 3))
    for record in parallel_steps(ae, x_all, repeats=2 * repeats):
        emit(**record)

    modes = ["best", "dense", "rev", "auto", "estimate"] + ([] if args.quick else ["fwd"])
    resolved = {"best": "one_hidden: exact quadratic form per example",
                "dense": "exact, Gram matrix of the first layer",
                "estimate": "unbiased estimate, 1 probe"}
    for mode in modes:
        steps = 1 if mode == "fwd" else 10
        run, _, _ = step_runner(ae, {"contractive": {"weight": 0.1, "mode": mode}}, x_all,
                                steps_per_call=steps)
        if mode == "fwd":  # ~1 s a step: one timing, against the plain step's
            t = best_time(run, repeats=1, number=3)
            ratio = t / t_plain
        else:
            pair = interleaved({"plain": plain_runner, "penalty": (run, 3, steps)}, rounds=repeats)
            t, ratio = pair.best("penalty"), pair.ratio("penalty", "plain")
        emit(name="contractive_step", mode=mode, method=resolved.get(mode, f"exact, jax {mode}-mode"),
             encoder="784-128-32 relu", steps_per_s=round(1 / t, 1), ratio_to_plain=round(ratio, 2))
    # Closed form for the one-layer sigmoid encoder, against the plain step of the same model.
    sig = models.MLPAutoencoder(hidden=(), code_size=128, code_activation="sigmoid")
    sig_plain = step_runner(sig, {}, x_all)
    sig_cf = step_runner(sig, {"contractive": {"weight": 0.1, "mode": "sigmoid"}}, x_all)
    pair = interleaved({"plain": (sig_plain[0], 100 // spc, spc),
                         "penalty": (sig_cf[0], 100 // spc, spc)}, rounds=repeats)
    emit(name="contractive_step", mode="sigmoid", method="closed form", encoder="784-128 sigmoid",
         steps_per_s=round(1 / pair.best("penalty"), 1),
         ratio_to_plain=round(pair.ratio("penalty", "plain"), 2))

    # The VAE of the same widths: 784-128-(mean, log-variance of 32)-128-784, binarized inputs.
    vae, _, _ = step_runner(models.VAE(hidden=(128,), latent_size=32), {"kl": {"weight": 1.0}},
                            x_all, binarize=True)
    pair = interleaved({"plain": plain_runner, "vae": (vae, 100 // spc, spc)}, rounds=repeats)
    emit(name="vae_step", model="VAE 784-128-32-128-784, Bernoulli, dynamic binarization",
         batch=BATCH, steps_per_s=round(1 / pair.best("vae"), 1),
         ratio_to_plain=round(pair.ratio("vae", "plain"), 2))

    if not args.skip_epoch:
        emit(**epoch_time())


def epoch_time() -> dict:
    """Seconds for one epoch (train + validation) of full Fashion-MNIST, compile excluded.

    Runs the real loop (``train_and_evaluate``) for 1 and for 3 epochs; the difference over 2 is
    the time of an epoch, so start-up and compilation cancel out.
    """
    import tempfile

    from aejax.data import splits as data_splits
    from aejax.runtime import config, trainer

    splits = data_splits.load("fashion_mnist", flat=True)
    c = config.default_config()
    c.update(progress=False, figures=False, pca_baseline=False, checkpoint_every_steps=10**9)
    times = {}
    for epochs in (1, 3):
        c.num_epochs = epochs
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            trainer.train_and_evaluate(c, d, splits=splits)
            times[epochs] = time.perf_counter() - t
    return dict(name="epoch", dataset="fashion_mnist", model="784-128-32-128-784", batch=BATCH,
                train_examples=len(splits.train[0]), validation_examples=len(splits.validation[0]),
                seconds=round((times[3] - times[1]) / 2, 3))


if __name__ == "__main__":
    main()
