"""Burda et al.'s VAE and IWAE protocol on dynamically binarized Fashion-MNIST.

Run:
    python -m experiments.repro_iwae --workdir=runs/repro_iwae [--seeds=0,1,2] [--stages=4]
        [--ks=1,10,100,1000,5000] [--quick]

Burda et al. (2016), section 5: the one-stochastic-layer model 784-200-200-50 (tanh, Bernoulli
decoder), trained on the ELBO (the VAE) and on the k = 5 importance-weighted bound (the IWAE),
with Adam (epsilon 1e-4) and Burda's schedule: learning rate 1e-3 * 10^(-i/7) for 3^i epochs,
i = 0 .. ``--stages`` (4: 121 epochs). Then on the whole test set, binarized once: the test NLL
estimated by the IWAE bound with each k of ``--ks`` (mean and standard error over the 10,000
images) and the active units (Var_x E_q[z_u | x] > 0.01). The claims tested: the IWAE-trained
model has the lower NLL and more active units, and the NLL estimate falls with k.

Every run resumes: training from its checkpoints, and each finished evaluation is kept in
``WORKDIR/ARM_seedS/nll_kK_eE.npy`` (E: the epochs trained). Training of every model comes
first, then the evaluations, the k = 5000 ones first; ``WORKDIR/results.json`` is written after
each step. At the end, for the documented setting (any seeds and stages), the script writes
``experiments/results/iwae.json``.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import ml_collections
import numpy as np

from aejax import models, vae
from aejax.runtime.config import default_config
from experiments import probes
from experiments.repro_vae import active_units, fixed_binarization

ARMS = {"vae": "VAE", "iwae5": "IWAE (k = 5)"}
KS = (1, 10, 100, 1000, 5000)
BINARIZATION_SEED = 1  # the test set's one binarization, as in repro_vae


def epochs_of(stages: int) -> int:
    """Epochs of Burda's schedule through stage ``stages``: 1 + 3 + ... + 3^stages."""
    return sum(3 ** i for i in range(stages + 1))


def burda_config(arm: str, seed: int, *, stages: int, batch_size: int,
                 quick: bool = False) -> ml_collections.ConfigDict:
    """The run of ``arm`` ("vae" or "iwae5") with ``seed``."""
    c = default_config()
    c.seed = seed
    c.data.binarize = True
    c.model = ml_collections.ConfigDict(dict(name="vae", hidden=(200, 200), latent_size=50,
                                             activation="tanh", likelihood="bernoulli"))
    if arm == "vae":
        c.loss.terms = ml_collections.ConfigDict({"kl": {"weight": 1.0}})
    elif arm == "iwae5":
        # The bound alone is the loss; reconstruction and KL are logged at weight 0 (the ELBO).
        c.loss.reconstruction_weight = 0.0
        c.loss.terms = ml_collections.ConfigDict({"iwae": {"weight": 1.0, "num_samples": 5},
                                                  "kl": {"weight": 0.0}})
    else:
        raise ValueError(f"Unknown arm {arm!r}; choose one of {sorted(ARMS)}.")
    c.batch_size = batch_size
    c.num_epochs = epochs_of(stages)
    c.optimizer.update(learning_rate=1e-3, schedule="burda", eps=1e-4)
    c.iwae_samples = 0  # evaluated here, on the whole test set, for every k
    c.pca_baseline = False
    c.figures = False
    c.progress = False
    if quick:
        c.data.train_examples = 1000
    return c


def arm_entries(results: dict) -> list[tuple[str, int, float]]:
    """``(arm, seed, value)`` of experiments/results/iwae.json from :func:`main`'s results."""
    entries = []
    for run in results["runs"]:
        name, seed = ARMS[run["arm"]], run["seed"]
        for k, nll in run["nll"].items():
            entries.append((f"{name}: NLL, k = {k}", seed, nll["mean"]))
        if run.get("active_units") is not None:
            entries.append((f"{name}: active units", seed, run["active_units"]))
    return entries


