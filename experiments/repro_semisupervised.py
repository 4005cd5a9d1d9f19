"""Semi-supervised Fashion-MNIST: a small MLP on a convolutional autoencoder's code, with few labels.

Run:
    python -m experiments.repro_semisupervised --workdir=runs/repro_semisupervised [--quick]

For each seed, the autoencoder (experiments/configs/conv.py, 128-d code) is trained without
labels with that seed (WORKDIR/autoencoder for seed 0, WORKDIR/autoencoder_seedS for the
others); then, for 100/200/500/1000 labels (balanced per class, drawn per seed), the same
MLP(64) is trained on that seed's standardized codes and on raw pixels, and a small CNN from
scratch on the images. Writes
results.json and label_efficiency.png; test error is on the full test set.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Mapping, Sequence

import numpy as np

from experiments import probes

SIZES = (100, 200, 500, 1000)
SEEDS = (0, 1, 2)
STEPS = 300  # classifier steps for every label count, so small label sets are not under-trained
BATCH_SIZE = 64


def balanced_subset(labels: np.ndarray, n: int, *, seed: int, num_classes: int = 10) -> np.ndarray:
    """Sorted indices of ``n`` examples, ``n / num_classes`` of each class, drawn by ``seed``.

    Each class is permuted once per seed and the first ``n / num_classes`` are taken, so for one
    seed the subsets are nested (the 100 labels are among the 200).

    Raises:
      ValueError: ``n`` is not a positive multiple of ``num_classes``, or a class is too small.
    """
    labels = np.asarray(labels)
    if n <= 0 or n % num_classes:
        raise ValueError(f"n must be a positive multiple of {num_classes}, got {n}.")
    per_class = n // num_classes
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise ValueError(f"class {c} has {len(members)} examples; {per_class} are needed.")
        chosen.append(rng.permutation(members)[:per_class])
    return np.sort(np.concatenate(chosen))


def standardizer(features: np.ndarray, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and standard deviation (floored at ``eps``: dead code units stay 0)."""
    return features.mean(axis=0), np.maximum(features.std(axis=0), eps)


