"""The accelerator check: ``python -m experiments.accelerator_check [--quick] [--out FILE]``.

One prepared run (a few minutes on a GPU, under a minute on a CPU with ``--quick``) that needs no
network, no tensorflow-datasets and no ml_collections: synthetic images of Fashion-MNIST's
shapes, the core library and the loop's fused step. It works with a preinstalled JAX from the
repository root (``PYTHONPATH=. python3 -m experiments.accelerator_check``) and prints JSON lines:

* ``device``: the platform, device kind and count, the JAX version;
* ``matmul``: the float32 and bfloat16 matmul rates of that device (the roofline);
* ``step``: the loop's fused step (50 steps per call) of the 784-128-32-128-784 autoencoder,
  its exact contractive modes, the VAE and the convolutional autoencoder, in float32 and
  bfloat16, with each step's FLOPs (XLA's count of the compiled step) and the rate that makes
  against the device's matmul rate;
* ``fused_loop``: 50 steps per compiled call against one call per step;
* ``training``: a 200-step run on this device against the same run on the CPU (same seed,
  same data), at the device's default matmul precision and at ``highest``, with the stated
  tolerance and the verdict computed from it.

Every timing passes a physical check: a step is never faster than its FLOPs at the measured
matmul rate of its dtype (``physical: false`` flags a bug, not a result).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aejax import models, objectives, step
from aejax.runtime.placement import Placement, make_mesh

BATCH = 256
STEPS_PER_CALL = 50
# A run on another device computes the same steps in another order of float32 sums (and, at
# default precision on NVIDIA GPUs, its matmuls in TF32: 10 bits of mantissa). Relative
# difference of the training loss after 200 Adam steps allowed at each precision:
TOLERANCE = {"default": 2e-2, "highest": 1e-3}


def emit(out, **record) -> None:
    record.setdefault("device", jax.devices()[0].device_kind)
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        out.write(line + "\n")
        out.flush()


def images(n: int, shape=(784,), seed: int = 0) -> np.ndarray:
    """Synthetic images in [0, 1] on a smooth 8-dimensional manifold, ``(n, *shape)``."""
    dim = int(np.prod(shape))
    basis = np.random.default_rng(1234).normal(size=(8, dim)) * 1.5
    z = np.random.default_rng(seed).normal(size=(n, 8))
    return (1.0 / (1.0 + np.exp(-(z @ basis)))).astype(np.float32).reshape((n, *shape))


def seconds(fn, *, number: int, rounds: int) -> float:
    """Best of ``rounds`` timings of ``number`` calls, per call (one untimed call first)."""
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(number):
            out = fn()
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t) / number)
    return best


def matmul_rate(dtype, n: int, *, rounds: int) -> float:
    """FLOP/s of a jitted ``n x n`` matmul in ``dtype`` on the default device."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    f = jax.jit(jnp.matmul)
    return 2 * n**3 / seconds(lambda: f(a, b), number=10, rounds=rounds)


def step_flops(compiled) -> float:
    """FLOPs of one call of a compiled function, as XLA counts them (matmuls, convolutions and
    elementwise work alike)."""
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis.get("flops", 0.0))


