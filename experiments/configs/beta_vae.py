"""beta-VAE (Higgins et al. 2017): the VAE of vae.py with the KL term weighted by beta = 4.

Run:
    python -m experiments.main --config=experiments/configs/beta_vae.py --workdir=runs/beta_vae

Expect: see experiments/FAMILY.md (a larger reconstruction error and KL than the VAE's trade).
"""

from experiments.configs import vae


def get_config():
    c = vae.get_config()
    c.loss.terms.kl.weight = 4.0
    return c
