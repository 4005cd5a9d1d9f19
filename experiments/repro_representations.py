"""Rifai et al. (2011), Table 1, on Fashion-MNIST: one-layer sigmoid representations (AE, AE with
weight decay, Gaussian and masking DAE, sparse AE, CAE) compared by one classifier on top, by their
encoder Jacobians (Frobenius norm, singular values) and by contraction curves.

Run:
    python -m experiments.repro_representations --workdir=runs/repro_representations [--quick]

Writes results.json, spectra.png and contraction.png in the workdir. This is the quick look
(untied decoders, fixed hyperparameters, one logistic probe, one seed); the reproduction of the
paper's protocol, with its verdicts, is ``experiments/repro_cae.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from aejax import jacobians, models
from aejax.runtime.config import default_config
from experiments import probes

# Rifai et al. 2011, Table 1 (MNIST test error, %): the numbers we set ours beside.
PUBLISHED_MNIST_ERROR = {"cae": 1.14, "dae_g": 1.18, "dae_b": 1.57, "ae_wd": 1.68, "ae": 1.78}

LABELS = {"pixels": "raw pixels", "ae": "AE", "ae_wd": "AE + weight decay",
          "dae_g": "DAE-g (Gaussian)", "dae_b": "DAE-b (masking)", "sparse": "sparse AE (KL)",
          "cae": "CAE"}
REPRESENTATIONS = ("ae", "ae_wd", "dae_g", "dae_b", "sparse", "cae")


def representation_config(kind: str, *, hidden_size: int, epochs: int, seed: int = 0,
                          train_examples: int = 0, weight_decay: float = 0.1,
                          gaussian_std: float = 0.3, masking_fraction: float = 0.25,
                          sparsity_weight: float = 3.0, contractive_weight: float = 1.0
                          ) -> ml_collections.ConfigDict:
    """The config of one representation: 784-H sigmoid encoder, BCE, Adam 1e-3, one regularizer."""
    if kind not in REPRESENTATIONS:
        raise ValueError(f"Unknown representation {kind!r}; choose one of {REPRESENTATIONS}.")
    c = default_config()
    c.seed = seed
    c.data.train_examples = train_examples
    c.model.update(hidden=(), code_size=hidden_size, activation="sigmoid",
                   code_activation="sigmoid")
    c.num_epochs = epochs
    c.progress = False
    c.figures = False
    c.pca_baseline = False
    c.keep_checkpoints = 1
    c.checkpoint_every_steps = 10**9  # only the end-of-epoch checkpoints
    if kind == "ae_wd":
        c.optimizer.weight_decay = weight_decay  # adamw: decoupled, scaled by the learning rate
    elif kind == "dae_g":
        c.corruption = ml_collections.ConfigDict(dict(kind="gaussian", std=gaussian_std))
    elif kind == "dae_b":
        c.corruption = ml_collections.ConfigDict(dict(kind="masking", fraction=masking_fraction))
    elif kind == "sparse":
        c.loss.terms = ml_collections.ConfigDict(
            {"kl_sparsity": {"weight": sparsity_weight, "rho": 0.05, "layer": "code"}})
    elif kind == "cae":
        c.loss.terms = ml_collections.ConfigDict(
            {"contractive": {"weight": contractive_weight, "mode": "best"}})
    return c


def batch_encoder(model, params) -> Callable[[jax.Array], jax.Array]:
    """``encode(x (B, D)) -> (B, H)`` at fixed parameters."""
    return models.encoder(model, params)


def _one_blas_thread():
    # LAPACK runs far faster on one thread than on several when the cores are shared (measured
    # on 2 shared cores: 0.3 s against 5 s per 1000 x 784 Jacobian SVD). JAX's CPU SVD calls
    # SciPy's OpenBLAS, which must be loaded for the limit to reach it. threadpoolctl comes with
    # scikit-learn (the test extra); without it the solver just runs slower.
    import scipy.linalg  # noqa: F401  (a dependency of jax)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def jacobian_spectra(encode: Callable[[jax.Array], jax.Array], x: np.ndarray, *,
                     chunk_size: int = 25) -> np.ndarray:
    """Singular values of the encoder Jacobian at each of ``x``: ``(N, min(H, D))``, largest first.

    :func:`aejax.jacobians.singular_values`, ``chunk_size`` examples at a time, so that only one
    chunk's Jacobians sit on the device. Their squares sum to the contractive penalty.
    """
    spectra = jax.jit(lambda v: jacobians.singular_values(encode, v, chunk_size=chunk_size))
    with _one_blas_thread():
        return np.asarray(spectra(jnp.asarray(x, jnp.float32)))


def contraction_curve(encode: Callable[[jax.Array], jax.Array], x: np.ndarray,
                      radii: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Mean contraction ratio ``||f(x + r u) - f(x)|| / r`` at each radius, ``(R,)``.

    :func:`aejax.jacobians.contraction_ratios` averaged over ``x``: ``u`` is a random unit
    direction per point (isotropic, no clipping to [0, 1]), the same at every radius. As
    ``r -> 0`` the squared ratio's mean tends to ``||J(x)||_F^2 / D``.
    """
    rng = jax.random.PRNGKey(seed)
    ratios = jax.jit(lambda v: jacobians.contraction_ratios(encode, v, radii, rng))
    return np.asarray(ratios(jnp.asarray(x, jnp.float32)).mean(axis=0), np.float64)


