"""Benchmarks, printed as JSON lines: ``python -m experiments.bench [--quick] [--parallel-only]
[--contractive-only] [--iwae-only] [--conv-only]`` (``--contractive-only``: the contractive
estimators of ``aejax.jacobians`` and the exact modes on the deep 784-1000-500-250-30 and the
conv encoder, as ratios to each one's plain step; not in the default run).

Everything is measured side by side in one run, so ratios hold on a shared, noisy machine:
a float32 matmul roofline; the train loop's step for the 784-128-32-128-784 autoencoder
(batch 256, Adam; 50 steps per call, as the loop runs them between log steps) against it; the
input pipeline's share of that step; the same step data-parallel (sharded and pmap, as the loop
runs them) against the single-device step, and ``jax.pmap`` itself; the contractive penalty's
modes and the VAE as ratios to the plain step; the deep 784-1000-500-250-30 and the
convolutional autoencoder's steps (on a CPU the latter also with every convolution XLA's,
``xla_convolutions_over_auto``, and as a ``while_loop``); the test-NLL evaluation (the
importance-weighted bound of Burda et al.'s 784-200-200-50 VAE, ``aejax.vae.evaluate_nll``'s
batch function); one epoch of full Fashion-MNIST. Every record names the
device (``device``: on a CPU its processor, cores and vector unit), so a run on a GPU, or on
another CPU, gives its figures as they are.

Each model's step is also timed against two references, in the same rounds:

* its own limit (``fraction_of_own_limit``): the step's own matrix products and convolutions,
  forward and backward, at their shapes (read from the step's program, :func:`own_products`),
  run alone in one compiled function (:func:`limit_runner`). What the step does besides them
  (activations, the loss, Adam, the batch gather) is the rest of its time;
* its PyTorch twin (``ratio_to_pytorch``, PyTorch's time over aejax's: above 1 aejax is
  faster), from ``experiments/peers/pytorch.py``: the same model, loss, Adam, batch and initial
  weights, in eager PyTorch with as many threads as XLA uses (``ratio_to_pytorch_one_thread``:
  on one). Skipped when torch is not installed.

Physical checks: no step is faster than its own limit or than its FLOPs at the run's matmul
rate, and an epoch is not faster than its train steps (``physical`` in each record). The bench
exits with status 1, after naming them, when a record fails its check: a bug, not a result.

The last record (``targets``) sets the run's figures against the bench's targets
(:data:`TARGETS`): each one's value, whether it is met, and for a ratio to PyTorch whether the
step's own products alone would meet it (``own_limit_ratio_to_pytorch``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import platform
import sys
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend.core import Literal, jaxprs_in_params

from aejax import jacobians, models, objectives, step, vae
from aejax.data import batching
from aejax.runtime.placement import Placement

BATCH = 256
# Steps per call of the loop's step: the loop runs every step up to its next log step in one
# call, and logs every 50 steps by default (config.default_config().log_every_steps).
STEPS_PER_CALL = 50


def cpu_description(cpuinfo: str, cores: int) -> str:
    """``"cpu (PROCESSOR, N cores, ISA)"`` from the text of ``/proc/cpuinfo``: CPU figures
    depend on the processor, the cores the process may use and the widest vector unit (XLA
    compiles for it), so a record names all three. Parts that the text lacks are left out."""
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set((fields.get("flags") or fields.get("Features", "")).split())  # x86 or Arm
    isa = next((name for flag, name in (("avx512f", "avx512"), ("avx2", "avx2"), ("avx", "avx"),
                                        ("asimd", "neon")) if flag in flags), None)
    model = fields.get("model name") or fields.get("Model") or fields.get("CPU part")
    parts = [model, f"{cores} cores" if cores > 1 else f"{cores} core", isa]
    return "cpu (" + ", ".join(p for p in parts if p) + ")"


@functools.cache
def device_description() -> str:
    """The device that every record names: JAX's device kind, and on a CPU
    :func:`cpu_description` of this machine."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        return device.device_kind
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
    except OSError:  # not Linux
        cpuinfo = f"model name: {platform.processor()}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cpu_description(cpuinfo, cores or 1)


def emit(**record) -> dict:
    record.setdefault("device", device_description())
    print(json.dumps(record), flush=True)
    return record


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

    def ratios(self, name, base) -> list[float]:
        """``name``'s time over ``base``'s in each round."""
        return [a / b for a, b in zip(self[name], self[base])]

    def ratio(self, name, base) -> float:
        """Median over rounds of ``name``'s time over ``base``'s in the same round.

        Both were timed seconds apart, so load that comes and goes between rounds cancels.
        """
        return float(np.median(self.ratios(name, base)))


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


# --------------------------------------------------------------------------- each step's own limit

# The primitives a step's own limit times; everything else a step does is the rest of its time.
PRODUCTS = ("dot_general", "conv_general_dilated")
# Primitives that only call their one jaxpr: the products inside them are the step's.
CALLS = ("jit", "pjit", "closed_call", "core_call", "remat", "checkpoint", "custom_jvp_call",
         "custom_vjp_call", "custom_vjp_call_jaxpr")


