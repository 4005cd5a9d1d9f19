"""Reproduction: sparse autoencoders, L1 activity penalty and KL sparsity, and what the sparsity costs.

Run:
    python -m experiments.repro_sparse --workdir=runs/repro_sparse [--quick]

L1: the Keras tutorial's 784-32-784 with a ReLU code and Bernoulli cross-entropy, the penalty
weight swept around the Keras-equivalent 0.0784 (Keras: 1e-4 on a loss averaged over pixels;
aejax sums over pixels, so 784 x 1e-4; see experiments/configs/sparse_l1.py). KL: 784-64-784 with
a sigmoid code, rho = 0.05, beta swept around Ng's 3 on the Bernoulli cross-entropy; and Ng's own
objective, half the squared error summed over pixels plus beta = 3 times the KL penalty, with
sigmoid outputs (``NG_BETA``; the ``"mse"`` reconstruction is a mean over the D pixels, so the
KL weight is 2 beta / D and the objective is Ng's times 2 / D). Reports the mean code activation over the
test set (Keras' `encoded_imgs.mean()`), the reconstruction error, and a plot of both against the
weight. Expect (measured: about 4 minutes on 2 shared CPU cores): the mean activation falls and
the error rises with the weight; at the Keras-equivalent weight the mean activation is 1.31
against 2.55 without the penalty; see experiments/results/sparse.md.
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

SEED = 0
KERAS_L1 = 784 * 1e-4
L1_WEIGHTS = (0.0, 0.1 * KERAS_L1, 0.3 * KERAS_L1, KERAS_L1, 3 * KERAS_L1)
KL_WEIGHTS = (0.0, 0.3, 3.0, 30.0)
RHO = 0.05
NG_BETA = 3.0
# Each kind's reconstruction term: Ng's objective is the squared error of sigmoid outputs.
RECONSTRUCTION = {"l1": "bce", "kl": "bce", "ng": "mse"}


def make_setting(kind: str, weight: float, *, input_dim: int = 784) -> tuple[Any, dict]:
    """The model and the objective terms of one point of the sweep (``kind`` ``l1`` or ``kl``)."""
    if kind == "l1":
        model = models.MLPAutoencoder(input_shape=(input_dim,), hidden=(), code_size=32,
                                      code_activation="relu")
        return model, {"l1": {"weight": weight, "layer": "code"}}
    if kind in ("kl", "ng"):
        model = models.MLPAutoencoder(input_shape=(input_dim,), hidden=(), code_size=64,
                                      code_activation="sigmoid")
        # ng: 1/2 sum of squared errors + beta KL = (D / 2) (mean squared error + 2 beta / D KL).
        w = weight if kind == "kl" else 2.0 * weight / input_dim
        return model, {"kl_sparsity": {"weight": w, "rho": RHO, "layer": "code"}}
    raise ValueError(f"Unknown sparsity kind {kind!r}; choose 'l1', 'kl' or 'ng'.")


def code_statistics(codes: np.ndarray) -> dict[str, float]:
    """Mean activation (Keras' ``encoded_imgs.mean()``), fraction of exact zeros, units never active."""
    codes = np.asarray(codes)
    return {"mean_activation": float(codes.mean()),
            "fraction_zero": float((codes == 0).mean()),
            "dead_units": int((codes.max(axis=0) <= 0).sum()),
            "mean_unit_activation_min": float(codes.mean(axis=0).min()),
            "mean_unit_activation_max": float(codes.mean(axis=0).max())}


def train_sparse(kind: str, weight: float, x_train: np.ndarray, *, epochs: int,
                 learning_rate: float = 1e-3, seed: int = SEED) -> tuple[Any, Any, Any]:
    """Trains one point of the sweep; returns ``(model, params, per_example)``."""
    model, terms = make_setting(kind, weight, input_dim=x_train.shape[1])
    params = models.init(model, jax.random.PRNGKey(seed), jnp.asarray(x_train[:2]))
    objectives.check_compatible(model, params, jnp.asarray(x_train[:256]), terms)
    per_example = step.make_per_example_fn(model, objectives.build(RECONSTRUCTION[kind], terms))
    params, _ = fit(per_example, params, optax.adam(learning_rate), x_train, epochs=epochs, seed=seed)
    return model, params, per_example


def sweep_point(kind: str, weight: float, x_train: np.ndarray, x_test: np.ndarray, *,
                epochs: int, seed: int = SEED) -> dict:
    from experiments import probes

    model, params, per_example = train_sparse(kind, weight, x_train, epochs=epochs, seed=seed)
    test = evaluate(per_example, params, x_test)
    stats = code_statistics(probes.encode(model, params, x_test))
    return {"kind": kind, "weight": weight, "squared_error_per_image": test["squared_error_per_image"],
            **({"bce_nats_per_image": test["reconstruction"],
                "bce_per_pixel": test["reconstruction"] / x_test.shape[1]}
               if RECONSTRUCTION[kind] == "bce" else {"mse_per_pixel": test["reconstruction"]}),
            **stats}


def run(workdir: str, *, quick: bool = False, seed: int = SEED) -> dict:
    from experiments import probes

    t0 = time.time()
    splits = probes.fashion()
    x_train, x_test = splits.train[0], splits.test[0]
    epochs, l1_weights, kl_weights = 10, L1_WEIGHTS, KL_WEIGHTS
    if quick:
        x_train, x_test, epochs = x_train[:2048], x_test[:500], 1
        l1_weights, kl_weights = (0.0, KERAS_L1), (3.0,)
    os.makedirs(workdir, exist_ok=True)
    rows = []
    for kind, weights in (("l1", l1_weights), ("kl", kl_weights), ("ng", (NG_BETA,))):
        for w in weights:
            rows.append(sweep_point(kind, w, x_train, x_test, epochs=epochs, seed=seed))
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()},
                  f"({time.time() - t0:.0f} s)", flush=True)
    path = plot_sweep(rows, os.path.join(workdir, "sparse_sweep.png"))
    results = {"dataset": "fashion_mnist", "epochs": epochs, "seed": seed, "rho": RHO,
               "keras_equivalent_l1_weight": KERAS_L1,
               "models": {"l1": "784-32-784, ReLU code, BCE summed over pixels, Adam 1e-3, batch 256",
                          "kl": "784-64-784, sigmoid code, BCE summed over pixels, Adam 1e-3, batch 256",
                          "ng": "784-64-784, sigmoid code and outputs, 1/2 squared error summed "
                                "over pixels + beta KL (Ng's objective, scaled by 2 / 784), "
                                "Adam 1e-3, batch 256"},
               "train_examples": len(x_train), "test_examples": len(x_test), "rows": rows,
               "figures": [os.path.basename(path)], "wall_seconds": round(time.time() - t0, 1),
               "quick": quick}
    probes.save_json(os.path.join(workdir, "results.json"), results)
    return results


