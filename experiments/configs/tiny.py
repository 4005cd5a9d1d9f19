"""A tiny run on real Fashion-MNIST for end-to-end tests and a first try (under a minute).

Run:
    python -m experiments.main --config=experiments/configs/tiny.py --workdir=/tmp/aejax_tiny

Expect: 2 epochs on 2000 training images; a finite test loss and figures in the workdir.
"""

from aejax.runtime.config import default_config


def get_config():
    c = default_config()
    c.data.update(train_examples=2000, validation_size=500)
    c.model.update(hidden=(64,), code_size=16)
    c.num_epochs = 2
    c.batch_size = 100
    c.log_every_steps = 10
    c.checkpoint_every_steps = 15
    c.progress = False
    return c
