"""In-memory training and evaluation, for scripts and notebooks: :func:`fit` and :func:`evaluate`.

:func:`aejax.train.train_and_evaluate` is the full run (config, checkpoints, validation, early
stopping, figures). These two are the small loop underneath it for experiments that train many
models for a few minutes each: the same pure step (:func:`aejax.step.make_train_step`), the same
data order (:func:`aejax.data.batching.epoch_permutation`), one jitted ``lax.scan`` per epoch, no files.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aejax.data import batching
from aejax.step import (NonFiniteLossError, PerExampleFn, TrainState, make_evaluate,
                        make_train_step, metrics_template, pad_batches)


def fit(per_example: PerExampleFn, params: Any, tx: optax.GradientTransformation,
        x_train: np.ndarray, *, epochs: int, batch_size: int = 256, seed: int = 0,
        on_epoch: Optional[Callable[[int, Any, float], None]] = None) -> tuple[Any, list[float]]:
    """Trains ``params`` with the library's pure step, one jitted ``lax.scan`` per epoch.

    No checkpoints and no validation (runs of a few minutes); the data order and the noise come
    from ``seed`` as in :func:`aejax.train.train_and_evaluate`. ``on_epoch(epoch, params,
    mean_loss)`` is called after each epoch (learning curves).

    Returns:
      ``(params, mean training loss per epoch)``.

    Raises:
      NonFiniteLossError: a step produced a NaN or infinite loss.
    """
    x = jnp.asarray(x_train)
    n = len(x)
    bs = min(batch_size, n)
    spe = batching.steps_per_epoch(n, bs)
    # A copy: the epoch donates the state, which would delete the caller's arrays.
    params = jax.tree.map(jnp.copy, params)
    state = TrainState.create(params, tx, metrics_template(per_example, params, x[:bs]))
    run_epoch = _epoch_fn(per_example, tx, n, bs, spe, seed)
    history = []
    for epoch in range(epochs):
        state, loss = run_epoch(state, x, epoch)
        if int(state.bad_step) >= 0:
            bad = {k: float(v) for k, v in jax.device_get(state.bad_metrics).items()
                   if not np.isfinite(v)}
            raise NonFiniteLossError(f"Non-finite loss at step {int(state.bad_step)}: {bad}.")
        history.append(float(loss))
        if on_epoch is not None:
            on_epoch(epoch, state.params, float(loss))
    return state.params, history


@functools.lru_cache(maxsize=16)
def _epoch_fn(per_example: PerExampleFn, tx: optax.GradientTransformation, n: int, bs: int,
              spe: int, seed: int):
    """``run_epoch(state, x, epoch) -> (state, mean loss)``, jitted; cached so that repeated fits
    of the same objective and optimizer compile once."""
    data_rng, step_rng = jax.random.split(jax.random.PRNGKey(seed))
    step = make_train_step(per_example, tx)

    # x is an argument, not a closed-over constant: constants are folded into the compiled
    # program and make compilation slow for a 55000 x 784 array.
    @functools.partial(jax.jit, donate_argnums=0)
    def run_epoch(state, x, epoch):
        perm = batching.epoch_permutation(data_rng, n, epoch)

        def body(state, i):
            state, metrics = step(state, {"x": batching.take_batch(x, perm, i, bs)}, step_rng)
            return state, metrics["loss"]

        state, losses = jax.lax.scan(body, state, jnp.arange(spe))
        return state, losses.mean()

    return run_epoch


def evaluate(per_example: PerExampleFn, params: Any, x: np.ndarray, *, seed: int = 0,
             batch_size: int = 1000) -> dict[str, float]:
    """Mean of every per-example metric over ``x`` (``make_evaluate``, padding masked).

    The corruption inside ``per_example`` draws from ``seed`` folded with the batch index, so two
    models evaluated with the same seed see the same noisy inputs.
    """
    xs, masks = pad_batches(np.asarray(x), min(batch_size, len(x)))
    ev = jax.jit(make_evaluate(per_example))
    out = ev(params, jnp.asarray(xs), jnp.asarray(masks), jax.random.PRNGKey(seed),
             jnp.zeros((), jnp.int32))
    return {k: float(v) for k, v in jax.device_get(out).items()}
