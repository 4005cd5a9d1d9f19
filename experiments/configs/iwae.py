"""IWAE (Burda et al. 2016): the VAE of vae.py trained on the k = 5 importance-weighted bound.

Run:
    python -m experiments.main --config=experiments/configs/iwae.py --workdir=runs/iwae

The loss is the `iwae` term alone (minus the bound, nats per example): the reconstruction term
is logged at weight 0 (loss.reconstruction_weight) and so is `kl`, which gives the ELBO. The
test NLL is estimated with 100 samples as for vae.py, so the two rows compare directly.
Expect: see experiments/FAMILY.md.
"""

import ml_collections

from experiments.configs import vae


def get_config():
    c = vae.get_config()
    c.loss.reconstruction_weight = 0.0
    c.loss.terms = ml_collections.ConfigDict({"iwae": {"weight": 1.0, "num_samples": 5},
                                              "kl": {"weight": 0.0}})
    return c
