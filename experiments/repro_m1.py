"""Semi-supervised classification with VAE features (Kingma et al. 2014, model M1).

Run:
    python -m experiments.repro_m1 --workdir=runs/repro_m1 [--seeds=0,1,2] [--quick]

M1: a VAE 784-600-600-50 (softplus hidden units, Bernoulli decoder on dynamically binarized
images, Adam 3e-4, batch 100) is trained on all 55,000 training images without their labels;
its posterior means are the features. Controls: PCA with 50 components (fit on the same
unlabelled images) and the raw pixels. On each feature set, with 100 and 1,000 labelled
examples (balanced: 10 and 100 per class), two classifiers:

- an RBF support vector machine (scikit-learn ``SVC``), C and gamma chosen by 5-fold stratified
  cross-validation on the labelled examples only;
- L2-regularized logistic regression (``LogisticRegression``, lbfgs to a gradient tolerance of
  1e-3), C chosen the same way.

Every feature set is standardized with the statistics of the 55,000 unlabelled training images.
For each feature seed (the VAE's seed; for PCA and pixels, which have none, it only indexes the
label draws) 10 label draws are classified; a seed's value is the mean test error over its 10
draws, on the full 10,000-image test set. The claims tested: VAE features beat PCA-50 and the
raw pixels at 100 and at 1,000 labels, per classifier (Welch's t over the 3 seeds).

The paper: M1 + a transductive SVM on MNIST, 11.82% (100 labels) and 4.24% (1,000 labels) test
error. Every VAE run resumes from its checkpoints; ``WORKDIR/results.json`` is written after each
seed. The documented setting writes ``experiments/results/m1.json``.
"""

from __future__ import annotations

import argparse
import os
import time

import ml_collections
import numpy as np

from aejax import pca
from aejax.runtime.config import default_config
from experiments import probes
from experiments.repro_vae import active_units

LABEL_COUNTS = (100, 1000)
FEATURES = ("VAE (M1)", "PCA-50", "raw pixels")
CLASSIFIERS = {"svm": "RBF SVM", "logreg": "logistic regression"}
PUBLISHED_MNIST_TSVM = {100: 11.82, 1000: 4.24}  # Kingma et al. 2014, Table 1, M1 + TSVM


def vae_config(seed: int, *, epochs: int, train_examples: int = 0) -> ml_collections.ConfigDict:
    c = default_config()
    c.seed = seed
    c.data.binarize = True
    c.data.train_examples = train_examples
    c.model = ml_collections.ConfigDict(dict(name="vae", hidden=(600, 600), latent_size=50,
                                             activation="softplus", likelihood="bernoulli"))
    c.loss.terms = ml_collections.ConfigDict({"kl": {"weight": 1.0}})
    c.optimizer.learning_rate = 3e-4
    c.batch_size = 100
    c.num_epochs = epochs
    c.iwae_samples = 0
    c.progress = False
    c.figures = False
    c.pca_baseline = False
    c.tensorboard = False
    c.keep_checkpoints = 1
    c.checkpoint_every_steps = 10**9  # the end-of-epoch checkpoints only
    return c


def balanced_draw(y: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``count`` examples, ``count // 10`` per class, drawn without replacement."""
    per_class = count // 10
    return np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False)
                           for c in range(10)])