class Product(NamedTuple):
    """One matrix product or convolution of a step: its primitive, parameters and operands."""

    primitive: Any
    params: dict
    operands: tuple  # jax.core.ShapedArray of each operand


def _has_products(jaxpr) -> bool:
    return any(e.primitive.name in PRODUCTS or any(map(_has_products, jaxprs_in_params(e.params)))
               for e in jaxpr.eqns)


def own_products(fn: Callable, *args) -> tuple[Product, ...]:
    """The matrix products and convolutions that ``fn(*args)`` computes, forward and backward.

    Read from ``fn``'s jaxpr, through the calls in it (``jit``, custom derivatives). A product
    of the same operands with the same parameters is counted once, as XLA computes it once (the
    contractive penalty's second pass through the encoder's first layer is the model's own):
    values are numbered by what computes them. A dense layer of a train step gives ``X @ W``,
    ``dY @ W.T`` and ``X.T @ dY``, but the first layer no ``dY @ W.T``: nothing needs the
    input's gradient.

    Raises:
      ValueError: a product inside a loop or a conditional, whose count the jaxpr does not give.
    """
    closed = jax.make_jaxpr(fn)(*args)
    found: dict = {}
    fresh = itertools.count()

    def walk(jaxpr, inputs):
        env = {v: ("const", next(fresh)) for v in jaxpr.constvars}
        env.update(zip(jaxpr.invars, inputs))
        read = lambda v: ("literal", str(v.val), str(v.aval)) if isinstance(v, Literal) else env[v]
        for eqn in jaxpr.eqns:
            keys = tuple(read(v) for v in eqn.invars)
            name, subs = eqn.primitive.name, list(jaxprs_in_params(eqn.params))
            if name in CALLS and len(subs) == 1 and len(subs[0].invars) == len(keys):
                outs = walk(subs[0], keys)
            elif subs:
                if any(map(_has_products, subs)):
                    raise ValueError(f"own_products: matrix products inside {name!r}; their count "
                                     "depends on its trip count or branch.")
                outs = [("opaque", next(fresh))] * len(eqn.outvars)
            else:
                params = dict(eqn.params)
                if params.get("preferred_element_type", 0) is None:  # None: the output's dtype
                    params["preferred_element_type"] = eqn.outvars[0].aval.dtype
                key = (name, str(sorted(params.items())), keys)
                if name in PRODUCTS and key not in found:
                    found[key] = Product(eqn.primitive, dict(eqn.params),
                                         tuple(v.aval for v in eqn.invars))
                outs = [(key, i) for i in range(len(eqn.outvars))]
            env.update(zip(eqn.outvars, outs))
        return [read(v) for v in jaxpr.outvars]

    walk(closed.jaxpr, [("arg", i) for i in range(len(closed.jaxpr.invars))])
    return tuple(found.values())


def product_flops(products: tuple[Product, ...]) -> float:
    """FLOPs of computing every product once, as XLA counts them (a SAME convolution's taps
    that fall in the padding are not counted)."""
    operands = [[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in p.operands] for p in products]
    once = lambda ops: [p.primitive.bind(*o, **p.params) for p, o in zip(products, ops)]
    analysis = jax.jit(once).lower(operands).cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis.get("flops", 0.0))


def limit_runner(products: tuple[Product, ...]) -> Callable[[], Any]:
    """A step's own limit: its products alone, each computed once per call, in one function.

    Random operands of the products' shapes; the products run one after another, each waiting
    for the one before, as a step's layers do. One step per call, in straight-line code: inside
    a loop (where the loop's fused step runs) XLA's CPU backend does not rewrite convolutions
    for its fast kernels (the conv step's kernel gradients took several times as long there),
    and repeated in straight-line code, a product of the same operands is computed once. The
    limit is what the step would take if it did nothing else, as fast as XLA computes its
    products, plus one dispatch per call (tens of microseconds).
    """
    keys = iter(jax.random.split(jax.random.PRNGKey(3), sum(len(p.operands) for p in products)))
    operands = tuple(tuple(jax.random.normal(next(keys), a.shape, a.dtype)
                           if jnp.issubdtype(a.dtype, jnp.floating) else jnp.zeros(a.shape, a.dtype)
                           for a in p.operands) for p in products)

    def chain(operands):
        after, outputs = jnp.zeros(()), []
        for p, ops in zip(products, operands):
            ops, _ = jax.lax.optimization_barrier((ops, after))  # wait for the product before
            after = p.primitive.bind(*ops, **p.params)
            outputs.append(after)
        return outputs  # all of them, or XLA would compute only the last

    run = jax.jit(chain)
    jax.block_until_ready(run(operands))
    return lambda: run(operands)


# --------------------------------------------------------------------------- the steps


