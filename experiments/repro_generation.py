"""A plain autoencoder as a generative model: a density fitted to its codes, samples decoded.

Run:
    python -m experiments.repro_generation --workdir=runs/repro_generation [--quick]
        [--vae_workdir=runs/repro_vae/vae50]

Trains 784-256-16 (ReLU, linear code, BCE) on Fashion-MNIST, fits a full-covariance Gaussian and
Gaussian mixtures to the training codes, decodes samples of each, and puts them beside prior
samples of the VAE from experiments/repro_vae.py (trained here if its workdir has none). The
log-likelihood of the test codes under each density is the quantitative comparison.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from aejax import models, vae
from aejax.runtime.config import default_config
from experiments import probes, repro_vae

MIXTURE_COMPONENTS = (5, 10, 20, 40)


def autoencoder_config(*, quick: bool, seed: int = 0) -> ml_collections.ConfigDict:
    c = default_config()
    c.seed = seed
    c.model = ml_collections.ConfigDict(dict(name="mlp", hidden=(256,), code_size=16,
                                             activation="relu", code_activation="linear"))
    c.num_epochs = 1 if quick else 20
    c.progress = False
    if quick:
        c.data.train_examples = 2000
    return c


def fit_gaussian(codes: np.ndarray, *, jitter: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-likelihood mean ``(H,)`` and full covariance ``(H, H)`` of ``codes`` ``(N, H)``.

    ``jitter`` times the mean variance is added to the diagonal, so a dead code unit does not
    make the covariance singular.
    """
    codes = np.asarray(codes, np.float64)
    if codes.ndim != 2 or len(codes) < 2:
        raise ValueError(f"codes must be (N >= 2, H), got {codes.shape}.")
    mean = codes.mean(axis=0)
    cov = np.cov(codes, rowvar=False, bias=True).reshape(codes.shape[1], codes.shape[1])
    cov += jitter * np.trace(cov) / len(cov) * np.eye(len(cov))
    return mean, cov


