"""Multilayer autoencoder 784-128-32-128-784 (the lecture notes' deep model; the benchmark's model).

Run:
    python -m experiments.main --config=experiments/configs/multilayer.py --workdir=runs/multilayer

Expect: see experiments/FAMILY.md (made by `python -m experiments.family`).
"""

from aejax.runtime.config import default_config


def get_config():
    c = default_config()
    c.model.update(hidden=(128,), code_size=32, activation="relu", code_activation="linear")
    c.num_epochs = 10
    return c
