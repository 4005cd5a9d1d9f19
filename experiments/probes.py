"""Classifiers on top of learned features, and the other shared steps of the reproduction scripts.

A representation is judged by the test error of the same small classifier trained on it
(Rifai et al. 2011, Table 1; the lecture notes' semi-supervised exercise).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from aejax import models
from aejax.runtime import trainer


class MLPClassifier(nn.Module):
    """Softmax classifier with optional ReLU hidden layers (``hidden=()`` is logistic regression)."""

    hidden: Sequence[int] = ()
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        h = x.reshape(x.shape[0], -1)
        for w in self.hidden:
            h = nn.relu(nn.Dense(w)(h))
        return nn.Dense(self.num_classes)(h)


class CNNClassifier(nn.Module):
    """A small CNN trained from scratch: the supervised baseline of the semi-supervised exercise."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        h = nn.max_pool(nn.relu(nn.Conv(16, (3, 3))(x)), (2, 2), (2, 2))
        h = nn.max_pool(nn.relu(nn.Conv(32, (3, 3))(h)), (2, 2), (2, 2))
        h = nn.relu(nn.Dense(64)(h.reshape(h.shape[0], -1)))
        return nn.Dense(self.num_classes)(h)


@functools.partial(jax.jit, static_argnames=("module", "steps", "batch_size", "learning_rate",
                                             "weight_decay"))
def _classifier_epoch(carry, x, y, key, *, module: nn.Module, steps: int, batch_size: int,
                      learning_rate: float, weight_decay: float):
    # Module-level and keyed on static shapes/hyperparameters: every call of fit_classifier with
    # the same module and data shape reuses one compilation (the data are arguments, not constants).
    tx = optax.adamw(learning_rate, weight_decay=weight_decay)

    def loss_fn(p, xb, yb):
        logits = module.apply({"params": p}, xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    perm = jax.random.permutation(key, x.shape[0])[: steps * batch_size].reshape(steps, batch_size)

    def step(c, idx):
        p, s = c
        grads = jax.grad(loss_fn)(p, x[idx], y[idx])
        updates, s = tx.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), None

    carry, _ = jax.lax.scan(step, carry, perm)
    return carry


def fit_classifier(module: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int = 50,
                   batch_size: int = 128, learning_rate: float = 1e-3, weight_decay: float = 1e-4,
                   seed: int = 0) -> Any:
    """Trains ``module`` with Adam(W) on cross-entropy; returns its params.

    The epoch loop runs inside one jitted ``lax.scan`` (minibatches of a fixed size, the data on
    the device), so even thousands of small steps cost one dispatch per epoch; the epoch compiles
    once per module, data shape and hyperparameters, not once per call.
    """
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.int32)
    n = len(x)
    bs = min(batch_size, n)
    rng = jax.random.PRNGKey(seed)
    params = module.init(rng, x[:1])["params"]
    carry = (params, optax.adamw(learning_rate, weight_decay=weight_decay).init(params))
    for e in range(epochs):
        carry = _classifier_epoch(carry, x, y, jax.random.fold_in(rng, e), module=module,
                                  steps=n // bs, batch_size=bs, learning_rate=float(learning_rate),
                                  weight_decay=float(weight_decay))
    return carry[0]


@functools.partial(jax.jit, static_argnames="module")
def _predict(params, xb, *, module: nn.Module):
    return jnp.argmax(module.apply({"params": params}, xb), -1)


def error_rate(module: nn.Module, params, x: np.ndarray, y: np.ndarray, batch: int = 2000) -> float:
    """Fraction of misclassified examples."""
    wrong = 0
    for i in range(0, len(x), batch):
        predicted = _predict(params, jnp.asarray(x[i:i + batch]), module=module)
        wrong += int((np.asarray(predicted) != y[i:i + batch]).sum())
    return wrong / len(x)


def encode(model: nn.Module, params, x: np.ndarray, batch: int = 2000) -> np.ndarray:
    """Codes of ``x`` (a stochastic model's posterior means), in batches."""
    return np.asarray(models.encode_batched(model, params, x, batch_size=batch))


def train_model(config: ml_collections.ConfigDict, workdir: str, splits=None):
    """Runs (or resumes) ``config`` in ``workdir``; returns ``(model, best params, summary)``."""
    summary = trainer.train_and_evaluate(config, workdir, splits=splits)
    return models.from_config(config.model), trainer.load_best_params(workdir), summary


@functools.lru_cache(maxsize=4)
def fashion(flat: bool = True, validation_size: int = 5000, seed: int = 0):
    """Full Fashion-MNIST splits (cached per process)."""
    from aejax.data import splits as data_splits

    return data_splits.load("fashion_mnist", flat=flat, validation_size=validation_size, seed=seed)


def save_json(path: str, obj) -> None:
    import json

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