def gaussian_log_prob(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """``log N(x; mean, cov)`` per row of ``x`` ``(N, H)``, through the Cholesky factor."""
    x = np.asarray(x, np.float64)
    chol = np.linalg.cholesky(cov)
    white = np.linalg.solve(chol, (x - mean).T)  # (H, N)
    return (-0.5 * np.sum(white**2, axis=0) - np.sum(np.log(np.diag(chol)))
            - 0.5 * len(mean) * np.log(2 * np.pi))


def sample_gaussian(rng: np.random.Generator, mean: np.ndarray, cov: np.ndarray, n: int) -> np.ndarray:
    """``n`` draws of ``N(mean, cov)``: ``mean + L eps`` with ``L L^T = cov``."""
    chol = np.linalg.cholesky(cov)
    return mean + rng.standard_normal((n, len(mean))) @ chol.T


def fit_mixtures(codes: np.ndarray, validation_codes: np.ndarray, components: Sequence[int], *,
                 seed: int):
    """Full-covariance Gaussian mixtures, one per size; returns (best by validation, {k: val ll}).

    The validation score is the mean log-likelihood of ``validation_codes`` in nats per code.
    """
    from sklearn.mixture import GaussianMixture

    # float64: float32 covariances fail NumPy's positive-semidefinite check when sampling.
    codes, validation_codes = (np.asarray(c, np.float64) for c in (codes, validation_codes))
    fitted, scores = {}, {}
    for k in components:
        gmm = GaussianMixture(k, covariance_type="full", random_state=seed, reg_covar=1e-5)
        fitted[k] = gmm.fit(codes)
        scores[k] = float(gmm.score_samples(validation_codes).mean())
    best = max(scores, key=scores.get)
    return fitted[best], scores


def decode_codes(model, params, codes: np.ndarray) -> np.ndarray:
    """Decoded images ``sigmoid(g(z))`` of codes ``(N, H)``."""
    logits = models.decoder(model, params)(jnp.asarray(codes, jnp.float32))
    return np.asarray(jax.nn.sigmoid(logits))


def load_vae(workdir: str, *, quick: bool):
    """The 784-200-200-50 VAE of experiments/repro_vae.py from ``workdir``, trained there if absent."""
    config = repro_vae.vae50_config(quick=quick)
    model, params, _ = probes.train_model(config, workdir, splits=probes.fashion(flat=True))
    return model, params


def record_entries(results: dict, seed: int) -> list[tuple[str, int, float]]:
    """``(arm, seed, value)`` of experiments/results/generation.json from :func:`main`'s
    results."""
    ll = results["test_code_log_likelihood_nats"]
    return [("Gaussian, full covariance", seed, ll["gaussian"]),
            ("Gaussian mixture, size chosen on validation codes", seed,
             ll[f"gmm_{results['gmm_components']}"])]


def main(argv=None) -> dict:
    from experiments import results as records

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/repro_generation")
    parser.add_argument("--vae_workdir", default="runs/repro_vae/vae50",
                        help="workdir of repro_vae's 784-200-200-50 VAE (trained there if empty)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the autoencoder, the mixtures and the samples")
    parser.add_argument("--quick", action="store_true", help="tiny setting (tests, smoke runs)")
    args = parser.parse_args(argv)
    from aejax import figures

    t0 = time.time()
    os.makedirs(args.workdir, exist_ok=True)
    splits = probes.fashion(flat=True)
    config = autoencoder_config(quick=args.quick, seed=args.seed)
    model, params, summary = probes.train_model(config, os.path.join(args.workdir, "autoencoder"),
                                                splits=splits)
    (x_tr, _), (x_val, _), (x_te, _) = splits
    if config.data.train_examples:
        x_tr = x_tr[:config.data.train_examples]
    codes_tr, codes_val, codes_te = (probes.encode(model, params, x) for x in (x_tr, x_val, x_te))

    mean, cov = fit_gaussian(codes_tr)
    gmm, val_scores = fit_mixtures(codes_tr, codes_val, (2,) if args.quick else MIXTURE_COMPONENTS,
                                   seed=config.seed)
    h = codes_tr.shape[1]
    test_ll = {"gaussian": float(gaussian_log_prob(codes_te, mean, cov).mean()),
               f"gmm_{gmm.n_components}": float(gmm.score_samples(codes_te).mean())}

    n = 10
    rng = np.random.default_rng(config.seed)
    gauss_images = decode_codes(model, params, sample_gaussian(rng, mean, cov, n))
    gmm_codes, _ = gmm.sample(n)
    gmm_images = decode_codes(model, params, rng.permutation(gmm_codes))  # sample() sorts by component
    recon = decode_codes(model, params, codes_te[:n])
    vae_model, vae_params = load_vae(args.vae_workdir, quick=args.quick)
    vae_images = np.asarray(vae.sample_prior(vae_model, vae_params, jax.random.PRNGKey(config.seed), n))
    path = figures.image_rows(
        [x_te[:n], recon, gauss_images, gmm_images, vae_images],
        ["test", "AE recon.", "AE+Gaussian", f"AE+GMM({gmm.n_components})", "VAE prior"],
        os.path.join(args.workdir, "samples.png"),
        title="decoded samples: densities fitted to 16-d autoencoder codes, and the VAE's prior")

    results = {
        "dataset": "fashion_mnist",
        "autoencoder": {"architecture": "784-256-16 relu, linear code, BCE",
                        "epochs": summary["epochs_run"],
                        "test_squared_error_per_image": summary["test"]["squared_error_per_image"],
                        "train_seconds": summary["train_seconds"]},
        "code_size": int(h),
        "test_code_log_likelihood_nats": test_ll,
        "test_code_log_likelihood_nats_per_dim": {k: v / h for k, v in test_ll.items()},
        "gmm_validation_log_likelihood": {str(k): v for k, v in val_scores.items()},
        "gmm_components": int(gmm.n_components),
        "vae_workdir": args.vae_workdir,
        "figures": [os.path.basename(path)],
        "wall_seconds": round(time.time() - t0, 1),
    }
    probes.save_json(os.path.join(args.workdir, "results.json"), results)
    if records.default_run(parser, args, ignore=("workdir", "vae_workdir", "seed")):
        records.record_many("generation", record_entries(results, config.seed),
                            wall_seconds=results["wall_seconds"])
    print(results["test_code_log_likelihood_nats"], results["gmm_validation_log_likelihood"])
    print(f"wall {results['wall_seconds']} s")
    return results


if __name__ == "__main__":
    main()