def plot_sweep(rows: list[dict], path: str) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    titles = {"l1": "L1 activity, ReLU code (784-32-784)",
              "kl": f"KL sparsity rho={RHO}, sigmoid code (784-64-784)"}
    for ax, kind in zip(axes, ("l1", "kl")):
        rs = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["weight"])
        if not rs:
            continue
        # Evenly spaced points labelled with their weights: the sweep is roughly logarithmic and
        # starts at 0, which no log axis can show.
        pos = np.arange(len(rs))
        ax.plot(pos, [r["squared_error_per_image"] for r in rs], "o-", color="C0")
        ax.set_ylabel("test squared error / image", color="C0")
        ax2 = ax.twinx()
        ax2.plot(pos, [r["mean_activation"] for r in rs], "s--", color="C3")
        ax2.set_ylabel("mean code activation", color="C3")
        ax2.set_ylim(bottom=0)
        if kind == "kl":
            ax2.axhline(RHO, color="C3", lw=0.8, ls=":")
        ax.set_xticks(pos, [f"{r['weight']:.3g}" for r in rs])
        ax.set_xlabel("penalty weight" + (" (Keras-equivalent: 0.0784)" if kind == "l1" else ""))
        ax.set_title(titles[kind], fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def record_entries(results: dict) -> list[tuple[str, int, float]]:
    """``(arm, seed, value)`` of experiments/results/sparse.json from :func:`run`'s results."""
    mean = {(r["kind"], r["weight"]): r["mean_activation"] for r in results["rows"]}
    seed = results.get("seed", SEED)
    return [("ReLU 32, no penalty", seed, mean["l1", 0.0]),
            ("ReLU 32, L1 0.0784 (Keras-equivalent)", seed, mean["l1", KERAS_L1]),
            ("mean activation ratio, L1 0.0784 / no penalty", seed,
             mean["l1", KERAS_L1] / mean["l1", 0.0]),
            ("sigmoid 64, KL rho 0.05, beta 3, Ng's objective", seed, mean["ng", NG_BETA]),
            ("sigmoid 64, KL rho 0.05, beta 3, BCE", seed, mean["kl", 3.0])]


def main() -> None:
    from experiments import results as records

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/repro_sparse")
    parser.add_argument("--seed", type=int, default=SEED,
                        help="seed of the initialization and the batch order")
    parser.add_argument("--quick", action="store_true", help="tiny setting (tests)")
    args = parser.parse_args()
    results = run(args.workdir, quick=args.quick, seed=args.seed)
    if records.default_run(parser, args):
        records.record_many("sparse", record_entries(results), wall_seconds=results["wall_seconds"])
    print(f"wrote {os.path.join(args.workdir, 'results.json')} in {results['wall_seconds']} s")


if __name__ == "__main__":
    main()