def setup(model, x_all, terms=None, *, reconstruction="bce", lr=1e-3, binarize=False,
          binarize_method="threefry", objective=None):
    """``(per_example, tx, params, fresh_state, zero_metrics)`` as the loop builds them (Adam at
    a constant rate, the default config's optimizer); ``objective`` replaces the one built from
    ``reconstruction`` and ``terms``."""
    objective = objective or objectives.build(reconstruction, terms or {})
    per_example = step.make_per_example_fn(model, objective, binarize=binarize,
                                           binarize_method=binarize_method)
    tx = optax.adam(optax.constant_schedule(lr), b1=0.9, b2=0.999)
    x = np.asarray(x_all[:BATCH])
    # Jitted: run op by op, the convolutional model's init compiles every small op alone
    # (over a minute on a busy 2-core CPU).
    params = jax.jit(functools.partial(models.init, model))(jax.random.PRNGKey(0), x)
    names = step.metric_names(per_example, params, x)
    fresh_state = lambda: jax.tree.map(np.asarray, step.TrainState.create(params, tx))
    zero_metrics = lambda: {k: np.zeros((), np.float32) for k in names}
    return per_example, tx, params, fresh_state, zero_metrics


class StepRunner(NamedTuple):
    """The loop's fused step of one model and objective, compiled (:func:`step_runner`).

    Attributes:
      run: takes ``steps_per_call`` steps per call.
      steps_per_call: steps per call of ``run``.
      products: the step's own matrix products and convolutions (:func:`own_products`).
      params: the initial parameters (a twin starts from them).
    """

    run: Callable[[], Any]
    steps_per_call: int
    products: tuple
    params: Any

    def timed(self, number: int) -> tuple:
        """``(run, number, steps_per_call)`` for :func:`interleaved`."""
        return self.run, number, self.steps_per_call

    def limit(self, number: int) -> tuple:
        """The step's own limit (:func:`limit_runner`), for :func:`interleaved`: as many steps
        per timing as ``timed(number)``, one per call."""
        return limit_runner(self.products), number * self.steps_per_call


