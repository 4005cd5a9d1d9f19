"""Reproduction: a linear autoencoder trained with squared error finds PCA's subspace (Baldi & Hornik 1989).

Run:
    python -m experiments.repro_linear_pca --workdir=runs/repro_linear_pca [--quick]

Trains 784-16-784 with a linear code and a linear decoder on squared error (`mse_linear`) on flat
Fashion-MNIST, and compares it with PCA at k = 16 fitted on the same training images: test
squared error per image, and the principal angles between the autoencoder's subspaces (the row
space of the decoder matrix, the column space of the encoder matrix) and PCA's top-16 subspace.
Expect (measured: about 100 s on 2 shared CPU cores): test error 16.031 against PCA's 16.031;
15 of the 16 decoder angles under 0.15 degrees and the 16th about 22 (PCA's 16th and 17th
variances are nearly equal; against PCA's top 17 all are under 1.7); the individual code units
are not the principal components (any invertible mix of them is optimal). See
experiments/results/linear_pca.md.
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

from aejax import losses, models, objectives, pca, step
from aejax.runtime.fit import fit
from aejax.runtime.trainer import reconstruct_images

SEED = 0


def principal_angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Principal angles in degrees, smallest first, between the column spaces of ``a`` and ``b``.

    Orthonormal bases Q1, Q2 from QR (float64); the cosines are the singular values of Q1^T Q2.

    Args:
      a: ``(D, k1)``.
      b: ``(D, k2)``.

    Returns:
      ``(min(k1, k2),)`` angles in degrees.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"principal_angles: expected (D, k1) and (D, k2), got {a.shape}, {b.shape}.")
    q1, _ = np.linalg.qr(a)
    q2, _ = np.linalg.qr(b)
    cos = np.linalg.svd(q1.T @ q2, compute_uv=False)
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def make_model(input_dim: int, k: int) -> models.MLPAutoencoder:
    return models.MLPAutoencoder(input_shape=(input_dim,), hidden=(), code_size=k,
                                 code_activation="linear")


def subspaces(model, params: Any, covariance: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The autoencoder's k-dimensional subspaces of input space, as ``(D, k)`` matrices.

    The encoder is pinned down only on the span of the data: its weights along directions in
    which no training image varies (pixels that are black in every image) get no gradient and
    keep their random initialization. ``covariance @ encoder`` removes them: at the optimum the
    encoder is the decoder's pseudo-inverse plus anything the data annihilates, and the data
    covariance maps that to PCA's subspace exactly. Both maps are linear, so their Jacobians (at
    any point) are their matrices.
    """
    k = models.describe(model, params, jnp.zeros((1,) + tuple(model.input_shape))).code_size
    at_zero = lambda fn, shape: np.asarray(losses.jacobian(fn, jnp.zeros(shape))[0])
    out = {"decoder_rows": at_zero(models.decoder(model, params), (1, k)),  # (D, k)
           "encoder_columns": at_zero(models.encoder(model, params),
                                      (1,) + tuple(model.input_shape)).T}  # (D, k)
    if covariance is not None:
        out["covariance_times_encoder"] = np.asarray(covariance, np.float64) @ out["encoder_columns"]
    return out


def covariance(x: np.ndarray) -> np.ndarray:
    xc = np.asarray(x, np.float64) - np.asarray(x, np.float64).mean(axis=0)
    return xc.T @ xc / max(len(x) - 1, 1)


def squared_error_per_image(model, params, x: np.ndarray) -> float:
    recon = reconstruct_images(model, params, jnp.asarray(x), objectives.reconstruction("mse_linear"))
    return float(np.square(recon - x).sum(axis=1).mean())


def train_linear_autoencoder(x_train: np.ndarray, k: int, *, epochs: int, learning_rate: float,
                             batch_size: int = 256, seed: int = SEED,
                             x_eval: np.ndarray | None = None) -> tuple[Any, Any, list[float]]:
    """A linear autoencoder D-k-D trained on ``mse_linear`` with Adam and cosine decay.

    Returns:
      ``(model, params, curve)``; ``curve`` holds the squared error per image of ``x_eval`` after
      each epoch (empty without ``x_eval``).
    """
    model = make_model(x_train.shape[1], k)
    per_example = step.make_per_example_fn(model, objectives.build("mse_linear", {}))
    params = models.init(model, jax.random.PRNGKey(seed), jnp.asarray(x_train[:2]))
    steps = epochs * (len(x_train) // min(batch_size, len(x_train)))
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, max(steps, 1)))
    curve: list[float] = []
    on_epoch = (None if x_eval is None else
                lambda e, p, loss: curve.append(squared_error_per_image(model, p, x_eval)))
    params, _ = fit(per_example, params, tx, x_train, epochs=epochs, batch_size=batch_size,
                    seed=seed, on_epoch=on_epoch)
    return model, params, curve