class Runner:
    """The loop's fused step for one model and objective on one placement, ready to call."""

    def __init__(self, model, terms, x_all, *, reconstruction="bce", binarize=False,
                 compute_dtype="float32", place=None, lr=1e-3, seed=0):
        self.place = place or Placement.create("none", 1)
        per_example = step.make_per_example_fn(
            model, objectives.build(reconstruction, terms), binarize=binarize,
            compute_dtype=compute_dtype)
        tx = optax.adam(lr)
        device = self.place.mesh.devices.flat[0]
        with jax.default_device(device):
            self.params = models.init(model, jax.random.PRNGKey(seed), jnp.asarray(x_all[:BATCH]))
            state = step.TrainState.create(self.params, tx)
        train_step = step.make_train_step(per_example, tx)
        spe = len(x_all) // BATCH
        self.run = self.place.fused_step(train_step, BATCH, spe)
        self.x = self.place.replicate(np.asarray(x_all))
        self.rng = self.place.replicate(jax.random.PRNGKey(seed + 2))
        self.perm = self.place.permutation(self.place.replicate(jax.random.PRNGKey(seed + 1)),
                                           len(x_all), 0)
        template = jax.eval_shape(train_step, state, {"x": self.x[:BATCH]}, self.rng)[1]
        self.zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
        self.state = self.place.replicate(state)
        self.acc = self.place.replicate(self.zeros)
        self.single = jax.jit(train_step, donate_argnums=0)
        self.batch = {"x": self.place.replicate(np.asarray(x_all[:BATCH]))}

    def steps(self, n: int):
        self.state, self.acc = self.run(self.state, self.acc, self.x, self.perm, n, self.rng)
        return self.acc

    def flops_per_step(self) -> float:
        return step_flops(self.single.lower(self.state, self.batch, self.rng).compile())

    def one_step(self):
        self.state, metrics = self.single(self.state, self.batch, self.rng)
        return metrics

    def mean_loss(self, n: int) -> float:
        """Runs ``n`` steps from where the runner stands; their mean training loss."""
        self.acc = self.place.replicate(self.zeros)
        sums = jax.device_get(self.steps(n))
        return float(sums["loss"]) / n


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a CPU run in CI time")
    parser.add_argument("--out", default="", help="also write the JSON lines to this file")
    args = parser.parse_args(argv)
    out = open(args.out, "w") if args.out else None
    # --quick: sizes for a shared 2-core CPU in the test suite; the figures are not the point there.
    rounds, number, per_call = (1, 1, 2) if args.quick else (5, 10, STEPS_PER_CALL)
    n_images = 512 if args.quick else 60_000
    t0 = time.time()
    dev = jax.devices()[0]
    emit(out, check="device", platform=dev.platform, device_count=jax.device_count(),
         jax_version=jax.__version__, quick=args.quick)

    # The roofline of each dtype: the best matmul rate seen in this run, measured again before
    # every step's timing, so that load on a shared machine does not pass for a fast step.
    size = 1024 if args.quick else 8192
    rates = {}

    def roofline(dtype: str) -> float:
        rates[dtype] = max(rates.get(dtype, 0.0),
                           matmul_rate(jnp.dtype(dtype), size, rounds=max(rounds, 3)))
        return rates[dtype]

    for dtype in ("float32", "bfloat16"):
        emit(out, check="matmul", dtype=dtype, n=size, tflops=round(roofline(dtype) / 1e12, 3))

    x_flat = images(n_images)
    x_img = x_flat.reshape(-1, 28, 28, 1)
    mlp = models.MLPAutoencoder(hidden=(128,), code_size=32)
    cases = [
        ("mlp", mlp, {}, x_flat, {}),
        ("contractive_best", mlp, {"contractive": {"weight": 0.1, "mode": "best"}}, x_flat, {}),
        ("contractive_rev", mlp, {"contractive": {"weight": 0.1, "mode": "rev"}}, x_flat, {}),
        ("vae", models.VAE(hidden=(128,), latent_size=32), {"kl": {"weight": 1.0}}, x_flat,
         {"binarize": True}),
        ("conv", models.ConvAutoencoder(), {}, x_img, {}),
    ]
    base = {}
    for name, model, terms, x, options in cases:
        # --quick (CI on a 2-core CPU): bfloat16 only for the plain step.
        dtypes = ("float32", "bfloat16") if not args.quick or name == "mlp" else ("float32",)
        for dtype in dtypes:
            runner = Runner(model, terms, x, compute_dtype=dtype, **options)
            rate = roofline(dtype)
            t = seconds(lambda: runner.steps(per_call), number=number, rounds=rounds)
            per_step = t / per_call
            flops = runner.flops_per_step()
            floor = flops / max(rate, roofline(dtype))  # every FLOP at the best matmul rate
            base.setdefault(dtype, per_step)
            emit(out, check="step", step=name, dtype=dtype, steps_per_s=round(1 / per_step, 1),
                 ratio_to_mlp=round(per_step / base[dtype], 3), gflop_per_step=round(flops / 1e9, 4),
                 tflops=round(flops / per_step / 1e12, 4),
                 fraction_of_matmul=round(floor / per_step, 3), physical=per_step >= floor)

    runner = Runner(mlp, {}, x_flat)
    fused = seconds(lambda: runner.steps(per_call), number=number, rounds=rounds)
    single = seconds(runner.one_step, number=number * per_call, rounds=rounds)
    emit(out, check="fused_loop", steps_per_call=per_call,
         fused_steps_per_s=round(per_call / fused, 1), single_steps_per_s=round(1 / single, 1),
         speedup=round(single * per_call / fused, 3))

    cpu = Placement(make_mesh(jax.devices("cpu")[:1]))
    train_steps = 20 if args.quick else 200
    for precision in ("default", "highest"):
        with jax.default_matmul_precision(None if precision == "default" else "highest"):
            here = Runner(mlp, {}, x_flat, seed=3)
            there = Runner(mlp, {}, x_flat, seed=3, place=cpu)
            loss_here, loss_cpu = here.mean_loss(train_steps), there.mean_loss(train_steps)
        diff = abs(loss_here - loss_cpu) / abs(loss_cpu)
        emit(out, check="training", precision=precision, steps=train_steps,
             loss_device=loss_here, loss_cpu=loss_cpu, relative_difference=diff,
             tolerance=TOLERANCE[precision],
             verdict="agrees" if diff <= TOLERANCE[precision] else "differs")
    emit(out, check="done", seconds=round(time.time() - t0, 1))
    if out is not None:
        out.close()


if __name__ == "__main__":
    sys.exit(main())
