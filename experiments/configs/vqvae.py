"""VQ-VAE (van den Oord et al. 2017) 784-512-(16 x 8), a codebook of 64, on Fashion-MNIST.

Run:
    python -m experiments.main --config=experiments/configs/vqvae.py --workdir=runs/vqvae

Each image is encoded to 16 vectors of size 8, each replaced by its nearest codeword; the
decoder's gradient passes the quantization straight through to the encoder. Loss:
reconstruction + `codebook` + 0.25 `commitment` (the paper's beta); `codebook_perplexity` and
`codebook_usage` at weight 0 log how many codewords the batches use. The codebook learns by its
loss (the moving-average update, aejax.quantize.ema_update, is not in the train step).
Expect: see experiments/FAMILY.md.
"""

import ml_collections

from aejax.runtime.config import default_config


def get_config():
    c = default_config()
    c.model = ml_collections.ConfigDict(dict(name="vqvae", hidden=(512,), num_latents=16,
                                             code_dim=8, num_codes=64, activation="relu"))
    c.loss.terms = ml_collections.ConfigDict({
        "codebook": {"weight": 1.0},
        "commitment": {"weight": 0.25},
        "codebook_perplexity": {"weight": 0.0},
        "codebook_usage": {"weight": 0.0},
    })
    c.num_epochs = 10
    return c
