"""The lecture notes' convolutional autoencoder (Conv16-Pool-Conv8-Pool-Conv8-Pool, code 4x4x8).

Run:
    python -m experiments.main --config=experiments/configs/conv.py --workdir=runs/conv

`--config.model.upsampling=unpool` decodes with max-unpooling at the encoder's switches,
`=transpose` with transposed convolutions. Expect: see experiments/FAMILY.md.
"""

from aejax.runtime.config import default_config


def get_config():
    c = default_config()
    c.data.flat = False
    c.model = c.model.__class__(dict(name="conv", features=(16, 8, 8), activation="relu",
                                     upsampling="nearest"))
    c.num_epochs = 5
    return c
