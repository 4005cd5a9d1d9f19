"""Conditional VAE (Sohn et al. 2015): the VAE of vae.py with the label in encoder and decoder.

Run:
    python -m experiments.main --config=experiments/configs/cvae.py --workdir=runs/cvae

The loop gives the model each batch's labels (`batch["y"]`); every term is a bound on
`log p(x|y)`, in nats per example. The run's `class_samples.png` decodes `z ~ N(0, I)` with each
class in turn, a row per class. Expect: see experiments/FAMILY.md.
"""

import ml_collections

from experiments.configs import vae


def get_config():
    c = vae.get_config()
    c.model = ml_collections.ConfigDict(dict(name="cvae", hidden=(512,), latent_size=2,
                                             num_classes=10, activation="relu"))
    return c
