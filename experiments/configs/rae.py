"""Regularized autoencoder with a gradient penalty (RAE-GP, Ghosh et al. 2020) 784-512-16.

Run:
    python -m experiments.main --config=experiments/configs/rae.py --workdir=runs/rae

A deterministic autoencoder trained with `l2_activity` (0.5 ||z||^2 on the codes) and
`decoder_jacobian` (the exact squared Frobenius norm of the decoder's Jacobian at each code,
one JVP per code unit), both logged. The paper's other variants: weight decay on the decoder
(here only on all parameters, `--config.optimizer.weight_decay`) and spectral normalization
(not provided). Expect: see experiments/FAMILY.md.
"""

import ml_collections

from aejax.runtime.config import default_config


def get_config():
    c = default_config()
    c.model.update(hidden=(512,), code_size=16, activation="relu", code_activation="linear")
    c.loss.terms = ml_collections.ConfigDict({
        "l2_activity": {"weight": 1.0},
        "decoder_jacobian": {"weight": 0.01, "mode": "auto"},
    })
    c.num_epochs = 10
    return c