def make_record(results: dict) -> dict:
    """experiments/results/iwae.json from :func:`main`'s results: the claims, Burda et al.'s
    numbers, our values per seed and the comparisons whose verdicts RESULTS.md computes."""
    arms: dict = {}
    for arm, seed, value in arm_entries(results):
        entry = arms.setdefault(arm, {"values": [], "seeds": []})
        entry["values"].append(round(float(value), 4))
        entry["seeds"].append(seed)
        if arm.endswith("active units"):
            entry.update(metric="latent units of 50 with Var_x E_q[z_u | x] > 0.01", decimals=1)
    vae_, iw = ARMS["vae"], ARMS["iwae5"]
    k_max, k_min = str(max(KS)), str(min(KS))
    comparisons = [
        (f"the IWAE-trained model has the lower test NLL (k = {k_max})",
         f"{iw}: NLL, k = {k_max}", f"{vae_}: NLL, k = {k_max}", "less"),
        ("the IWAE-trained model has more active units",
         f"{iw}: active units", f"{vae_}: active units", "greater"),
        (f"the NLL estimate falls with k (VAE-trained: k = {k_max} below k = {k_min})",
         f"{vae_}: NLL, k = {k_max}", f"{vae_}: NLL, k = {k_min}", "less"),
        (f"the NLL estimate falls with k (IWAE-trained: k = {k_max} below k = {k_min})",
         f"{iw}: NLL, k = {k_max}", f"{iw}: NLL, k = {k_min}", "less"),
    ]
    runs = results["runs"]
    seconds = sum(r.get("train_seconds") or 0 for r in runs) + sum(
        v.get("seconds") or 0 for r in runs for v in r["nll"].values())
    return {
        "name": "iwae", "number": 13,
        "title": "VAE against IWAE: Burda et al.'s protocol, the test NLL against k",
        "label": "IWAE vs VAE (Burda)",
        "claim": "Training on the k = 5 importance-weighted bound gives a lower test NLL and more "
                 "active units than training on the ELBO, and the IWAE estimate of the NLL falls "
                 "as k grows (Burda et al. 2016).",
        "source": "Burda et al. 2016 (ICLR), \"Importance weighted autoencoders\", Table 1 (one "
                  "stochastic layer, MNIST, NLL estimated with k = 5000)",
        "published": {
            "NLL, VAE (k = 1)": {"value": 86.76, "dataset": "MNIST"},
            "NLL, IWAE (k = 5)": {"value": 85.54, "dataset": "MNIST"},
            "active units, VAE (k = 1)": {"value": 19, "dataset": "MNIST", "decimals": 0},
            "active units, IWAE (k = 5)": {"value": 22, "dataset": "MNIST", "decimals": 0}},
        "metric": "nats per binarized Fashion-MNIST test image (all 10 000, one binarization)",
        "arms": arms,
        "comparisons": [{"claim": c, "a": a, "b": b, "expect": e, "rule": "welch"}
                        for c, a, b, e in comparisons if a in arms and b in arms],
        "protocol": (
            f"784-200-200-50, tanh, Bernoulli decoder; the VAE on the ELBO, the IWAE on the k = 5 "
            f"bound; Adam (epsilon 1e-4), learning rate 1e-3 * 10^(-i/7) for 3^i epochs, i = 0.."
            f"{results['stages']} ({results['epochs']} epochs), batch {results['batch_size']}, "
            "on 55 000 dynamically binarized Fashion-MNIST images (the parameters of the best "
            "validation loss kept), seeds " + ", ".join(str(r["seed"]) for r in runs
                                                         if r["arm"] == "vae") + ". The test NLL "
            "on all 10 000 test images, binarized once, by the IWAE bound with each k; its "
            "standard error over the images is in the table below. The paper: "
            "MNIST, i = 0..7 (3 280 epochs), batch 20."),
        "cost": {"wall_seconds": round(seconds), "cpu": "2 CPU cores shared with other jobs"},
        "command": "python -m experiments.repro_iwae --workdir=runs/repro_iwae "
                   f"--stages={results['stages']}",
    }


