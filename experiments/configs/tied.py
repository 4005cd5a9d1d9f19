"""Tied-weights autoencoder 784-128-32-128-784: the decoder uses the encoder's matrices transposed.

Run:
    python -m experiments.main --config=experiments/configs/tied.py --workdir=runs/tied

Expect: see experiments/FAMILY.md (half the weight matrices of multilayer.py).
"""

from aejax.runtime.config import default_config


def get_config():
    c = default_config()
    c.model.update(hidden=(128,), code_size=32, activation="relu", code_activation="linear",
                   tied=True)
    c.num_epochs = 10
    return c
