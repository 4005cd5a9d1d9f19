"""The VAE on dynamically binarized Fashion-MNIST: test ELBO and IWAE NLL, samples, a 2-D latent space.

Run:
    python -m experiments.repro_vae --workdir=runs/repro_vae [--quick] [--iwae_images=N]

Two models. (a) Burda et al.'s one-stochastic-layer VAE 784-200-200-50 (tanh, Bernoulli): test
ELBO on the whole test set and the IWAE bound with k = 5000 on ``--iwae_images`` test images
(the first N/10 of each class), all on one fixed binarization; prior samples. (b) A 2-D latent
VAE on classes 1, 5, 6 (trouser, sandal, shirt): the latent space coloured by label, a decoded
grid over the latent (the walk), and latent against pixel interpolation. Writes results.json
and PNGs.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy.stats import norm

from aejax import models, vae
from aejax.data import batching
from aejax.data import splits as data_splits
from aejax.runtime.config import default_config
from experiments import probes

CLASSES = (1, 5, 6)
CLASS_NAMES = {1: "trouser", 5: "sandal", 6: "shirt"}
IWAE_SAMPLES = 5000

Array = jax.Array


# --------------------------------------------------------------------------- configs


def vae50_config(*, quick: bool, seed: int = 0) -> ml_collections.ConfigDict:
    """Burda et al.'s VAE, 784-200-200-50 with tanh, trained for a CPU budget (not 3280 passes)."""
    c = default_config()
    c.seed = seed
    c.data.binarize = True
    c.model = ml_collections.ConfigDict(dict(name="vae", hidden=(200, 200), latent_size=50,
                                             activation="tanh", likelihood="bernoulli"))
    c.loss.terms = ml_collections.ConfigDict({"kl": {"weight": 1.0, "warmup_steps": 0}})
    c.batch_size = 100
    c.num_epochs = 1 if quick else 40
    c.optimizer.schedule = "cosine"
    c.iwae_samples = 0  # IWAE is computed here, on a fixed subset (see evaluate_vae50)
    c.pca_baseline = False
    c.progress = False
    if quick:
        c.data.train_examples = 2000
    return c


def vae2d_config(*, quick: bool, seed: int = 0) -> ml_collections.ConfigDict:
    """experiments/configs/vae.py (784-512-2) on classes 1, 5, 6 only."""
    from experiments.configs import vae as vae_config

    c = vae_config.get_config()
    c.seed = seed
    c.data.classes = CLASSES
    c.data.validation_size = 1000
    c.num_epochs = 1 if quick else 30
    c.iwae_samples = 0
    c.pca_baseline = False
    c.progress = False
    if quick:
        c.data.train_examples = 1000
    return c


def build_model(config: ml_collections.ConfigDict) -> models.VAE:
    return models.from_config(config.model)


# --------------------------------------------------------------------------- computations


def bind(model: models.VAE, params) -> tuple[Callable[[Array], Array], Callable[[Array], Array]]:
    """``f(x)`` = posterior mean and ``g(z)`` = decoded Bernoulli means, jitted."""
    encode = jax.jit(models.encoder(model, params))
    decode = jax.jit(lambda z: jax.nn.sigmoid(models.decoder(model, params)(z)))
    return encode, decode


def fixed_binarization(x: np.ndarray, seed: int) -> np.ndarray:
    """One Bernoulli(x) draw of the whole set, so every bound sees the same binary images."""
    return np.asarray(batching.binarize(jax.random.PRNGKey(seed), jnp.asarray(x)))


def mean_elbo(model: models.VAE, params, x: np.ndarray, rng: Array, *, num_samples: int = 10,
              batch_size: int = 1000) -> float:
    """Mean ELBO over ``x`` in nats per image; ``num_samples`` draws per image.

    Batch ``i`` draws from ``fold_in(rng, i)``; the last batch may be shorter (one more trace).
    """
    fn = jax.jit(lambda xb, key: vae.elbo(model, params, xb, key, num_samples=num_samples).sum())
    total = 0.0
    for i, (batch, mask) in enumerate(zip(*batching.pad_batches(x, batch_size))):
        real = int(mask.sum())
        total += float(fn(jnp.asarray(batch[:real]) if real < batch_size else jnp.asarray(batch),
                          jax.random.fold_in(rng, i)))
    return total / len(x)


def active_units(means: np.ndarray, threshold: float = 1e-2) -> int:
    """Latent dimensions whose posterior mean varies over the data (Burda et al.'s active units).

    A unit is active when ``Var_x E_q[z_u | x] > threshold``; ``means`` is ``(N, Z)``.
    """
    return int(np.sum(np.var(np.asarray(means, np.float64), axis=0) > threshold))


