"""VAE 784-512-2 with a Bernoulli decoder on dynamically binarized Fashion-MNIST.

Run:
    python -m experiments.main --config=experiments/configs/vae.py --workdir=runs/vae

Every term is logged in nats per example (`reconstruction`, `kl`, `elbo`); the test NLL is
estimated with the importance-weighted bound (`iwae_samples`). Expect: see experiments/FAMILY.md.
"""

import ml_collections

from aejax.runtime.config import default_config


def get_config():
    c = default_config()
    c.data.binarize = True
    c.model = ml_collections.ConfigDict(dict(name="vae", hidden=(512,), latent_size=2,
                                             activation="relu", likelihood="bernoulli"))
    c.loss.terms = ml_collections.ConfigDict({"kl": {"weight": 1.0, "warmup_steps": 500}})
    c.iwae_samples = 100
    c.num_epochs = 10
    return c
