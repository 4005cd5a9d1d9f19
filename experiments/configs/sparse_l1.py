"""Sparse autoencoder 784-32-784 with an L1 activity penalty on the ReLU code (the Keras tutorial's).

Run:
    python -m experiments.main --config=experiments/configs/sparse_l1.py --workdir=runs/sparse_l1

Keras averages its cross-entropy over the 784 pixels and uses lambda = 1e-4 (written `10e-5`);
aejax sums over pixels (nats per image), so the same balance is lambda = 784 * 1e-4 = 0.0784.
Expect: see experiments/FAMILY.md (mean code activation with and without the penalty).
"""

import ml_collections

from aejax.runtime.config import default_config


def get_config():
    c = default_config()
    c.model.update(hidden=(), code_size=32, code_activation="relu")
    c.loss.terms = ml_collections.ConfigDict({"l1": {"weight": 0.0784, "layer": "code"}})
    c.num_epochs = 10
    return c
