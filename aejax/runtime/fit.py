"""In-memory training and evaluation, for scripts and notebooks: :func:`fit` and :func:`evaluate`.

:func:`aejax.runtime.trainer.train_and_evaluate` is the full run (config, checkpoints,
validation, early stopping, figures). :func:`fit` runs the same compiled epoch on one device
(:meth:`aejax.runtime.placement.Placement.fused_step`, the pure step of
:func:`aejax.step.make_train_step`) with no files and no validation, for experiments that train
many small models. Its keys are its own: ``split(PRNGKey(seed))`` gives the data-order key and
the step key, so its runs repeat each other, not a ``train_and_evaluate`` run of the same seed.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aejax.data import batching
from aejax.runtime.placement import Placement
from aejax.step import (NonFiniteLossError, PerExampleFn, TrainState, make_evaluate,
                        make_train_step, metric_names)


def fit(per_example: PerExampleFn, params: Any, tx: optax.GradientTransformation,
        x_train: np.ndarray, *, epochs: int, batch_size: int = 256, seed: int = 0,
        on_epoch: Optional[Callable[[int, Any, float], None]] = None) -> tuple[Any, list[float]]:
    """Trains ``params`` for ``epochs`` epochs of full batches on one device.

    Each epoch visits ``batching.epoch_permutation(data_key, n, epoch)`` in batches of
    ``batch_size`` (the remainder is left to the next epoch's shuffle), one compiled call per
    epoch. ``on_epoch(epoch, params, mean_loss)`` is called after each epoch (learning curves).

    Returns:
      ``(params, mean training loss per epoch)``.

    Raises:
      ValueError: ``epochs`` < 0, ``batch_size`` < 1, or ``x_train`` empty, not a floating
        array, or grey levels 0..255 not scaled to [0, 1].
      NonFiniteLossError: a step produced a NaN or infinite loss.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"fit: epochs must be an integer >= 0, got {epochs!r}.")
    if not np.issubdtype(np.asarray(x_train[:1]).dtype, np.floating):
        raise ValueError(f"fit: x_train has dtype {np.asarray(x_train[:1]).dtype}; scale images to "
                         "floats in [0, 1] first (x.astype('float32') / 255).")
    n = len(x_train)
    if n == 0:
        raise ValueError("fit: x_train is empty; pass at least one example.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"fit: batch_size must be an integer >= 1, got {batch_size!r}.")
    sample = np.asarray(x_train[:1024])
    if sample.max() > 1.0 and np.array_equal(sample, np.round(sample)):  # 0..255 grey levels
        raise ValueError(f"fit: x_train holds whole numbers up to {sample.max():g}, like unscaled "
                         "grey levels; scale images to [0, 1] first (x.astype('float32') / 255).")
    bs = min(batch_size, n)
    spe = batching.steps_per_epoch(n, bs)
    place, run = _epoch_fn(per_example, tx, bs, spe)
    data_rng, step_rng = place.replicate(jax.random.split(jax.random.PRNGKey(seed)))
    x = place.replicate(np.asarray(x_train))
    # A copy: the epoch donates the state, which would delete the caller's arrays.
    state = place.replicate(TrainState.create(jax.tree.map(jnp.copy, params), tx))
    names = metric_names(per_example, params, x[:bs])
    history = []
    for epoch in range(epochs):
        acc = place.replicate({k: np.zeros((), np.float32) for k in names})
        perm = place.permutation(data_rng, n, epoch)
        state, acc = run(state, acc, x, perm, spe, step_rng)
        sums = jax.device_get(acc)
        if int(state.bad_step) >= 0:
            raise NonFiniteLossError.at(int(state.bad_step), sums)
        history.append(float(sums["loss"]) / spe)
        if on_epoch is not None:
            on_epoch(epoch, state.params, history[-1])
    return state.params, history


@functools.lru_cache(maxsize=16)
def _epoch_fn(per_example: PerExampleFn, tx: optax.GradientTransformation, bs: int, spe: int):
    """One device's placement and its fused epoch; cached so that repeated fits of the same
    objective and optimizer compile once."""
    place = Placement.create("none", 1)
    return place, place.fused_step(make_train_step(per_example, tx), bs, spe)


def evaluate(per_example: PerExampleFn, params: Any, x: np.ndarray, *, seed: int = 0,
             batch_size: int = 1000) -> dict[str, float]:
    """Mean of every per-example metric over ``x`` (``make_evaluate``, padding masked).

    The corruption inside ``per_example`` draws from ``seed`` folded with the batch index, so two
    models evaluated with the same seed see the same noisy inputs.
    """
    xs, masks = batching.pad_batches(np.asarray(x), min(batch_size, len(x)))
    out = _evaluate_fn(per_example)(params, jnp.asarray(xs), jnp.asarray(masks),
                                    jax.random.PRNGKey(seed), jnp.zeros((), jnp.int32))
    return {k: float(v) for k, v in jax.device_get(out).items()}


@functools.lru_cache(maxsize=16)
def _evaluate_fn(per_example: PerExampleFn):
    return jax.jit(make_evaluate(per_example))