def step_runner(model, terms, x_all, *, reconstruction="bce", lr=1e-3, mode="none",
                num_devices=1, steps_per_call=STEPS_PER_CALL, binarize=False,
                binarize_method="threefry", objective=None, loop=None) -> StepRunner:
    """The train loop's own fused step (gather + step + metric sums), ready to time.

    Each ``run()`` takes ``steps_per_call`` steps in one call, as the loop does between two log
    steps. ``mode`` and ``num_devices`` choose the loop's placement
    (:class:`aejax.runtime.placement.Placement`); ``loop`` is ``fused_step``'s (None: the
    loop's own choice, a program of one step per call for a convolutional step on a CPU).
    """
    per_example, tx, params, fresh_state, zero_metrics = setup(
        model, x_all, terms, reconstruction=reconstruction, lr=lr, binarize=binarize,
        binarize_method=binarize_method, objective=objective)
    place = Placement.create(mode, num_devices)
    products = own_products(step.make_train_step(per_example, tx), fresh_state(),
                            {"x": np.asarray(x_all[:BATCH])}, jax.random.PRNGKey(2))
    step_fn = step.make_train_step(per_example, tx, axis_name="data" if place.per_device else None)
    spe = len(x_all) // BATCH
    run = place.fused_step(step_fn, BATCH, spe, loop=loop)
    x = place.replicate(np.asarray(x_all))
    perm = place.permutation(place.replicate(jax.random.PRNGKey(1)), len(x_all), 0)
    rng = place.replicate(jax.random.PRNGKey(2))
    holder = {"state": place.replicate(fresh_state()), "acc": place.replicate(zero_metrics())}

    def one():
        holder["state"], holder["acc"] = run(holder["state"], holder["acc"], x, perm,
                                             steps_per_call, rng)
        return holder["acc"]

    jax.block_until_ready(one())  # compile
    return StepRunner(one, steps_per_call, products, params)


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
        runner = step_runner(model, {}, x_all, mode=case[0], num_devices=case[1])
        runners[case] = runner.timed(max(number // runner.steps_per_call, 1))
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


# --------------------------------------------------------------------------- the PyTorch twins


def load_pytorch():
    """``(experiments.peers.pytorch, device)``: PyTorch on JAX's platform, with as many CPU
    threads as XLA uses; ``(None, reason)`` when it cannot run beside this JAX."""
    try:
        from experiments.peers import pytorch
    except ImportError:
        return None, "torch is not installed (pip install -e '.[peers]')"
    platform = jax.default_backend()
    if platform == "gpu" and pytorch.torch.cuda.is_available():
        return pytorch, "cuda"
    if platform != "cpu":
        return None, f"JAX runs on {platform}, where this torch cannot"
    pytorch.torch.set_num_threads(pytorch.jax_cpu_threads())
    return pytorch, "cpu"


def twin_runner(pytorch, device, model, params, x_all, terms=None, *, steps_per_call: int,
                binarize: bool = False, threads: Optional[int] = None):
    """The PyTorch twin of an aejax step (``experiments.peers.pytorch.Runner``), from the same
    initial weights, on the same training set (NCHW for images), warmed up; None without torch.

    ``threads``: PyTorch's intra-op threads while it runs (default: as many as XLA uses).
    """
    if pytorch is None:
        return None
    net = pytorch.load_flax(pytorch.mirror(model), params)
    x = np.asarray(x_all)
    x = x.transpose(0, 3, 1, 2) if x.ndim == 4 else x
    if threads is None and device == "cpu":
        threads = pytorch.jax_cpu_threads()
    run = pytorch.Runner(net, x, np.random.default_rng(1).permutation(len(x)), batch_size=BATCH,
                         terms={k: v["weight"] for k, v in (terms or {}).items()},
                         binarize=binarize, steps_per_call=steps_per_call, device=device,
                         threads=threads)
    run()
    return run


def against_references(times: Timings, name, flops: float, matmul_flops: float) -> dict:
    """A step's record fields: its rate, its FLOPs (of its own products), its fraction of the
    roofline and of its own limit, its ratio to its PyTorch twin, and the physical check.

    Fractions and ratios are medians over rounds of the timings taken in the same round.
    ``times`` holds ``name``, ``(name, "limit")``, ``"matmul"`` (:func:`matmul_runner`) and,
    where the twin ran, ``(name, "pytorch")`` (as many threads as XLA) and ``(name,
    "pytorch_1")`` (one thread).
    """
    t = times.best(name)
    roofline_rounds = [r * flops / matmul_flops for r in times.ratios("matmul", name)]
    fields = dict(steps_per_s=round(1 / t, 1), gflop_per_step=round(flops / 1e9, 4),
                  gflops=round(flops / t / 1e9, 1),
                  fraction_of_roofline=round(float(np.median(roofline_rounds)), 3),
                  **limit_and_twin(times, name, (name, "pytorch")))
    if (name, "pytorch_1") in times:
        fields.update(pytorch_one_thread_steps_per_s=round(1 / times.best((name, "pytorch_1")), 1),
                      ratio_to_pytorch_one_thread=round(times.ratio((name, "pytorch_1"), name), 2))
    # A step does all of its products and more: it cannot be faster than either reference. It
    # fails the check when it was faster in every round; a step that is nearly all products
    # (the convolutional one on a CPU) comes within the noise of its limit in some rounds.
    # ``limit_and_twin`` gave the check against the limit (``times`` always holds one here).
    fields["physical"] = bool(min(roofline_rounds) <= 1 and fields["physical"])
    return fields


def limit_and_twin(times: Timings, name, twin) -> dict:
    """The fields of a step ``name`` that its own limit, ``(name, "limit")``, and its PyTorch
    twin, ``twin``, give where ``times`` holds them: medians over rounds of the timings taken in
    the same round; with the limit, ``physical``: false when the step beat its own products in
    every round."""
    fields = {}
    limit = (name, "limit")
    if limit in times:
        own_rounds = times.ratios(limit, name)
        fields.update(fraction_of_own_limit=round(float(np.median(own_rounds)), 3),
                      physical=bool(min(own_rounds) <= 1))
    if twin in times:
        fields.update(pytorch_steps_per_s=round(1 / times.best(twin), 2),
                      ratio_to_pytorch=round(times.ratio(twin, name), 2))
        if limit in times:
            # PyTorch's step over this step's own products alone: the ratio to PyTorch that no
            # arrangement of the rest of the step can exceed.
            fields["own_limit_ratio_to_pytorch"] = round(times.ratio(twin, limit), 2)
    return fields


# --------------------------------------------------------------------------- targets

# The bench's targets: (record name, contractive mode or None, field, "min" or "max", bar).
# Every other record with a ratio to PyTorch has the bar 1.0 (not slower than PyTorch).
TARGETS = (
    ("train_step", None, "fraction_of_own_limit", "min", 0.70),
    ("deep_step", None, "fraction_of_own_limit", "min", 0.70),
    ("vae_step", None, "counter_binarization_over_fixed_inputs", "max", 1.15),
    ("conv_step", None, "ratio_to_pytorch", "min", 1.3),
    ("contractive_step", "rev", "ratio_to_pytorch", "min", 1.5),
    ("contractive_step", "auto", "ratio_to_pytorch", "min", 1.5),
)


def targets(records: list[dict]) -> dict:
    """Each target of :data:`TARGETS` (and 1.0 for every other ratio to PyTorch) against the
    run's records: its value, ``met`` (the value on the bar's side, bar included) and, for a
    ratio to PyTorch, ``within_own_limit``: whether the bar is below the step's own products'
    ratio (``own_limit_ratio_to_pytorch``), i.e. reachable at all with these products' kernels.

    A target applies to every record of its name and mode: ``--contractive-only`` sets the
    exact contractive steps of each encoder against the same bar (each row names its
    ``encoder``). A target whose record or field the run did not produce (``--conv-only``, no
    torch) is left out."""
    rows = []
    for r in records:
        bars = [(field, side, bar) for name, mode, field, side, bar in TARGETS
                if (name, mode) == (r.get("name"), r.get("mode"))]
        if "ratio_to_pytorch" in r and all(field != "ratio_to_pytorch" for field, _, _ in bars):
            bars.append(("ratio_to_pytorch", "min", 1.0))
        for field, side, bar in bars:
            value = r.get(field)
            if value is None:
                continue
            row = dict(record=r["name"], **{k: r[k] for k in ("mode", "encoder") if r.get(k)},
                       field=field, bar=f"{'>=' if side == 'min' else '<='} {bar}", value=value,
                       met=bool(value >= bar if side == "min" else value <= bar))
            ceiling = r.get("own_limit_ratio_to_pytorch")
            if field == "ratio_to_pytorch" and ceiling is not None:
                row["within_own_limit"] = bool(ceiling >= bar)
            rows.append(row)
    return dict(met=sum(r["met"] for r in rows), of=len(rows), targets=rows)


# --------------------------------------------------------------------------- test NLL


IWAE_MODEL = "VAE 784-200-200-50 tanh, Bernoulli (Burda et al. 2016)"


def iwae_eval_runner(x_all, *, num_samples: int, images: int = 100):
    """``evaluate_nll``'s jitted batch function on ``images`` binarized images of ``x_all``.

    Returns ``(run, chunks, chunk_size, chunk_products)``: one ``run()`` bounds every image with
    ``num_samples`` importance samples in ``chunks`` chunks (a scan); ``chunk_products`` are the
    matrix products of one chunk (the decoder on ``chunk_size * images`` rows; the encoder runs
    once per call and is not counted), the unit the record's rates are given in.
    """
    model = models.create("vae", hidden=(200, 200), latent_size=50, activation="tanh",
                          likelihood="bernoulli")
    x = (np.asarray(x_all[:images]) > 0.5).astype(np.float32)
    params = jax.jit(functools.partial(models.init, model))(jax.random.PRNGKey(0), x)
    chunk = vae.eval_chunk_size(num_samples, images)
    chunks = -(-num_samples // chunk)
    rng = jax.random.PRNGKey(1)
    run = lambda: vae._batch_iwae(params, x, rng, np.int32(0), None, model=model,
                                  num_samples=num_samples, chunk_size=chunk)
    jax.block_until_ready(run())  # compile

    _, log_lik_fn = vae._bind(model, params)
    posterior = model.apply({"params": params}, x, method="posterior")
    products = own_products(lambda post, xb: vae._log_weights_at(post, log_lik_fn, xb, rng,
                                                                 jnp.arange(chunk)), posterior, x)
    return run, chunks, chunk, products


def iwae_evaluation(x_all, matmul, matmul_flops, *, num_samples: int, rounds: int) -> dict:
    """The IWAE test-NLL record: rates per chunk against the roofline and the chunk's own
    products, and the time the full 10,000-image test set takes at ``num_samples``."""
    images = 100
    run, chunks, chunk, products = iwae_eval_runner(x_all, num_samples=num_samples, images=images)
    times = interleaved({"matmul": (matmul, 1), "iwae": (run, 1, chunks),
                         ("iwae", "limit"): (limit_runner(products), chunks)}, rounds=rounds)
    fields = against_references(times, "iwae", product_flops(products), matmul_flops)
    per_image = times.best("iwae") * chunks / images
    fields = {("chunks_per_s" if k == "steps_per_s" else
               "gflop_per_chunk" if k == "gflop_per_step" else k): v for k, v in fields.items()}
    return dict(name="iwae_evaluation", model=IWAE_MODEL, images_per_call=images,
                num_samples=num_samples, chunk_size=chunk, **fields,
                seconds_per_image=round(per_image, 5),
                test_set_seconds=round(10000 * per_image * 5000 / num_samples, 1),
                test_set_note="10,000 images at k = 5000, from this record's rate")


# --------------------------------------------------------------------------- the run


def contractive_steps(model, encoder: str, x_all, *, rounds: int, exact: tuple[str, ...],
                      num_probes: int = 3, steps: int = 2, pytorch=None,
                      torch_device=None, limits: bool = True) -> list[dict]:
    """The contractive penalty (weight 0.1) on ``model``'s encoder: each of
    :data:`aejax.jacobians.ESTIMATORS` at ``num_probes`` Jacobian products per example, and the
    exact modes ``exact``, as ratios to the same autoencoder's plain step, timed in turns with it
    and, with ``pytorch`` (:func:`load_pytorch`), with the PyTorch twin of the exact step
    (``torch.func.jacrev``, as many threads as XLA uses). ``limits``: each exact step is also
    timed against its own products alone (:func:`limit_runner`)."""
    plain = step_runner(model, {}, x_all, steps_per_call=steps)
    runners = {"plain": plain.timed(1)}
    for estimator in jacobians.ESTIMATORS:
        term = lambda f, e=estimator: jacobians.contractive_estimate(
            f.encode, f.x_in, f.rng, estimator=e, num_probes=num_probes)
        objective = objectives.combine({"reconstruction": (1.0, objectives.reconstruction("bce")),
                                        "contractive": (0.1, term)})
        runners[estimator] = step_runner(model, {}, x_all, steps_per_call=steps,
                                         objective=objective).timed(1)
    for mode in exact:
        exact_step = step_runner(model, {"contractive": {"weight": 0.1, "mode": mode}}, x_all,
                                 steps_per_call=steps)
        runners[mode] = exact_step.timed(1)
        if limits:
            runners[mode, "limit"] = exact_step.limit(1)
    if pytorch is not None:
        twin = twin_runner(pytorch, torch_device, model, plain.params, x_all,
                           {"contractive": {"weight": 0.1}}, steps_per_call=steps)
        runners["pytorch"] = (twin, 1, steps)
    method = {"gaussian": "Hutchinson, Gaussian probes", "rademacher": "Hutchinson, Rademacher "
              "probes", "hutch++": "Hutch++", "dense": "exact, Gram matrix of the first layer",
              "rev": "exact, one batched VJP per code unit"}
    times = interleaved(runners, rounds=rounds)
    records = []
    for name in (*jacobians.ESTIMATORS, *exact):
        record = dict(name="contractive_step", mode=name, method=method[name], encoder=encoder,
                      batch=BATCH, steps_per_s=round(1 / times.best(name), 2),
                      ratio_to_plain=round(times.ratio(name, "plain"), 2))
        if name in jacobians.ESTIMATORS:
            record["num_probes"] = num_probes
            records.append(record)
            continue
        records.append({**record, **limit_and_twin(times, name, "pytorch")})
    return records


def encoder_contractive_steps(x_all, *, rounds: int, pytorch=None,
                              torch_device=None) -> list[dict]:
    """:func:`contractive_steps` on the deep encoder 784-1000-500-250-30 (ReLU, linear code;
    exact ``dense`` and ``rev``) and on the conv encoder of configs/conv.py (exact ``rev``: 128
    code units; ``dense`` needs dense layers), each with its PyTorch twin where torch is
    installed. The conv encoder's exact step is not timed against its own limit: with it, on
    this project's 24 GB machine, the run held 13 to 15 GB and had not ended after 10 minutes
    (6.5 minutes without it)."""
    deep = models.MLPAutoencoder(hidden=(1000, 500, 250), code_size=30, activation="relu")
    records = contractive_steps(deep, "784-1000-500-250-30 relu", x_all, rounds=rounds,
                                exact=("dense", "rev"), pytorch=pytorch,
                                torch_device=torch_device)
    x_img = x_all[:BATCH * 4].reshape(-1, 28, 28, 1)
    return records + contractive_steps(models.ConvAutoencoder(), "conv 16-8-8 (configs/conv.py)",
                                       x_img, rounds=rounds, exact=("rev",), steps=1,
                                       pytorch=pytorch, torch_device=torch_device, limits=False)


def not_physical(records: list[dict]) -> None:
    """Exits with status 1, naming them, when records fail their physical checks."""
    failed = [r for r in records if r.get("physical") is False]
    if failed:
        print("Not physical (a bug in the step or the bench, not a result): "
              + "; ".join(json.dumps(r) for r in failed), file=sys.stderr)
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and no fwd-mode Jacobian")
    parser.add_argument("--skip-epoch", action="store_true", help="skip the full-epoch timing (no data)")
    parser.add_argument("--parallel-only", action="store_true",
                        help="only the data-parallel steps against the single-device step")
    parser.add_argument("--contractive-only", action="store_true",
                        help="only the contractive estimators and exact modes on the deep and the "
                             "conv encoder")
    parser.add_argument("--conv-only", action="store_true",
                        help="only the plain and the convolutional step (and their references)")
    parser.add_argument("--iwae-only", action="store_true",
                        help="only the test-NLL evaluation (the IWAE bound) against the roofline")
    args = parser.parse_args()
    repeats = 3 if args.quick else 5
    x_all = jax.random.uniform(jax.random.PRNGKey(0), (BATCH * 40, 784), jnp.float32)
    ae = models.MLPAutoencoder(hidden=(128,), code_size=32, activation="relu")
    if args.parallel_only:
        for record in parallel_steps(ae, x_all, repeats=2 * repeats):
            emit(**record)
        return
    if args.contractive_only:
        pytorch, torch_device = load_pytorch()
        records = [emit(**record) for record in encoder_contractive_steps(
            x_all, rounds=repeats, pytorch=pytorch, torch_device=torch_device)]
        emit(name="targets", **targets(records))
        not_physical(records)
        return
    if args.iwae_only:
        matmul, matmul_flops = matmul_runner()
        record = emit(**iwae_evaluation(x_all, matmul, matmul_flops,
                                        num_samples=1000 if args.quick else 5000, rounds=repeats))
        sys.exit(0 if record["physical"] else 1)
    records = []
    pytorch, torch_device = load_pytorch()
    if pytorch is None:
        records.append(emit(name="pytorch", skipped=torch_device))
    else:
        records.append(emit(name="pytorch", version=pytorch.torch.__version__, mode="eager",
                            torch_device=torch_device, threads=pytorch.torch.get_num_threads(),
                            jax_cpu_threads=pytorch.jax_cpu_threads()))
    one_thread = torch_device == "cpu" and pytorch.jax_cpu_threads() > 1

    def add_twins(runners, key, model, params, x, terms=None, *, steps=5, binarize=False):
        """The step's PyTorch twin, on as many threads as XLA uses and, on a CPU with several,
        also on one: where other jobs share the cores, OpenMP's threads (PyTorch's) lose more to
        waiting for each other than XLA's, and one thread can be the faster. PyTorch's eager
        steps gain nothing from more steps per call: ``steps`` per timing."""
        if pytorch is None:
            return
        for suffix, threads in [("pytorch", None)] + ([("pytorch_1", 1)] if one_thread else []):
            run = twin_runner(pytorch, torch_device, model, params, x, terms, steps_per_call=steps,
                              binarize=binarize, threads=threads)
            runners[(*key, suffix) if isinstance(key, tuple) else (key, suffix)] = (run, 1, steps)

    matmul, matmul_flops = matmul_runner()
    plain = step_runner(ae, {}, x_all)
    spc = plain.steps_per_call
    if not args.conv_only:  # everything but the model cases below
        runners = {"matmul": (matmul, 3), "loop": plain.timed(100 // spc),
                   "fixed": (fixed_batch_runner(ae, x_all)[0], 100 // spc, spc),
                   "bare": (bare_runner(ae, x_all), 100), ("loop", "limit"): plain.limit(100 // spc)}
        add_twins(runners, "loop", ae, plain.params, x_all, steps=10)
        times = interleaved(runners, rounds=4 * repeats)
        records.append(emit(name="matmul_roofline", n=2048,
                            gflops=round(matmul_flops / times.best("matmul") / 1e9, 1)))
        t_plain = times.best("loop")
        records.append(emit(name="train_step", model="784-128-32-128-784", batch=BATCH,
                            optimizer="adam", steps_per_call=spc,
                            **against_references(times, "loop", product_flops(plain.products),
                                                 matmul_flops)))
        records.append(emit(name="input_pipeline", model="784-128-32-128-784", batch=BATCH,
                            loop_step_per_s=round(1 / t_plain, 1),
                            fixed_batch_step_per_s=round(1 / times.best("fixed"), 1),
                            overhead_fraction=round(1 - times.ratio("fixed", "loop"), 3)))
        records.append(emit(name="one_step_per_call", model="784-128-32-128-784", batch=BATCH,
                            step="jit(step.make_train_step), one fixed batch",
                            steps_per_s=round(1 / times.best("bare"), 1),
                            loop_speedup=round(times.ratio("bare", "loop"), 3)))
        for record in parallel_steps(ae, x_all, repeats=2 * repeats):
            records.append(emit(**record))

        # The contractive modes, their limits, the plain step and one PyTorch twin in the same rounds:
        # (steps per call, calls per timing) of each, less of the costly ones.
        calls = {"best": (10, 3), "dense": (10, 2), "rev": (5, 2), "auto": (5, 2), "estimate": (10, 3)}
        if not args.quick:
            calls["fwd"] = (1, 1)  # ~1 s a step
        resolved = {"best": "one_hidden: exact quadratic form per example",
                    "dense": "exact, Gram matrix of the first layer",
                    "estimate": "unbiased estimate, 1 probe"}
        runners = {"matmul": (matmul, 1), "plain": plain.timed(2)}
        contractive = {}
        for mode, (steps, number) in calls.items():
            terms = {"contractive": {"weight": 0.1, "mode": mode}}
            contractive[mode] = step_runner(ae, terms, x_all, steps_per_call=steps)
            runners[mode] = contractive[mode].timed(number)
            runners[mode, "limit"] = contractive[mode].limit(number)
        add_twins(runners, ("exact",), ae, plain.params, x_all, {"contractive": {"weight": 0.1}},
                  steps=2)
        times = interleaved(runners, rounds=repeats)
        for mode in calls:
            for suffix in ("pytorch", "pytorch_1"):
                if mode != "estimate" and ("exact", suffix) in times:  # the twin's penalty is exact
                    times[mode, suffix] = times["exact", suffix]
            records.append(emit(name="contractive_step", mode=mode,
                                method=resolved.get(mode, f"exact, jax {mode}-mode"),
                                encoder="784-128-32 relu",
                                ratio_to_plain=round(times.ratio(mode, "plain"), 2),
                                **against_references(times, mode,
                                                     product_flops(contractive[mode].products),
                                                     matmul_flops)))
        # Closed form for the one-layer sigmoid encoder, against the plain step of the same model.
        sig = models.MLPAutoencoder(hidden=(), code_size=128, code_activation="sigmoid")
        sig_plain = step_runner(sig, {}, x_all)
        sig_cf = step_runner(sig, {"contractive": {"weight": 0.1, "mode": "sigmoid"}}, x_all)
        times = interleaved({"matmul": (matmul, 1), "plain": sig_plain.timed(100 // spc),
                             "penalty": sig_cf.timed(100 // spc),
                             ("penalty", "limit"): sig_cf.limit(100 // spc)}, rounds=repeats)
        records.append(emit(name="contractive_step", mode="sigmoid", method="closed form",
                            encoder="784-128 sigmoid",
                            ratio_to_plain=round(times.ratio("penalty", "plain"), 2),
                            **against_references(times, "penalty", product_flops(sig_cf.products),
                                                 matmul_flops)))

    # The VAE of the same widths: 784-128-(mean, log-variance of 32)-128-784, binarized inputs;
    # then the deep and the convolutional autoencoder (fewer steps per call: their steps take
    # tens and hundreds of ms on a CPU).
    vae_model = models.VAE(hidden=(128,), latent_size=32)
    deep = models.MLPAutoencoder(hidden=(1000, 500, 250), code_size=30)
    x_img = x_all.reshape(-1, 28, 28, 1)
    # (name, description, model, terms, data, binarize, steps per call, calls per timing)
    cases = [("vae_step", "VAE 784-128-32-128-784, Bernoulli, dynamic binarization", vae_model,
              {"kl": {"weight": 1.0}}, x_all, True, spc, 100 // spc),
             ("deep_step", "784-1000-500-250-30, relu, linear code", deep, {}, x_all, False, 5, 1),
             ("conv_step", "conv 16-8-8, nearest upsampling (configs/conv.py)",
              models.ConvAutoencoder(), {}, x_img, False, 2, 1)]
    if args.conv_only:
        cases = cases[-1:]
    for name, description, model, terms, x, binarize, steps, number in cases:
        runner = step_runner(model, terms, x, binarize=binarize, steps_per_call=steps)
        runners = {"matmul": (matmul, 1), "plain": plain.timed(100 // spc),
                   name: runner.timed(number), (name, "limit"): runner.limit(number)}
        if name == "conv_step" and jax.default_backend() == "cpu":
            # The loop's program too, and the step with every convolution XLA's (what
            # aejax.convolution's CPU forms save).
            runners[name, "loop"] = step_runner(model, terms, x, steps_per_call=steps,
                                                loop=True).timed(number)
            runners[name, "xla"] = step_runner(model.clone(conv_lowering="xla"), terms, x,
                                               steps_per_call=steps).timed(number)
        if binarize:  # the same step on inputs binarized once: what the per-step draw costs
            fixed = np.asarray(batching.binarize(jax.random.PRNGKey(1), jnp.asarray(x)))
            runners[name, "fixed"] = step_runner(model, terms, fixed, binarize=False,
                                                 steps_per_call=steps).timed(number)
            # The same step drawing with the counter-based generator (data.binarize_method).
            runners[name, "counter"] = step_runner(model, terms, x, binarize=True,
                                                   binarize_method="counter",
                                                   steps_per_call=steps).timed(number)
        add_twins(runners, name, model, runner.params, x, terms, steps=min(steps, 5),
                  binarize=binarize)
        times = interleaved(runners, rounds=repeats)
        records.append(emit(name=name, model=description, batch=BATCH, optimizer="adam",
                            steps_per_call=steps,
                            ratio_to_plain=round(times.ratio(name, "plain"), 2),
                            **({"while_loop_over_straight": round(times.ratio((name, "loop"), name), 2),
                                "xla_convolutions_over_auto":
                                round(times.ratio((name, "xla"), name), 2)}
                               if (name, "loop") in times else {}),
                            **({"binarization_over_fixed_inputs":
                                round(times.ratio(name, (name, "fixed")), 2),
                                "counter_binarization_over_fixed_inputs":
                                round(times.ratio((name, "counter"), (name, "fixed")), 2)}
                               if (name, "fixed") in times else {}),
                            **against_references(times, name, product_flops(runner.products),
                                                 matmul_flops)))

    if not args.conv_only:
        records.append(emit(**iwae_evaluation(x_all, matmul, matmul_flops,
                                              num_samples=1000 if args.quick else 5000,
                                              rounds=repeats)))
    if not (args.skip_epoch or args.conv_only):
        records.append(emit(**epoch_time(t_plain, rounds=1 if args.quick else 2)))
    emit(name="targets", **targets(records))
    not_physical(records)


def epoch_time(step_seconds: float, *, rounds: int) -> dict:
    """Seconds for one epoch (train + validation) of full Fashion-MNIST, compile excluded.

    Runs the real loop (``train_and_evaluate``) for 1 and for 3 epochs, after one untimed run
    that compiles what both reuse; the difference over 2 is the time of an epoch, so start-up
    cancels out (best of ``rounds`` of each). Physical: not less than the epoch's train steps at
    ``step_seconds``, the plain step's best time.
    """
    import tempfile

    from aejax.data import splits as data_splits
    from aejax.runtime import config, trainer

    # The bench's output is JSON lines: what the data's first preparation (tensorflow-datasets)
    # and the loop print goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        splits = data_splits.load("fashion_mnist", flat=True)
        c = config.default_config()
        c.update(progress=False, figures=False, pca_baseline=False, checkpoint_every_steps=10**9)
        times = {1: [], 3: []}
        for epochs in [1] + [1, 3] * rounds:
            c.num_epochs = epochs
            with tempfile.TemporaryDirectory() as d:
                t = time.perf_counter()
                trainer.train_and_evaluate(c, d, splits=splits)
                times[epochs].append(time.perf_counter() - t)
    seconds = (min(times[3]) - min(times[1][1:])) / 2
    train_steps = len(splits.train[0]) // c.batch_size
    return dict(name="epoch", dataset="fashion_mnist", model="784-128-32-128-784", batch=BATCH,
                train_examples=len(splits.train[0]), validation_examples=len(splits.validation[0]),
                seconds=round(seconds, 3), train_steps=train_steps,
                train_steps_seconds=round(train_steps * step_seconds, 3),
                physical=bool(seconds >= train_steps * step_seconds))


if __name__ == "__main__":
    main()
