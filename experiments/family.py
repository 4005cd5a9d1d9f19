"""Trains every member of the family on full Fashion-MNIST and writes a results table.

Run:
    python -m experiments.family --workdir=runs/family [--only=vanilla,conv] [--epochs=N]

Each config in FAMILY runs as `python -m experiments.main` would (resumable workdirs under
--workdir); the table goes to experiments/FAMILY.md and stdout. The generative members
(GENERATIVE) are also scored on what they generate (experiments/quality.py: Frechet distance,
precision and recall on a cached classifier's features, beside the test set's own floor). With
--only, the rows of the other configs are kept from the existing table.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time

FAMILY = ("vanilla", "multilayer", "conv", "denoising", "sparse_l1", "sparse_kl", "contractive",
          "tied", "stacked", "vae", "beta_vae", "beta_tcvae", "cvae", "wae", "rae", "vqvae", "iwae")
GENERATIVE = ("vae", "beta_vae", "beta_tcvae", "cvae", "wae", "rae", "vqvae", "iwae")
HEADER = "| config | epochs | test SE/image | PCA SE/image | mean code activation | terms | seconds |"
QUALITY_HEADER = ("| config | generated images | Frechet distance | precision | recall |")


def load_config(name: str):
    return importlib.import_module(f"experiments.configs.{name}").get_config()


def run_one(name: str, workdir: str, epochs: int | None) -> dict:
    from aejax.runtime import stacking

    config = load_config(name)
    config.progress = False
    if epochs:
        config.num_epochs = epochs
    t = time.time()
    summary = stacking.train(config, os.path.join(workdir, name))
    if "finetune" in summary:  # greedy stacking: the fine-tuned model, beside it from scratch
        summary = dict(summary["finetune"], scratch_test=summary.get("scratch", {}).get("test"))
    summary["wall_seconds"] = round(time.time() - t, 1)
    if name in GENERATIVE:
        from experiments import probes, quality

        summary["quality"] = quality.generation_scores(config, os.path.join(workdir, name),
                                                       probes.fashion(flat=True))
    return summary


def quality_row(name: str, q: dict) -> str:
    if "frechet_distance" not in q:
        return f"| {name} | {q['sampler']} | — | — | — |"
    return (f"| {name} | {q['sampler']} | {q['frechet_distance']:.2f} | {q['precision']:.3f} | "
            f"{q['recall']:.3f} |")


def kept_rows(path: str, header: str, names: set) -> dict:
    """The rows of the table under ``header`` in ``path`` whose config is not in ``names``."""
    if not os.path.exists(path):
        return {}
    rows, inside = {}, False
    for line in open(path).read().splitlines():
        if line == header:
            inside = True
        elif inside and line.startswith("| ") and not line.startswith("|---"):
            name = line.split("|")[1].strip()
            if name not in names:
                rows[name] = line
        elif inside and not line.startswith("|"):
            inside = False
    return rows


def row(name: str, s: dict) -> str:
    t = s["test"]
    pca = s.get("pca", {}).get("test", {}).get("squared_error_per_image")
    extra = []
    for key in ("l1", "kl_sparsity", "contractive", "kl", "index_code_mi", "total_correlation",
                "dimwise_kl", "mmd", "l2_activity", "decoder_jacobian", "codebook_perplexity",
                "codebook_usage", "iwae", "elbo", "iwae_nll"):
        if key in t:
            extra.append(f"{key} {t[key]:.4g}")
    if s.get("scratch_test"):
        extra.append(f"from scratch: {s['scratch_test']['squared_error_per_image']:.2f}")
    return (f"| {name} | {s['epochs_run']} | {t['squared_error_per_image']:.2f} | "
            f"{'' if pca is None else f'{pca:.2f}'} | {t['code_mean_activation']:.3f} | "
            f"{'; '.join(extra)} | {s['wall_seconds']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="runs/family")
    parser.add_argument("--only", default="", help="comma-separated config names")
    parser.add_argument("--epochs", type=int, default=0, help="override num_epochs (0: config's)")
    parser.add_argument("--table", default=os.path.join(os.path.dirname(__file__), "FAMILY.md"))
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(FAMILY)
    results = {}
    for name in names:
        results[name] = run_one(name, args.workdir, args.epochs or None)
        print(json.dumps({"config": name, "test": results[name]["test"]}), flush=True)
    lines = ["# The family on full Fashion-MNIST", "",
             f"Made by `python -m experiments.family --workdir={args.workdir}"
             + (f" --epochs={args.epochs}" if args.epochs else "") + "` on 2 CPU cores (a run "
             "with `--only=NAMES` replaces those rows and keeps the others).",
             "Squared error per test image (sum over 784 pixels, Hinton & Salakhutdinov's measure) "
             "for the best-validation parameters; PCA at the same code size; terms in nats. The "
             "VAE-family configs train on dynamically binarized images, so their errors are "
             "against binary targets, and their PCA is fitted and scored on binarized images too; "
             "`seconds` is the wall time of the command's work on that row on a shared machine "
             "(for a run that had finished before, its re-evaluation's). The conditional VAE "
             "(cvae) is given each image's label, so its ELBO and IWAE NLL bound log p(x|y), not "
             "log p(x), and its samples are of every class in turn.", "",
             HEADER, "|---|---|---|---|---|---|---|"]
    old = kept_rows(args.table, HEADER, set(results))
    new = {n: row(n, s) for n, s in results.items()}
    lines += [new.get(n) or old[n] for n in FAMILY if n in new or n in old]
    old_q = kept_rows(args.table, QUALITY_HEADER, set(results))
    new_q = {n: quality_row(n, s["quality"]) for n, s in results.items() if "quality" in s}
    floors = [s["quality"]["floor"] for s in results.values() if "floor" in s.get("quality", {})]
    if new_q or old_q:
        lines += ["", "## What the generative members generate", "",
                  "10,000 generated images (decoded means) against the first 10,000 test images, "
                  "on the 128 features of experiments/quality.py's classifier (MLP 784-512-128-10, "
                  "trained once on the training images and cached); precision and recall are "
                  "Kynkaanniemi et al.'s, k = 3. The floor is the test set's second half scored "
                  "against its first half (5,000 images each).", "", QUALITY_HEADER,
                  "|---|---|---|---|---|"]
        if floors:
            f = floors[0]
            lines.append(f"| (floor: test images) | the test set's other half | "
                         f"{f['frechet_distance']:.2f} | {f['precision']:.3f} | {f['recall']:.3f} |")
        elif "(floor: test images)" in old_q:
            lines.append(old_q["(floor: test images)"])
        lines += [new_q.get(n) or old_q[n] for n in FAMILY if n in new_q or n in old_q]
    table = "\n".join(lines) + "\n"
    with open(args.table, "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
