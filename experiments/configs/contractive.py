"""Contractive autoencoder 784-128-32 ReLU encoder with the exact Jacobian penalty (Rifai et al. 2011).

Run:
    python -m experiments.main --config=experiments/configs/contractive.py --workdir=runs/contractive

mode="best" picks the fastest exact form (here the one-hidden-layer quadratic form); set
`--config.loss.terms.contractive.mode=rev` (or fwd, auto, estimate) to compare.
Expect: see experiments/FAMILY.md (the Jacobian norm is logged as `contractive`).
"""

import ml_collections

from aejax.runtime.config import default_config


def get_config():
    c = default_config()
    c.model.update(hidden=(128,), code_size=32, activation="relu", code_activation="linear")
    c.loss.terms = ml_collections.ConfigDict({"contractive": {"weight": 0.1, "mode": "best"}})
    c.num_epochs = 10
    return c
