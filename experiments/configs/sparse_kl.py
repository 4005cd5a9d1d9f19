"""Sparse autoencoder 784-64-784 with sigmoid code and KL sparsity (Ng's notes: rho = 0.05, beta = 3).

Run:
    python -m experiments.main --config=experiments/configs/sparse_kl.py --workdir=runs/sparse_kl

Expect: see experiments/FAMILY.md (mean code activation near rho).
"""

import ml_collections

from aejax.runtime.config import default_config


def get_config():
    c = default_config()
    c.model.update(hidden=(), code_size=64, code_activation="sigmoid")
    c.loss.terms = ml_collections.ConfigDict({"kl_sparsity": {"weight": 3.0, "rho": 0.05,
                                                              "layer": "code"}})
    c.num_epochs = 10
    return c
