"""Wasserstein autoencoder (WAE-MMD, Tolstikhin et al. 2018) 784-512-8 on Fashion-MNIST.

Run:
    python -m experiments.main --config=experiments/configs/wae.py --workdir=runs/wae

A deterministic encoder whose codes are pulled toward the prior N(0, I) by the unbiased MMD^2
between the batch's codes and as many prior samples (inverse multiquadratics kernel,
C = 2 * 8 * sigma^2 with sigma = 1, summed over the scale factors of the paper's code; lambda =
10). `--config.loss.terms.mmd.kernel=rbf` uses the Gaussian kernel. The penalty is logged as
`mmd`. Expect: see experiments/FAMILY.md.
"""

import ml_collections

from aejax.runtime.config import default_config


def get_config():
    c = default_config()
    c.model.update(hidden=(512,), code_size=8, activation="relu", code_activation="linear")
    c.loss.terms = ml_collections.ConfigDict({"mmd": {
        "weight": 10.0, "kernel": "imq", "sigma": 1.0,
        "scales": (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)}})
    c.num_epochs = 10
    return c