def fit_predict(kind: str, x_lab: np.ndarray, y_lab: np.ndarray, x_test: np.ndarray
                ) -> tuple[np.ndarray, dict]:
    """Cross-validates ``kind``'s hyperparameters on the labelled examples only, refits on all of
    them, predicts ``x_test``; returns the predictions and the chosen hyperparameters."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.svm import SVC

    if kind == "svm":
        # gamma around scikit-learn's "scale" (1 / (D var)); the features are standardized.
        base = 1.0 / x_lab.shape[1]
        estimator, grid = SVC(kernel="rbf"), {"C": [1.0, 10.0, 100.0],
                                              "gamma": [base / 3, base, 3 * base]}
    elif kind == "logreg":
        estimator, grid = LogisticRegression(max_iter=5000, tol=1e-3), {"C": [0.001, 0.01, 0.1, 1.0]}
    else:
        raise ValueError(f"unknown classifier {kind!r}; choose one of {sorted(CLASSIFIERS)}")
    search = GridSearchCV(estimator, grid, cv=StratifiedKFold(5, shuffle=True, random_state=0),
                          n_jobs=2, refit=True)
    search.fit(x_lab, y_lab)
    return search.predict(x_test), {k: float(v) for k, v in search.best_params_.items()}


def classify_all(features: dict[str, tuple[np.ndarray, np.ndarray]], y_tr: np.ndarray,
                 y_te: np.ndarray, *, seed: int, draws: int, label_counts=LABEL_COUNTS) -> dict:
    """Test errors (percent) per feature set, label count and classifier, for ``draws`` label
    draws of this seed: ``{feature: {count: {classifier: [errors]}}}`` and the choices made."""
    out: dict = {}
    for count in label_counts:
        for d in range(draws):
            idx = balanced_draw(y_tr, count, np.random.default_rng([seed, count, d]))
            for name, (f_tr, f_te) in features.items():
                for kind in CLASSIFIERS:
                    pred, chosen = fit_predict(kind, f_tr[idx], y_tr[idx], f_te)
                    error = 100.0 * float((pred != y_te).mean())
                    slot = out.setdefault(name, {}).setdefault(str(count), {})
                    slot.setdefault(kind, []).append(error)
                    slot.setdefault(f"{kind}_chosen", []).append(chosen)
    return out


def run_seed(workdir: str, seed: int, *, epochs: int, draws: int, train_examples: int = 0,
             pca_cache: dict | None = None) -> dict:
    (x_tr, y_tr), _, (x_te, y_te) = probes.fashion()
    if train_examples:
        x_tr, y_tr = x_tr[:train_examples], y_tr[:train_examples]
    t = time.time()
    model, params, summary = probes.train_model(
        vae_config(seed, epochs=epochs, train_examples=train_examples),
        os.path.join(workdir, f"vae_seed{seed}"), probes.fashion())
    train_seconds = time.time() - t
    features = {}
    z_tr, z_te = probes.encode(model, params, x_tr), probes.encode(model, params, x_te)
    features[FEATURES[0]] = tuple(probes.standardize(z_tr, z_te))
    if pca_cache is None or "pca" not in pca_cache:
        fit = pca.fit(x_tr, 50)
        p_tr, p_te = np.asarray(pca.encode(fit, x_tr)), np.asarray(pca.encode(fit, x_te))
        cache = {"pca": tuple(probes.standardize(p_tr, p_te)),
                 "pixels": tuple(probes.standardize(x_tr, x_te))}
        if pca_cache is not None:
            pca_cache.update(cache)
    else:
        cache = pca_cache
    features[FEATURES[1]] = cache["pca"]
    features[FEATURES[2]] = cache["pixels"]
    t = time.time()
    errors = classify_all(features, y_tr, y_te, seed=seed, draws=draws)
    return {"seed": seed, "errors": errors, "vae_test": summary["test"],
            "active_units": active_units(z_tr),
            "epochs_run": summary["epochs_run"], "train_seconds": round(train_seconds, 1),
            "classify_seconds": round(time.time() - t, 1)}


def arm(feature: str, kind: str, count: int) -> str:
    return f"{feature} + {CLASSIFIERS[kind]}, {count} labels"


def record_entries(runs: list[dict]) -> list[tuple[str, int, float]]:
    """``(arm, seed, mean test error over the seed's label draws)``."""
    return [(arm(feature, kind, int(count)), r["seed"], float(np.mean(by_kind[kind])))
            for r in runs for feature, by_count in r["errors"].items()
            for count, by_kind in by_count.items() for kind in CLASSIFIERS]


def make_record(runs: list[dict], *, epochs: int, draws: int, wall_seconds: float) -> dict:
    arms = {}
    for a, seed, value in record_entries(runs):
        entry = arms.setdefault(a, {"values": [], "seeds": []})
        entry["values"].append(round(value, 4))
        entry["seeds"].append(seed)
    comparisons = []
    for count in LABEL_COUNTS:
        for kind in CLASSIFIERS:
            for control in FEATURES[1:]:
                comparisons.append({
                    "claim": f"VAE features beat {control} ({CLASSIFIERS[kind]}, {count} labels)",
                    "a": arm(FEATURES[0], kind, count), "b": arm(control, kind, count),
                    "expect": "less", "rule": "welch"})
    seeds = sorted(r["seed"] for r in runs)
    return {
        "name": "m1", "number": 15,
        "title": "Semi-supervised classification with VAE features (M1)",
        "label": "M1 semi-supervised",
        "claim": "A classifier on a VAE's posterior means, trained with few labels, beats the same "
                 "classifier on PCA features and on the raw pixels (Kingma et al. 2014, M1).",
        "source": "Kingma, Rezende, Mohamed & Welling 2014 (NeurIPS), \"Semi-supervised learning "
                  "with deep generative models\", Table 1: M1 + TSVM on MNIST",
        "published": {f"M1 + TSVM, {n} labels (Table 1)": {"value": v, "dataset": "MNIST"}
                      for n, v in PUBLISHED_MNIST_TSVM.items()},
        "metric": "test error, % of the 10,000 Fashion-MNIST test images (mean over 10 label "
                  "draws per seed)",
        "arms": arms,
        "comparisons": comparisons,
        "protocol": f"VAE 784-600-600-50, softplus, Bernoulli decoder on dynamically binarized "
                    f"images, Adam 3e-4, batch 100, {epochs} epochs on the 55,000 unlabelled "
                    "training images, features = posterior means; PCA-50 fit on the same images; "
                    "features standardized by the unlabelled images' statistics; RBF SVM (C, "
                    "gamma) and L2 logistic regression (C) chosen by 5-fold stratified "
                    f"cross-validation on the labelled examples only; {draws} balanced label "
                    f"draws per seed; seeds {', '.join(map(str, seeds))}. The paper: MNIST, a "
                    "transductive SVM, M1 trained to convergence.",
        "cost": {"wall_seconds": round(wall_seconds, 1),
                 "cpu": "2 CPU cores shared with other jobs"},
        "command": "python -m experiments.repro_m1 --workdir=runs/repro_m1",
    }


def section(runs: list[dict], record: dict, *, epochs: int) -> str:
    """The RESULTS.md section: every arm's mean over the seeds, the choices, the verdicts."""
    from experiments import results as records

    seeds = [r["seed"] for r in runs]
    lines = [f"### {record['number']}. {record['title']}", "",
             f"`{record['command']}` (seeds {', '.join(map(str, seeds))}; "
             f"{record['cost']['wall_seconds'] / 60:.0f} min of compute, "
             f"{record['cost']['cpu']}). {record['protocol']}", "",
             "Test error, % (mean ± sample standard deviation over the seeds, each seed the mean "
             "of its label draws; in brackets the standard deviation over all draws):", "",
             "| features | classifier | " + " | ".join(f"{n} labels" for n in LABEL_COUNTS)
             + " |", "|---|---|" + "---|" * len(LABEL_COUNTS)]
    for feature in FEATURES:
        for kind in CLASSIFIERS:
            cells = []
            for n in LABEL_COUNTS:
                per_seed = [np.mean(r["errors"][feature][str(n)][kind]) for r in runs]
                draws = np.concatenate([r["errors"][feature][str(n)][kind] for r in runs])
                spread = f"{np.std(per_seed, ddof=1):.2f}" if len(per_seed) > 1 else "—"
                cells.append(f"{np.mean(per_seed):.2f} ± {spread} ({np.std(draws, ddof=1):.2f})")
            lines.append(f"| {feature} | {CLASSIFIERS[kind]} | " + " | ".join(cells) + " |")
    lines.append("| M1 + TSVM, MNIST (Kingma et al. 2014) | transductive SVM | "
                 + " | ".join(f"{PUBLISHED_MNIST_TSVM[n]}" for n in LABEL_COUNTS) + " |")
    test = [r["vae_test"] for r in runs]
    lines += ["", "The VAEs on the test images (one fixed binarization): ELBO "
              + ", ".join(f"{t['elbo']:.1f}" for t in test) + " nats; KL "
              + ", ".join(f"{t['kl']:.1f}" for t in test) + " nats (seeds "
              + ", ".join(map(str, seeds)) + "). Active units (Burda et al.'s criterion, the "
              "variance over the training images of a unit's posterior mean above 0.01): "
              + ", ".join(str(r["active_units"]) for r in runs) + " of 50; the features are "
              "standardized, so the inactive units reach the classifiers as noise of unit "
              "variance.", "",
              "Verdicts (Welch's t over the seeds, p < 0.05):", ""]
    for c, v in zip(record["comparisons"], records.verdicts(record)):
        lines.append(f"- {c['claim']}: **{v}**")
    lines += ["", "What differs from the paper: Fashion-MNIST, not MNIST; an inductive RBF SVM "
              "and logistic regression, not a transductive SVM; "
              f"{epochs} epochs of Adam "
              "at a fixed learning rate.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    from experiments import results as records

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/repro_m1")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="a tiny setting (tests, smoke runs)")
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    epochs, draws, train_examples = ((1, 2, 2000) if args.quick else
                                     (args.epochs, args.draws, 0))
    t0 = time.time()
    path = os.path.join(args.workdir, "results.json")
    done = {}
    if os.path.exists(path):
        import json

        with open(path) as f:
            previous = json.load(f)
        if previous.get("setting") == dict(epochs=epochs, draws=draws,
                                           train_examples=train_examples):
            done = {r["seed"]: r for r in previous["runs"]}
    cache: dict = {}
    for seed in seeds:
        if seed not in done:
            done[seed] = run_seed(args.workdir, seed, epochs=epochs, draws=draws,
                                  train_examples=train_examples, pca_cache=cache)
            print(f"seed {seed}:", {a: round(v, 2) for a, s, v in record_entries([done[seed]])},
                  flush=True)
        probes.save_json(path, {"setting": dict(epochs=epochs, draws=draws,
                                                train_examples=train_examples),
                                "runs": [done[s] for s in sorted(done)]})
    for seed, r in done.items():  # runs recorded before active units were counted
        if "active_units" not in r:
            model, params, _ = probes.train_model(
                vae_config(seed, epochs=epochs, train_examples=train_examples),
                os.path.join(args.workdir, f"vae_seed{seed}"), probes.fashion())
            x_tr = probes.fashion()[0][0][:train_examples or None]
            r["active_units"] = active_units(probes.encode(model, params, x_tr))
    runs = [done[s] for s in sorted(done)]
    probes.save_json(path, {"setting": dict(epochs=epochs, draws=draws,
                                            train_examples=train_examples), "runs": runs})
    wall = sum(r["train_seconds"] + r["classify_seconds"] for r in runs)
    if records.default_run(parser, args, ignore=("workdir", "seeds")):
        out = os.path.join(records.RESULTS_DIR, "m1.json")
        record = make_record(runs, epochs=epochs, draws=draws, wall_seconds=wall)
        records.write(out, record)
        with open(os.path.join(records.RESULTS_DIR, "m1.md"), "w", encoding="utf-8") as f:
            f.write(section(runs, record, epochs=epochs))
        print(f"wrote {out} and its section m1.md")
    print(f"wrote {path} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
