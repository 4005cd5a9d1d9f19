"""Vanilla autoencoder 784-64-784 (the lecture notes' first model) on Fashion-MNIST.

Run:
    python -m experiments.main --config=experiments/configs/vanilla.py --workdir=runs/vanilla

Expect: see experiments/FAMILY.md (made by `python -m experiments.family`).
"""

from aejax.runtime.config import default_config


def get_config():
    c = default_config()
    c.model.update(hidden=(), code_size=64, code_activation="relu")
    c.num_epochs = 10
    return c