def pair_contraction(codes: np.ndarray, x: np.ndarray, *, num_bins: int = 12
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Code distance over input distance for all pairs of ``x``, binned by input distance.

    Returns ``(bin centres (input distance), mean ratio per bin)``; bins are quantiles of the
    input distances, so each holds the same number of pairs.
    """
    def pdist(a):
        a = np.asarray(a, np.float64)
        sq = (a * a).sum(1)
        d = np.sqrt(np.clip(sq[:, None] + sq[None] - 2 * a @ a.T, 0.0, None))
        return d[np.triu_indices(len(a), 1)]

    dx, dz = pdist(x), pdist(codes)
    keep = dx > 0
    dx, dz = dx[keep], dz[keep]
    edges = np.quantile(dx, np.linspace(0, 1, num_bins + 1))
    which = np.clip(np.searchsorted(edges, dx, side="right") - 1, 0, num_bins - 1)
    centres = np.array([dx[which == b].mean() for b in range(num_bins)])
    ratios = np.array([(dz[which == b] / dx[which == b]).mean() for b in range(num_bins)])
    return centres, ratios


def classify(features_train: np.ndarray, y_train: np.ndarray, features_test: np.ndarray,
             y_test: np.ndarray, *, epochs: int, seed: int = 0) -> float:
    """Test error of logistic regression (``probes.MLPClassifier(hidden=())``) on the features."""
    module = probes.MLPClassifier(hidden=())
    params = probes.fit_classifier(module, features_train, y_train, epochs=epochs, seed=seed)
    return probes.error_rate(module, params, features_test, y_test)


def plot_spectra(spectra: dict[str, np.ndarray], path: str, *, top: int = 100) -> str:
    from aejax import figures  # noqa: F401  (selects the headless backend)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for name, s in spectra.items():
        mean = s.mean(axis=0)[:top]
        ax.semilogy(np.arange(1, len(mean) + 1), mean, label=LABELS[name])
    ax.set_xlabel("singular value index")
    ax.set_ylabel("mean singular value of J(x)")
    ax.set_title("Encoder Jacobian spectrum at test points", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_contraction(curves: dict[str, dict], path: str, *, labels: dict | None = None,
                     title: str = "Contraction curves (smaller: more contractive)") -> str:
    """Isotropic and pairwise contraction curves of each representation, side by side."""
    from aejax import figures  # noqa: F401
    import matplotlib.pyplot as plt

    labels = LABELS if labels is None else labels
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.3))
    for name, c in curves.items():
        axes[0].loglog(c["radii"], c["isotropic"], label=labels[name])
        axes[1].plot(c["pair_input_distance"], c["pair_ratio"], marker="o", ms=2,
                     label=labels[name])
    axes[0].set_xlabel("input distance r (isotropic perturbation)")
    axes[0].set_ylabel("||f(x + r u) - f(x)|| / r")
    axes[1].set_xlabel("input distance between two test images")
    axes[1].set_ylabel("code distance / input distance")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def run(workdir: str, *, hidden_size: int, epochs: int, classifier_epochs: int,
        num_jacobian_points: int, num_pair_points: int, train_examples: int = 0,
        seed: int = 0, kinds=REPRESENTATIONS, contractive_weight: float = 1.0) -> dict:
    """Trains each representation (resumable workdirs), classifies, measures; writes results.json."""
    t0 = time.time()
    splits = probes.fashion()
    (x_tr, y_tr), _, (x_te, y_te) = splits
    if train_examples:
        x_tr, y_tr = x_tr[:train_examples], y_tr[:train_examples]
    rng = np.random.default_rng(seed)
    jac_idx = rng.choice(len(x_te), num_jacobian_points, replace=False)
    pair_idx = rng.choice(len(x_te), num_pair_points, replace=False)
    radii = np.logspace(-2, 1.5, 15)

    t = time.time()
    results = {"pixels": {"test_error": classify(x_tr, y_tr, x_te, y_te, epochs=classifier_epochs,
                                                 seed=seed),
                          "classifier_seconds": round(time.time() - t, 1)}}
    spectra, curves = {}, {}
    for kind in kinds:
        t = time.time()
        config = representation_config(kind, hidden_size=hidden_size, epochs=epochs, seed=seed,
                                       train_examples=train_examples,
                                       contractive_weight=contractive_weight)
        model, params, summary = probes.train_model(config, os.path.join(workdir, kind), splits)
        train_seconds = time.time() - t
        t = time.time()
        f_tr, f_te = probes.encode(model, params, x_tr), probes.encode(model, params, x_te)
        error = classify(f_tr, y_tr, f_te, y_te, epochs=classifier_epochs, seed=seed)
        classifier_seconds = time.time() - t
        t = time.time()
        encode = batch_encoder(model, params)
        s = jacobian_spectra(encode, x_te[jac_idx])
        spectra[kind] = s
        centres, ratios = pair_contraction(f_te[pair_idx], x_te[pair_idx])
        curves[kind] = {"radii": radii.tolist(),
                        "isotropic": contraction_curve(encode, x_te[jac_idx], radii,
                                                       seed=seed).tolist(),
                        "pair_input_distance": centres.tolist(), "pair_ratio": ratios.tolist()}
        frob = np.sqrt((s ** 2).sum(axis=1))
        mean_s = s.mean(axis=0)
        kernel = np.asarray(models.first_layer_kernel(model, params))
        results[kind] = {
            "test_error": error,
            "test_squared_error_per_image": summary["test"]["squared_error_per_image"],
            "mean_code_activation": float(f_te.mean()),
            "jacobian_frobenius_mean": float(frob.mean()),
            "jacobian_frobenius_sq_mean": float((frob ** 2).mean()),
            "top_singular_value_mean": float(s[:, 0].mean()),
            # How many directions the code really follows: singular values above 10% of the top one.
            "singular_values_above_10pct": float((s > 0.1 * s[:, :1]).sum(axis=1).mean()),
            "mean_spectrum_first10": mean_s[:10].tolist(),
            "encoder_weight_norm": float(np.linalg.norm(kernel)),
            "epochs_run": summary["epochs_run"],
            "train_seconds": round(train_seconds, 1),
            "classifier_seconds": round(classifier_seconds, 1),
            "jacobian_seconds": round(time.time() - t, 1),
            "published_mnist_error_percent": PUBLISHED_MNIST_ERROR.get(kind),
        }
        print(kind, {k: results[kind][k] for k in ("test_error", "jacobian_frobenius_mean",
                                                   "singular_values_above_10pct")}, flush=True)
    figures = [plot_spectra(spectra, os.path.join(workdir, "spectra.png")),
               plot_contraction(curves, os.path.join(workdir, "contraction.png"))]
    out = {"setting": dict(hidden_size=hidden_size, epochs=epochs,
                           classifier="logistic regression (probes.MLPClassifier(hidden=()))",
                           classifier_epochs=classifier_epochs,
                           num_jacobian_points=num_jacobian_points,
                           num_pair_points=num_pair_points, train_examples=train_examples or
                           len(x_tr), seed=seed, dataset="fashion_mnist",
                           contractive_weight=contractive_weight),
           "results": results, "curves": curves,
           "figures": [os.path.basename(p) for p in figures],
           "wall_seconds": round(time.time() - t0, 1)}
    probes.save_json(os.path.join(workdir, "results.json"), out)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/repro_representations")
    parser.add_argument("--quick", action="store_true", help="a tiny setting (tests, smoke runs)")
    parser.add_argument("--hidden_size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help=f"comma-separated subset of {REPRESENTATIONS}")
    parser.add_argument("--contractive_weight", type=float, default=1.0)
    args = parser.parse_args(argv)
    kinds = tuple(k for k in args.only.split(",") if k) or REPRESENTATIONS
    unknown = sorted(set(kinds) - set(REPRESENTATIONS))
    if unknown:
        parser.error(f"unknown representations {unknown}; choose from {REPRESENTATIONS}")
    if args.quick:
        setting = dict(hidden_size=32, epochs=1, classifier_epochs=2, num_jacobian_points=20,
                       num_pair_points=100, train_examples=2000)
    else:
        setting = dict(hidden_size=args.hidden_size, epochs=args.epochs, classifier_epochs=10,
                       num_jacobian_points=200, num_pair_points=1000)
    out = run(args.workdir, seed=args.seed, kinds=kinds,
              contractive_weight=args.contractive_weight, **setting)
    print(f"wrote {os.path.join(args.workdir, 'results.json')} in {out['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