def first_per_class(labels: np.ndarray, n: int, num_classes: int = 10) -> np.ndarray:
    """Sorted indices of the first ``n / num_classes`` examples of each class (a fixed subset)."""
    labels = np.asarray(labels)
    if n <= 0 or n % num_classes:
        raise ValueError(f"n must be a positive multiple of {num_classes}, got {n}.")
    idx = [np.flatnonzero(labels == c)[: n // num_classes] for c in range(num_classes)]
    if any(len(i) < n // num_classes for i in idx):
        raise ValueError(f"some class has fewer than {n // num_classes} examples.")
    return np.sort(np.concatenate(idx))


def latent_values(n: int, *, low: float = 0.05, high: float = 0.95) -> np.ndarray:
    """``n`` latent coordinates at evenly spaced quantiles of N(0, 1) (Kingma & Welling's Fig. 4)."""
    return norm.ppf(np.linspace(low, high, n))


def latent_grid(decode_fn: Callable[[Array], Array], values: Sequence[float]) -> np.ndarray:
    """Decodes a 2-D latent grid: ``out[i, j] = g(values[j], values[::-1][i])``.

    Rows run from the largest second coordinate at the top, so the picture has the orientation
    of a scatter plot of the latent space.

    Returns:
      ``(n, n, *image_shape)`` with ``n = len(values)``.
    """
    values = np.asarray(values, np.float32)
    z1, z2 = np.meshgrid(values, values[::-1])  # z1 varies along columns, z2 down the rows
    z = np.stack([z1.ravel(), z2.ravel()], axis=1)
    out = np.asarray(decode_fn(jnp.asarray(z)))
    return out.reshape((len(values), len(values)) + out.shape[1:])


def interpolate_latent(encode_fn, decode_fn, x0: np.ndarray, x1: np.ndarray,
                       alphas: Sequence[float]) -> np.ndarray:
    """``g((1 - a) f(x0) + a f(x1))`` for each ``a``: ``(len(alphas), *x0.shape)``."""
    z = np.asarray(encode_fn(jnp.asarray(np.stack([x0, x1]))))
    a = np.asarray(alphas, z.dtype)[:, None]
    return np.asarray(decode_fn(jnp.asarray((1 - a) * z[0] + a * z[1])))


def interpolate_pixels(x0: np.ndarray, x1: np.ndarray, alphas: Sequence[float]) -> np.ndarray:
    """``(1 - a) x0 + a x1`` for each ``a``: ``(len(alphas), *x0.shape)``."""
    a = np.asarray(alphas, np.float32).reshape((-1,) + (1,) * np.ndim(x0))
    return (1 - a) * x0 + a * x1


# --------------------------------------------------------------------------- figures


def plot_latent(means: np.ndarray, labels: np.ndarray, path: str) -> str:
    from aejax import figures  # noqa: F401  (headless backend)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for c, color in zip(CLASSES, ("tab:blue", "tab:orange", "tab:green")):
        m = means[labels == c]
        ax.scatter(m[:, 0], m[:, 1], s=2, alpha=0.5, color=color, label=f"{c}: {CLASS_NAMES[c]}")
    ax.set_xlabel("z1 (posterior mean)")
    ax.set_ylabel("z2")
    ax.set_title("2-D VAE, Fashion-MNIST test, classes 1, 5, 6", fontsize=9)
    ax.legend(markerscale=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_grid(grid: np.ndarray, values: np.ndarray, path: str) -> str:
    from aejax import figures  # noqa: F401
    import matplotlib.pyplot as plt

    n, side = grid.shape[0], int(round(np.sqrt(grid[0, 0].size)))
    mosaic = grid.reshape(n, n, side, side).transpose(0, 2, 1, 3).reshape(n * side, n * side)
    fig, ax = plt.subplots(figsize=(5.2, 5.2))
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1)
    ticks = np.arange(n) * side + side / 2
    ax.set_xticks(ticks[::2], [f"{v:.1f}" for v in values[::2]], fontsize=7)
    ax.set_yticks(ticks[::2], [f"{v:.1f}" for v in values[::-1][::2]], fontsize=7)
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    ax.set_title("decoded grid over the 2-D latent (quantiles 0.05..0.95 of N(0,1))", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- the run


def record_entries(results: dict, seed: int) -> list[tuple[str, int, float]]:
    """``(arm, seed, value)`` of experiments/results/vae.json from :func:`main`'s results."""
    a = results["vae50"]
    entries = [("-ELBO, the 500-image IWAE subset", seed, -a["test_elbo_subset"]),
               ("NLL by IWAE, k = 5000, the same 500 images", seed, a["test_iwae_nll_subset"]),
               ("-ELBO, all 10 000 test images", seed, -a["test_elbo_full"]),
               ("active units of 50", seed, a["active_units"])]
    if results["vae2d"]["test_elbo_dynamic"] is not None:
        entries.append(("2-D VAE on classes 1, 5, 6: test -ELBO", seed,
                        -results["vae2d"]["test_elbo_dynamic"]))
    return entries


def main(argv=None) -> dict:
    from experiments import results as records

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/repro_vae")
    parser.add_argument("--quick", action="store_true", help="tiny setting (tests, smoke runs)")
    parser.add_argument("--iwae_images", type=int, default=500,
                        help="test images (N/10 per class) for the k=5000 IWAE bound")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of both models' training (the test binarization uses seed + 1)")
    args = parser.parse_args(argv)
    from aejax import figures

    t0 = time.time()
    os.makedirs(args.workdir, exist_ok=True)
    k = 50 if args.quick else IWAE_SAMPLES
    n_iwae = 100 if args.quick else args.iwae_images

    # (a) 784-200-200-50 on all classes.
    cfg_a = vae50_config(quick=args.quick, seed=args.seed)
    splits = probes.fashion(flat=True)
    model_a, params_a, summary_a = probes.train_model(cfg_a, os.path.join(args.workdir, "vae50"),
                                                      splits=splits)
    t_train_a = time.time() - t0
    x_test, y_test = splits.test
    x_bin = fixed_binarization(x_test, cfg_a.seed + 1)
    elbo_all = mean_elbo(model_a, params_a, x_bin, jax.random.PRNGKey(10))
    subset = first_per_class(y_test, n_iwae)
    elbo_sub = mean_elbo(model_a, params_a, x_bin[subset], jax.random.PRNGKey(10))
    t = time.time()
    nll = vae.evaluate_nll(model_a, params_a, x_bin[subset], jax.random.PRNGKey(11),
                           num_samples=k, batch_size=100)
    iwae_seconds = time.time() - t
    encode_a, decode_a = bind(model_a, params_a)
    au = active_units(np.asarray(encode_a(jnp.asarray(x_bin))))
    samples = np.asarray(vae.sample_prior(model_a, params_a, jax.random.PRNGKey(0), 30))
    paths = [figures.image_rows([samples[:10], samples[10:20], samples[20:]], ["prior"] * 3,
                                os.path.join(args.workdir, "vae50_prior_samples.png"),
                                title="VAE 784-200-200-50: decoded means of z ~ N(0, I)")]

    # (b) 2-D latent on classes 1, 5, 6.
    cfg_b = vae2d_config(quick=args.quick, seed=args.seed)
    model_b, params_b, summary_b = probes.train_model(cfg_b, os.path.join(args.workdir, "vae2d"))
    splits_b = data_splits.load("fashion_mnist", flat=True, classes=CLASSES,
                                validation_size=cfg_b.data.validation_size, seed=cfg_b.seed)
    xb_test, yb_test = splits_b.test
    encode_b, decode_b = bind(model_b, params_b)
    means_b = np.asarray(encode_b(jnp.asarray(xb_test)))
    paths.append(plot_latent(means_b, yb_test, os.path.join(args.workdir, "vae2d_latent.png")))
    values = latent_values(15)
    paths.append(plot_grid(latent_grid(decode_b, values), values,
                           os.path.join(args.workdir, "vae2d_walk.png")))

    alphas = np.linspace(0, 1, 9)
    first = {c: int(np.flatnonzero(yb_test == c)[0]) for c in CLASSES}
    rows, labels = [], []
    for a, b in ((1, 5), (5, 6), (6, 1)):
        x0, x1 = xb_test[first[a]], xb_test[first[b]]
        rows += [interpolate_pixels(x0, x1, alphas),
                 interpolate_latent(encode_b, decode_b, x0, x1, alphas),
                 interpolate_latent(encode_a, decode_a, x0, x1, alphas)]
        labels += [f"{CLASS_NAMES[a][:5]}>{CLASS_NAMES[b][:5]}\npixels", "2-D VAE", "50-D VAE"]
    paths.append(figures.image_rows(rows, labels, os.path.join(args.workdir, "interpolation.png"),
                                    title="(1-a)x+ax' (pixels) against g((1-a)f(x)+af(x')), a = 0..1"))

    results = {
        "dataset": "fashion_mnist, dynamically binarized",
        "vae50": {
            "architecture": "784-200-200-50 tanh, Bernoulli", "epochs": summary_a["epochs_run"],
            "batch_size": cfg_a.batch_size, "train_seconds": summary_a["train_seconds"],
            "test_elbo_full": elbo_all, "test_examples": int(len(x_bin)),
            "iwae_images": n_iwae, "iwae_samples": k,
            "iwae_subset": "the first iwae_images / 10 test images of each class",
            "test_elbo_subset": elbo_sub,
            "test_iwae_nll_subset": nll, "iwae_seconds": round(iwae_seconds, 1),
            "iwae_seconds_per_image": round(iwae_seconds / n_iwae, 4),
            "active_units": au, "test_binarization_seed": cfg_a.seed + 1,
        },
        "vae2d": {"classes": list(CLASSES), "epochs": summary_b["epochs_run"],
                  "test_elbo_dynamic": summary_b["test"].get("elbo"),
                  "train_seconds": summary_b["train_seconds"]},
        "figures": [os.path.basename(p) for p in paths],
        "vae50_train_wall_seconds": round(t_train_a, 1), "wall_seconds": round(time.time() - t0, 1),
    }
    probes.save_json(os.path.join(args.workdir, "results.json"), results)
    if records.default_run(parser, args):
        records.record_many("vae", record_entries(results, cfg_a.seed),
                            wall_seconds=results["wall_seconds"])
    print({k_: v for k_, v in results["vae50"].items()})
    print(f"wall {results['wall_seconds']} s")
    return results


if __name__ == "__main__":
    main()