def evaluate(model, params, x_bin: np.ndarray, k: int, run_dir: str, epochs: int) -> dict:
    """The per-image NLL estimates with ``k`` samples of the model trained for ``epochs`` (kept in
    ``nll_kK_eE.npy``, so that a run resumed into a longer schedule evaluates afresh): mean, SE."""
    path = os.path.join(run_dir, f"nll_k{k}_e{epochs}.npy")
    seconds = None
    if os.path.exists(path):
        per = np.load(path)
    else:
        t = time.time()
        per = vae.nll_per_example(model, params, x_bin, jax.random.PRNGKey(1000 + k),
                                  num_samples=k, batch_size=100)
        seconds = round(time.time() - t, 1)
        np.save(path + ".tmp.npy", per)
        os.replace(path + ".tmp.npy", path)
    out = dict(mean=float(per.mean()), se=float(per.std(ddof=1) / np.sqrt(len(per))),
               images=int(len(per)))
    if seconds is not None:
        out["seconds"] = seconds
    return out


def main(argv=None) -> dict:
    from experiments import results as records

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/repro_iwae")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--stages", type=int, default=4,
                        help="last stage i of Burda's schedule (4: 121 epochs)")
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--ks", default=",".join(map(str, KS)),
                        help="comma-separated k of the test NLL estimates")
    parser.add_argument("--quick", action="store_true", help="tiny setting (tests, smoke runs)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    ks = sorted({int(k) for k in args.ks.split(",")}, key=lambda k: (k != max(KS), -k))
    stages = 0 if args.quick else args.stages
    t0 = time.time()
    os.makedirs(args.workdir, exist_ok=True)

    splits = probes.fashion(flat=True)
    x_test = splits.test[0][:200] if args.quick else splits.test[0]
    x_bin = fixed_binarization(x_test, BINARIZATION_SEED)
    runs = {(arm, s): {"arm": arm, "seed": s, "nll": {}} for s in seeds for arm in ARMS}
    trained = {}
    results = {"dataset": "fashion_mnist, dynamically binarized; test binarized once "
                          f"(PRNGKey({BINARIZATION_SEED}))",
               "architecture": "784-200-200-50 tanh, Bernoulli", "batch_size": args.batch_size,
               "stages": stages, "epochs": epochs_of(stages), "runs": list(runs.values())}
    documented = records.default_run(parser, args, ignore=("workdir", "seeds", "stages"))

    def save():
        results["wall_seconds"] = round(time.time() - t0, 1)
        probes.save_json(os.path.join(args.workdir, "results.json"), results)

    for (arm, s), run in runs.items():  # every model first
        run_dir = os.path.join(args.workdir, f"{arm}_seed{s}")
        cfg = burda_config(arm, s, stages=stages, batch_size=args.batch_size, quick=args.quick)
        model, params, summary = probes.train_model(cfg, run_dir, splits=splits)
        trained[arm, s] = (model, params, run_dir)
        run.update(epochs=summary["epochs_run"], train_seconds=summary["train_seconds"],
                   test_elbo=summary["test"].get("elbo"))
        means = np.asarray(models.encode_batched(model, params, x_bin))
        run["active_units"] = active_units(means)
        save()
    for k in ks:  # then the evaluations, the largest k first
        for key, run in runs.items():
            model, params, run_dir = trained[key]
            run["nll"][str(k)] = evaluate(model, params, x_bin, k, run_dir, epochs_of(stages))
            save()
    if documented:
        records.write(os.path.join(records.RESULTS_DIR, "iwae.json"),
                      records.validate(make_record(results), "iwae.json"))
    for run in runs.values():
        print(run["arm"], run["seed"], "active", run["active_units"],
              {k: round(v["mean"], 2) for k, v in run["nll"].items()})
    print(f"wall {results['wall_seconds']} s")
    return results


if __name__ == "__main__":
    main()
