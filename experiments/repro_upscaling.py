"""Reproduction: an autoencoder that upscales 14x14 images to 28x28, against bicubic upsampling (PSNR).

Run:
    python -m experiments.repro_upscaling --workdir=runs/repro_upscaling [--quick]

The denoising machinery with a deterministic "corruption": `downsample_nearest` averages 2x2
blocks (28x28 -> 14x14) and repeats each value back to 2x2, so the network sees exactly the
information of the 14x14 image and is trained to output the 28x28 original (Bernoulli
cross-entropy). The width is chosen on the validation images (``ARCHITECTURES``, a
``PILOT_EPOCHS``-epoch pilot each). The baselines upsample the same 14x14 images by nearest neighbour and by bicubic
interpolation (`jax.image.resize`, clipped to [0, 1]). Expect (measured: about 3 minutes on 2
shared CPU cores): PSNR 21.7 dB for the autoencoder, 19.3 dB bicubic, 18.4 dB nearest, on
Fashion-MNIST test; see experiments/results/upscaling.md.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aejax import models, objectives, step
from aejax.runtime.fit import evaluate, fit
from aejax.runtime.trainer import reconstruct_images

SEED = 0
SIDE = 28
FACTOR = 2
# The widths tried, (hidden, code size): the lecture notes' 784-128-32 and a wider 784-512-256;
# each trains PILOT_EPOCHS epochs and the higher PSNR on the validation images chooses.
ARCHITECTURES = (((128,), 32), ((512,), 256))
PILOT_EPOCHS = 3


def _as_nhwc(x: jax.Array) -> jax.Array:
    if x.ndim == 2:
        side = int(round(np.sqrt(x.shape[1])))
        if side * side != x.shape[1]:
            raise ValueError(f"Flat images must be square; got {x.shape[1]} pixels.")
        return x.reshape(x.shape[0], side, side, 1)
    if x.ndim != 4:
        raise ValueError(f"Expected images (B, H*W) or (B, H, W, C); got shape {tuple(x.shape)}.")
    return x


def downsample(x: jax.Array, factor: int = FACTOR) -> jax.Array:
    """Mean of ``factor`` x ``factor`` blocks: ``(B, 784)`` or ``(B, 28, 28, C)`` -> ``(B, 14, 14, C)``."""
    h = _as_nhwc(x)
    b, height, width, c = h.shape
    if height % factor or width % factor:
        raise ValueError(f"downsample: {height}x{width} is not divisible by {factor}.")
    return h.reshape(b, height // factor, factor, width // factor, factor, c).mean(axis=(2, 4))


def upsample_nearest(small: jax.Array, factor: int = FACTOR) -> jax.Array:
    """Each pixel repeated to a ``factor`` x ``factor`` block (NHWC)."""
    return jnp.repeat(jnp.repeat(small, factor, axis=1), factor, axis=2)


def upsample_bicubic(small: jax.Array, factor: int = FACTOR) -> jax.Array:
    """Bicubic interpolation (``jax.image.resize``, Keys a = -0.5), clipped to [0, 1] (NHWC)."""
    b, h, w, c = small.shape
    return jnp.clip(jax.image.resize(small, (b, h * factor, w * factor, c), "bicubic"), 0.0, 1.0)


def downsample_nearest(rng: jax.Array, x: jax.Array) -> jax.Array:
    """The corruption ``corrupt(rng, x)``: 2x2 block means, repeated back to the input's shape.

    Deterministic (``rng`` is unused; it is there to fit ``step.make_per_example_fn``). Works on
    flat ``(B, 784)`` and NHWC ``(B, 28, 28, C)`` batches and returns the shape it was given.
    """
    del rng
    return upsample_nearest(downsample(x)).reshape(x.shape).astype(x.dtype)


def psnr(predictions: jax.Array, targets: jax.Array, *, peak: float = 1.0) -> jax.Array:
    """Peak signal-to-noise ratio in dB per image, ``10 log10(peak^2 / MSE)``: ``(B,)``."""
    if predictions.shape != targets.shape:
        raise ValueError(f"psnr: shapes differ, {predictions.shape} and {targets.shape}.")
    mse = jnp.square(predictions - targets).reshape(targets.shape[0], -1).mean(axis=1)
    return 10.0 * jnp.log10(peak ** 2 / mse)


def make_model(hidden: tuple = (512,), code_size: int = 256) -> models.MLPAutoencoder:
    return models.MLPAutoencoder(input_shape=(SIDE * SIDE,), hidden=hidden, code_size=code_size,
                                 activation="relu", code_activation="relu")


def train_upscaler(x_train: np.ndarray, *, epochs: int, model=None, learning_rate: float = 1e-3,
                   seed: int = SEED) -> tuple[Any, Any]:
    """Trains ``model`` to map ``downsample_nearest(x)`` to ``x`` (Bernoulli cross-entropy)."""
    model = model or make_model()
    per_example = step.make_per_example_fn(model, objectives.build("bce", {}),
                                            corrupt=downsample_nearest)
    params = models.init(model, jax.random.PRNGKey(seed), jnp.asarray(x_train[:2]))
    steps = epochs * (len(x_train) // min(256, len(x_train)))
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, max(steps, 1)))
    params, _ = fit(per_example, params, tx, x_train, epochs=epochs, seed=seed)
    return model, params


@jax.jit
def _baselines(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    small = downsample(x)
    return upsample_nearest(small), upsample_bicubic(small)


def upscalings(model, params, x: np.ndarray) -> dict[str, np.ndarray]:
    """Nearest, bicubic and autoencoder 28x28 outputs from the 14x14 means of ``x`` (flat)."""
    x = jnp.asarray(x)
    flat = lambda a: np.asarray(a).reshape(len(x), -1)
    nearest, bicubic = _baselines(x)
    out = {"nearest": flat(nearest), "bicubic": flat(bicubic)}
    if model is not None:
        out["autoencoder"] = reconstruct_images(model, params, downsample_nearest(None, x),
                                                 objectives.reconstruction("bce"))
    return out


def psnr_table(model, params, x: np.ndarray, batch: int = 2000) -> dict[str, dict[str, float]]:
    """Mean per-image PSNR (dB) and squared error per image of each upscaling of ``x``."""
    sums: dict[str, dict[str, float]] = {}
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        for name, y in upscalings(model, params, xb).items():
            s = sums.setdefault(name, {"psnr_db": 0.0, "squared_error_per_image": 0.0})
            s["psnr_db"] += float(psnr(jnp.asarray(y), jnp.asarray(xb)).sum())
            s["squared_error_per_image"] += float(np.square(y - xb).sum())
    return {name: {k: v / len(x) for k, v in s.items()} for name, s in sums.items()}


def run(workdir: str, *, quick: bool = False, seed: int = SEED) -> dict:
    from aejax import figures
    from experiments import probes

    t0 = time.time()
    splits = probes.fashion()
    x_train, x_val, x_test = splits.train[0], splits.validation[0], splits.test[0]
    epochs, pilot_epochs, architectures, lr = 12, PILOT_EPOCHS, ARCHITECTURES, 3e-3
    if quick:
        x_train, x_val, x_test, epochs, pilot_epochs = (x_train[:2048], x_val[:500],
                                                        x_test[:500], 1, 1)
        architectures = (((16,), 8), ((64,), 32))
    os.makedirs(workdir, exist_ok=True)
    pilot = {}
    for hidden, code_size in architectures:
        m, p = train_upscaler(x_train, epochs=pilot_epochs, model=make_model(hidden, code_size),
                              learning_rate=lr, seed=seed)
        pilot[f"784-{hidden[0]}-{code_size}"] = psnr_table(m, p, x_val)["autoencoder"]["psnr_db"]
    hidden, code_size = max(architectures, key=lambda a: pilot[f"784-{a[0][0]}-{a[1]}"])
    model, params = train_upscaler(x_train, epochs=epochs, model=make_model(hidden, code_size),
                                   learning_rate=lr, seed=seed)
    table = psnr_table(model, params, x_test)
    # The library's evaluation path gives the same squared error (corrupted input, clean target).
    per_example = step.make_per_example_fn(model, objectives.build("bce", {}),
                                            corrupt=downsample_nearest)
    table["autoencoder"]["library_evaluate_squared_error_per_image"] = evaluate(
        per_example, params, x_test)["squared_error_per_image"]
    n = 10
    shown = upscalings(model, params, x_test[:n])
    small = np.asarray(downsample(jnp.asarray(x_test[:n]))).reshape(n, -1)
    path = figures.image_rows([small, shown["bicubic"], shown["autoencoder"], x_test[:n]],
                              ["14x14 input", "bicubic", "autoencoder", "original"],
                              os.path.join(workdir, "upscaling_examples.png"),
                              title="Fashion-MNIST test: 14x14 -> 28x28")
    results = {"dataset": "fashion_mnist", "epochs": epochs, "seed": seed,
               "model": f"MLP 784-{'-'.join(map(str, hidden))}-{code_size}-{'-'.join(map(str, hidden))}"
                        f"-784, ReLU (code too), Bernoulli cross-entropy, Adam {lr} cosine, batch 256",
               "pilot": {"epochs": pilot_epochs, "validation_psnr_db": pilot,
                         "chosen": f"784-{hidden[0]}-{code_size}"},
               "train_examples": len(x_train), "test_examples": len(x_test),
               "metric": "mean over test images of per-image PSNR (peak 1.0)", "test": table,
               "figures": [os.path.basename(path)], "wall_seconds": round(time.time() - t0, 1),
               "quick": quick}
    probes.save_json(os.path.join(workdir, "results.json"), results)
    return results


def record_entries(results: dict) -> list[tuple[str, int | None, float]]:
    """``(arm, seed, value)`` of experiments/results/upscaling.json from :func:`run`'s results."""
    test = results["test"]
    return [("autoencoder", results.get("seed", SEED), test["autoencoder"]["psnr_db"]),
            ("bicubic", None, test["bicubic"]["psnr_db"]),
            ("nearest neighbour", None, test["nearest"]["psnr_db"])]


def main() -> None:
    from experiments import results as records

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/repro_upscaling")
    parser.add_argument("--seed", type=int, default=SEED,
                        help="seed of the initializations and the batch orders (pilot included)")
    parser.add_argument("--quick", action="store_true", help="tiny setting (tests)")
    args = parser.parse_args()
    results = run(args.workdir, quick=args.quick, seed=args.seed)
    if records.default_run(parser, args):
        records.record_many("upscaling", record_entries(results),
                            wall_seconds=results["wall_seconds"])
    print({k: {m: round(v, 3) for m, v in t.items()} for k, t in results["test"].items()})
    print(f"wrote {os.path.join(args.workdir, 'results.json')} in {results['wall_seconds']} s")


if __name__ == "__main__":
    main()
