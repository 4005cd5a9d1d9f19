"""The records whose arms are plain config runs, over more seeds.

Run:
    python -m experiments.repro_configs --record=deep_vs_pca --seed=1 [--workdir=runs/repro_configs]
    python -m experiments.repro_configs --record=reconstructions --seed=1

Each arm of the record is a config of experiments/configs, run as `python -m experiments.main`
would with ``config.seed`` set to ``--seed`` (resumable workdirs WORKDIR/RECORD/CONFIG_seedS).
The arm's value, the test squared error per image of the best-validation parameters, is added to
experiments/results/RECORD.json for that seed; the records' fixed arms (PCA) do not depend on it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import time

# record -> {arm of the record: config of experiments/configs}
ARMS = {
    "reconstructions": {"autoencoder 784-128-32-128-784": "multilayer"},
    "deep_vs_pca": {
        "deep autoencoder, end to end": "fashion_deep",
        "deep autoencoder, greedy pretraining then the same fine-tuning": "fashion_deep_stacked",
    },
}
METRIC = "squared_error_per_image"


def load_config(name: str, seed: int, *, epochs: int | None = None, train_examples: int = 0):
    config = importlib.import_module(f"experiments.configs.{name}").get_config()
    config.seed = seed
    config.progress = False
    config.figures = False
    if epochs:
        config.num_epochs = epochs
        if config.stacking.pretrain_epochs > 0:
            config.stacking.pretrain_epochs = min(config.stacking.pretrain_epochs, epochs)
    if train_examples:
        config.data.train_examples = train_examples
    return config


def test_value(summary: dict) -> float:
    """The fine-tuned model's test squared error per image from a run's summary."""
    return float(summary.get("finetune", summary)["test"][METRIC])


def run(record: str, seed: int, workdir: str, *, quick: bool = False) -> dict:
    from aejax.runtime import stacking

    if record not in ARMS:
        raise SystemExit(f"--record={record!r} is not a config record; choose one of "
                         f"{', '.join(sorted(ARMS))}.")
    t0 = time.time()
    values = {}
    for arm, name in ARMS[record].items():
        config = load_config(name, seed, **(dict(epochs=1, train_examples=2048) if quick else {}))
        summary = stacking.train(config, os.path.join(workdir, record, f"{name}_seed{seed}"))
        values[arm] = test_value(summary)
        print(f"{record} seed {seed}: {arm}: {values[arm]:.4f} ({time.time() - t0:.0f} s)",
              flush=True)
    return {"record": record, "seed": seed, "values": values,
            "wall_seconds": round(time.time() - t0, 1), "quick": quick}


def main(argv=None) -> dict:
    from experiments import results as records

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", required=True, help=f"one of {', '.join(sorted(ARMS))}")
    parser.add_argument("--seed", type=int, default=0, help="config.seed of every arm")
    parser.add_argument("--workdir", default="runs/repro_configs")
    parser.add_argument("--quick", action="store_true", help="tiny setting (tests)")
    args = parser.parse_args(argv)
    out = run(args.record, args.seed, args.workdir, quick=args.quick)
    if records.default_run(parser, args, ignore=("workdir", "seed", "record")):
        records.record_many(args.record, [(arm, args.seed, v) for arm, v in out["values"].items()])
    return out


if __name__ == "__main__":
    main()
