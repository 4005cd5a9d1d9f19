"""beta-TCVAE: the VAE of vae.py (784-512, Bernoulli, binarized) with 10 latents and the KL split.

Run:
    python -m experiments.main --config=experiments/configs/beta_tcvae.py --workdir=runs/beta_tcvae

The KL is split by minibatch-weighted sampling (Chen et al. 2018) into the index-code MI
(weight alpha = 1), the total correlation (beta = 6) and the dimension-wise KL (gamma = 1),
each logged in nats per example; `kl` at weight 0 logs the analytic KL and so the ELBO.
`dataset_size` is the number of training examples N (60000 less data.validation_size); a
different N shifts the logged parts by constants and leaves the gradients as they are. The
parts are minibatch estimates, biased and dependent on the batch size (evaluation uses
eval_batch_size); their sum is the sampled KL log q(z|x) - log p(z) exactly.
Expect: see experiments/FAMILY.md.
"""

import ml_collections

from experiments.configs import vae


def get_config():
    c = vae.get_config()
    c.model.latent_size = 10
    n = 60000 - c.data.validation_size
    c.loss.terms = ml_collections.ConfigDict({
        "index_code_mi": {"weight": 1.0, "dataset_size": n},
        "total_correlation": {"weight": 6.0, "dataset_size": n},
        "dimwise_kl": {"weight": 1.0, "dataset_size": n},
        "kl": {"weight": 0.0},
    })
    return c