def compare_with_pca(model, params, fitted: pca.PCA, x_test: np.ndarray, *,
                     x_train: np.ndarray | None = None, wider: pca.PCA | None = None) -> dict:
    """Test errors of both, and the principal angles between the autoencoder's and PCA's subspaces.

    ``x_train`` adds the covariance-weighted encoder (see :func:`subspaces`); ``wider`` (PCA with
    k + 1 components) adds the angles of the decoder's rows to that larger subspace: when the k-th
    and (k+1)-th eigenvalues are close, the error barely depends on which mix of the two the
    autoencoder keeps, so that angle converges slowly while the others are already near 0.
    """
    ae = squared_error_per_image(model, params, x_test)
    pc = pca.reconstruction_errors(fitted, x_test)["squared_error_per_image"]
    top = np.asarray(fitted.components).T  # (D, k)
    spaces = subspaces(model, params, None if x_train is None else covariance(x_train))
    angles = {name: principal_angles(m, top) for name, m in spaces.items()}
    if wider is not None:
        angles["decoder_rows_vs_top_k_plus_1"] = principal_angles(
            spaces["decoder_rows"], np.asarray(wider.components).T)
    # Angle between each decoder row and the principal component it is closest to: large, because
    # the autoencoder's units are an arbitrary basis of the subspace, not the components.
    rows = spaces["decoder_rows"]
    rows = rows / np.linalg.norm(rows, axis=0, keepdims=True)
    unit_angles = np.degrees(np.arccos(np.clip(np.abs(rows.T @ top).max(axis=1), 0, 1)))
    return {"autoencoder_squared_error_per_image": ae, "pca_squared_error_per_image": pc,
            "relative_gap": (ae - pc) / pc,
            "principal_angles_deg": {n: [round(float(a), 3) for a in v] for n, v in angles.items()},
            "max_angle_deg": {n: float(v.max()) for n, v in angles.items()},
            "unit_to_nearest_component_angle_deg": [round(float(a), 1) for a in unit_angles]}


def run(workdir: str, *, quick: bool = False, seed: int = SEED) -> dict:
    from experiments import probes

    t0 = time.time()
    splits = probes.fashion()
    x_train, x_test = splits.train[0], splits.test[0]
    k, epochs, lr = 16, 60, 3e-3
    if quick:
        x_train, x_test, epochs = x_train[:2048], x_test[:500], 2
    os.makedirs(workdir, exist_ok=True)
    fitted, wider = pca.fit(x_train, k), pca.fit(x_train, k + 1)
    model, params, curve = train_linear_autoencoder(x_train, k, epochs=epochs, learning_rate=lr,
                                                    seed=seed, x_eval=x_test)
    out = compare_with_pca(model, params, fitted, x_test, x_train=x_train, wider=wider)
    out["pca_variances"] = [round(float(v), 4) for v in wider.variances]
    figure = plot(out, curve, os.path.join(workdir, "linear_pca.png"))
    basis = plot_bases(model, params, fitted, os.path.join(workdir, "linear_pca_bases.png"))
    results = {"dataset": "fashion_mnist", "k": k, "epochs": epochs, "learning_rate": lr,
               "optimizer": "adam, cosine decay, batch 256", "seed": seed,
               "train_examples": len(x_train), "test_examples": len(x_test), **out,
               "test_curve": curve, "figures": [os.path.basename(figure), os.path.basename(basis)],
               "wall_seconds": round(time.time() - t0, 1), "quick": quick}
    probes.save_json(os.path.join(workdir, "results.json"), results)
    return results


def plot(out: dict, curve: list[float], path: str) -> str:
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.0))
    ax1.plot(range(1, len(curve) + 1), curve, marker="o", ms=2, label="linear autoencoder")
    ax1.axhline(out["pca_squared_error_per_image"], color="k", ls="--", lw=1, label="PCA, k = 16")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("test squared error / image")
    ax1.set_yscale("log")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    labels = {"decoder_rows_vs_top_k_plus_1": "decoder rows vs PCA top k+1"}
    for name, angles in out["principal_angles_deg"].items():
        ax2.plot(range(1, len(angles) + 1), angles, marker="o", ms=3,
                 label=labels.get(name, name.replace("_", " ")))
    ax2.xaxis.get_major_locator().set_params(integer=True)
    ax2.set_xlabel("principal angle index")
    ax2.set_ylabel("angle to PCA subspace (degrees)")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_bases(model, params, fitted: pca.PCA, path: str, n: int = 8) -> str:
    """PCA's first components, the decoder's rows, and those rows projected on PCA's subspace."""
    from aejax import figures

    top = np.asarray(fitted.components)  # (k, D)
    rows = subspaces(model, params)["decoder_rows"].T  # (k, D)
    scale = lambda m: (m - m.min(axis=1, keepdims=True)) / np.ptp(m, axis=1, keepdims=True)
    projected = rows @ top.T @ top
    return figures.image_rows([scale(top[:n]), scale(rows[:n]), scale(projected[:n])],
                              ["PCA", "AE decoder", "projected"], path,
                              title="a different basis of the same subspace")


def record_entries(results: dict) -> list[tuple[str, int | None, float]]:
    """``(arm, seed, value)`` of experiments/results/linear_pca.json from :func:`run`'s results."""
    angles, seed = results["max_angle_deg"], results.get("seed", SEED)
    return [("linear autoencoder 784-16-784", seed, results["autoencoder_squared_error_per_image"]),
            ("PCA, k = 16", None, results["pca_squared_error_per_image"]),
            ("largest principal angle, decoder rows vs PCA top 16", seed, angles["decoder_rows"]),
            ("largest principal angle, decoder rows vs PCA top 17", seed,
             angles["decoder_rows_vs_top_k_plus_1"])]


def main() -> None:
    from experiments import results as records

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/repro_linear_pca")
    parser.add_argument("--seed", type=int, default=SEED,
                        help="seed of the initialization and the batch order")
    parser.add_argument("--quick", action="store_true", help="tiny setting (tests)")
    args = parser.parse_args()
    results = run(args.workdir, quick=args.quick, seed=args.seed)
    if records.default_run(parser, args):
        records.record_many("linear_pca", record_entries(results),
                            wall_seconds=results["wall_seconds"])
    print({k: results[k] for k in ("autoencoder_squared_error_per_image",
                                   "pca_squared_error_per_image", "relative_gap", "max_angle_deg")})
    print(f"wrote {os.path.join(args.workdir, 'results.json')} in {results['wall_seconds']} s")


if __name__ == "__main__":
    main()
