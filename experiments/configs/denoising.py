"""Denoising autoencoder 784-128-32-128-784: Gaussian noise (std 0.5, clipped), clean targets.

Run:
    python -m experiments.main --config=experiments/configs/denoising.py --workdir=runs/denoising

Other corruptions: `--config.corruption.kind=masking` with `fraction` (set it in a copy of this
file). The test error is measured on clean inputs. Expect: see experiments/FAMILY.md.
"""

import ml_collections

from aejax.runtime.config import default_config


def get_config():
    c = default_config()
    c.model.update(hidden=(128,), code_size=32, activation="relu", code_activation="linear")
    c.corruption = ml_collections.ConfigDict(dict(kind="gaussian", std=0.5))
    c.num_epochs = 10
    return c
