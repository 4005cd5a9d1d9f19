"""Greedy layer-wise stacking of a 784-256-64-16 sigmoid autoencoder, then fine-tuning.

Run:
    python -m experiments.main --config=experiments/configs/stacked.py --workdir=runs/stacked

Each layer pair is pretrained for `stacking.pretrain_epochs` epochs on the previous codes, the
stack fine-tuned end to end, and the same model trained from scratch for comparison
(`scratch/`); workdir/summary.json holds all three. Expect: see experiments/FAMILY.md.
"""

from aejax.runtime.config import default_config


def get_config():
    c = default_config()
    c.model.update(hidden=(256, 64), code_size=16, activation="sigmoid", code_activation="linear")
    c.stacking.update(pretrain_epochs=3, compare_scratch=True)
    c.num_epochs = 10
    return c
