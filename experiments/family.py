"""Trains every member of the family on full Fashion-MNIST and writes a results table.

Run:
    python -m experiments.family --workdir=runs/family [--only=vanilla,conv] [--epochs=N]

Each config in FAMILY runs as `python -m experiments.main` would (resumable workdirs under
--workdir); the table goes to experiments/FAMILY.md and stdout.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time

FAMILY = ("vanilla", "multilayer", "conv", "denoising", "sparse_l1", "sparse_kl", "contractive",
          "tied", "stacked", "vae", "beta_tcvae", "wae", "rae", "vqvae", "iwae")


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
    return summary


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
             + (f" --only={args.only}" if args.only else "")
             + (f" --epochs={args.epochs}" if args.epochs else "") + "` on 2 CPU cores.",
             "Squared error per test image (sum over 784 pixels, Hinton & Salakhutdinov's measure) "
             "for the best-validation parameters; PCA at the same code size; terms in nats. The VAE "
             "trains on dynamically binarized images, so its errors are against binary targets; "
             "`seconds` is wall time on a shared machine.", "",
             "| config | epochs | test SE/image | PCA SE/image | mean code activation | terms | seconds |",
             "|---|---|---|---|---|---|---|"]
    lines += [row(n, s) for n, s in results.items()]
    table = "\n".join(lines) + "\n"
    with open(args.table, "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