def classifier_epochs(n: int, *, steps: int = STEPS, batch_size: int = BATCH_SIZE) -> int:
    """Epochs of ``n`` examples that give at least ``steps`` minibatch steps."""
    return math.ceil(steps / max(n // min(batch_size, n), 1))


def label_efficiency(methods: Mapping[str, tuple], y_train: np.ndarray, y_test: np.ndarray,
                     sizes: Sequence[int], seeds: Sequence[int], *, steps: int = STEPS,
                     batch_size: int = BATCH_SIZE) -> dict:
    """Test error of each method for each label count and seed.

    Args:
      methods: ``{name: (flax classifier, train inputs (N, ...), test inputs (M, ...))}``.
      y_train: ``(N,)`` labels of the training inputs (only a balanced subset is used).
      y_test: ``(M,)`` test labels.
      sizes: label counts.
      seeds: each seed draws its own label subset and classifier initialization.

    Returns:
      ``{name: {str(n): [error per seed]}}``.
    """
    out = {name: {str(n): [] for n in sizes} for name in methods}
    for seed in seeds:
        for n in sizes:
            idx = balanced_subset(y_train, n, seed=seed)
            epochs = classifier_epochs(n, steps=steps, batch_size=batch_size)
            for name, (module, x_tr, x_te) in methods.items():
                params = probes.fit_classifier(module, x_tr[idx], y_train[idx], epochs=epochs,
                                               batch_size=batch_size, seed=seed)
                out[name][str(n)].append(probes.error_rate(module, params, x_te, y_test))
    return out


def summarize(errors: Mapping[str, Mapping[str, Sequence[float]]]) -> dict:
    """Mean and sample standard deviation (ddof=1; 0 for one seed) of each list of errors."""
    return {name: {n: {"mean": float(np.mean(v)),
                       "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}
                   for n, v in per_n.items()}
            for name, per_n in errors.items()}


def autoencoder_config(*, quick: bool, seed: int = 0):
    from experiments.configs import conv

    c = conv.get_config()
    c.seed = seed
    c.num_epochs = 1 if quick else 3
    c.progress = False
    c.pca_baseline = False
    if quick:
        c.data.train_examples = 2000
    return c


def plot(summary: Mapping, path: str) -> str:
    from aejax import figures  # noqa: F401  (sets the headless backend)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, per_n in summary.items():
        ns = [int(n) for n in per_n]
        ax.errorbar(ns, [100 * per_n[str(n)]["mean"] for n in ns],
                    yerr=[100 * per_n[str(n)]["std"] for n in ns], marker="o", ms=3, capsize=3,
                    label=name)
    ax.set_xscale("log")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("labelled training images (balanced)")
    ax.set_ylabel("test error (%)")
    ax.set_title("Fashion-MNIST, mean and std over seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def record_entries(results: Mapping) -> list[tuple[str, int, float]]:
    """``(arm, seed, value)`` of experiments/results/semisupervised.json (test error in percent)
    from :func:`main`'s results."""
    return [(f"{name}, {n} labels", seed, 100 * error)
            for name, per_n in results["errors"].items() for n, errors in per_n.items()
            for seed, error in zip(results["seeds"], errors)]


def main(argv=None) -> dict:
    from experiments import results as records

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/repro_semisupervised")
    parser.add_argument("--quick", action="store_true", help="tiny setting (tests, smoke runs)")
    args = parser.parse_args(argv)
    t0 = time.time()
    os.makedirs(args.workdir, exist_ok=True)
    sizes, seeds, steps = ((100,), (0,), 30) if args.quick else (SIZES, SEEDS, STEPS)

    splits = probes.fashion(flat=False)
    (x_tr, y_tr), _, (x_te, y_te) = splits
    if args.quick:
        x_te, y_te = x_te[:1000], y_te[:1000]
    pixels = (x_tr.reshape(len(x_tr), -1), x_te.reshape(len(x_te), -1))
    errors, autoencoders, t_ae = {}, [], 0.0
    for seed in seeds:  # each seed its own autoencoder, label subsets and classifiers
        t = time.time()
        config = autoencoder_config(quick=args.quick, seed=seed)
        ae_dir = os.path.join(args.workdir, "autoencoder" if seed == 0 else f"autoencoder_seed{seed}")
        model, params, ae_summary = probes.train_model(config, ae_dir, splits=splits)
        codes_tr, codes_te = probes.encode(model, params, x_tr), probes.encode(model, params, x_te)
        t_ae += time.time() - t
        autoencoders.append({"seed": seed, "epochs": ae_summary["epochs_run"],
                             "test_squared_error_per_image":
                                 ae_summary["test"]["squared_error_per_image"],
                             "train_seconds": ae_summary["train_seconds"],
                             "code_size": int(codes_tr.shape[1])})
        # Statistics of the unlabelled training codes: available without labels.
        mean, std = standardizer(codes_tr)
        methods = {
            "autoencoder code + MLP(64)": (probes.MLPClassifier(hidden=(64,)),
                                           (codes_tr - mean) / std, (codes_te - mean) / std),
            "pixels + MLP(64)": (probes.MLPClassifier(hidden=(64,)), *pixels),
            "CNN from scratch": (probes.CNNClassifier(), x_tr, x_te),
        }
        for name, per_n in label_efficiency(methods, y_tr, y_te, sizes, [seed],
                                            steps=steps).items():
            for n, v in per_n.items():
                errors.setdefault(name, {}).setdefault(n, []).extend(v)
        print(f"seed {seed} done ({time.time() - t0:.0f} s)", flush=True)
    summary = summarize(errors)
    results = {
        "dataset": "fashion_mnist", "test_examples": int(len(y_te)), "sizes": list(sizes),
        "seeds": list(seeds), "classifier_steps": steps, "batch_size": BATCH_SIZE,
        "autoencoders": autoencoders,
        "errors": errors, "summary": summary,
        "figures": [os.path.basename(plot(summary, os.path.join(args.workdir, "label_efficiency.png")))],
        "autoencoder_seconds": round(t_ae, 1), "wall_seconds": round(time.time() - t0, 1),
    }
    probes.save_json(os.path.join(args.workdir, "results.json"), results)
    if records.default_run(parser, args):
        records.record_many("semisupervised", record_entries(results),
                            wall_seconds=results["wall_seconds"])
    for name, per_n in summary.items():
        print(name, {n: f"{100 * s['mean']:.2f} +- {100 * s['std']:.2f}" for n, s in per_n.items()})
    print(f"wall {results['wall_seconds']} s")
    return results


if __name__ == "__main__":
    main()
