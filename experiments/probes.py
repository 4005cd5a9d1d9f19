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
    """Softmax classifier with optional hidden layers (``hidden=()`` is logistic regression)."""

    hidden: Sequence[int] = ()
    num_classes: int = 10
    activation: str = "relu"

    @nn.compact
    def __call__(self, x):
        h = x.reshape(x.shape[0], -1)
        for w in self.hidden:
            h = models.activation(self.activation)(nn.Dense(w)(h))
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
    return fit_classifier_early_stopped(module, x, y, epochs=epochs, batch_size=batch_size,
                                        learning_rate=learning_rate, weight_decay=weight_decay,
                                        seed=seed)[0]


def fit_classifier_early_stopped(module: nn.Module, x: np.ndarray, y: np.ndarray, *,
                                 epochs: int, batch_size: int = 128, learning_rate: float = 1e-3,
                                 weight_decay: float = 0.0, seed: int = 0, params: Any = None,
                                 validation: tuple[np.ndarray, np.ndarray] | None = None,
                                 patience: int = 0) -> tuple[Any, dict]:
    """:func:`fit_classifier` from given ``params`` (None: a random start), with early stopping.

    With ``validation = (x_val, y_val)`` the validation error is measured after every epoch; the
    parameters of the lowest one are returned, and training stops after ``patience`` epochs
    without improvement (0: never). Returns ``(params, info)``: ``info`` has the per-epoch
    validation errors, the best epoch (1-based) and the epochs run.
    """
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.int32)
    n = len(x)
    bs = min(batch_size, n)
    rng = jax.random.PRNGKey(seed)
    if params is None:
        params = module.init(rng, x[:1])["params"]
    carry = (params, optax.adamw(learning_rate, weight_decay=weight_decay).init(params))
    best, history = (float("inf"), params, 0), []
    for e in range(epochs):
        carry = _classifier_epoch(carry, x, y, jax.random.fold_in(rng, e), module=module,
                                  steps=n // bs, batch_size=bs, learning_rate=float(learning_rate),
                                  weight_decay=float(weight_decay))
        if validation is None:
            best = (float("nan"), carry[0], e + 1)
            continue
        history.append(error_rate(module, carry[0], *validation))
        if history[-1] < best[0]:
            best = (history[-1], carry[0], e + 1)
        elif patience and e + 1 - best[2] >= patience:
            break
    return best[1], {"validation_errors": history, "best_epoch": best[2],
                     "epochs_run": len(history) if validation is not None else epochs}


@functools.partial(jax.jit, static_argnames=("max_iterations", "tolerance"))
def _lbfgs_logistic(w0, x, y, l2, *, max_iterations: int, tolerance: float):
    def loss(w):
        logits = x @ w["kernel"] + w["bias"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce + 0.5 * l2 * jnp.sum(w["kernel"] ** 2)

    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def body(carry):
        w, state, i, _ = carry
        value, grad = value_and_grad(w, state=state)
        updates, state = solver.update(grad, state, w, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(w, updates), state, i + 1, optax.tree_utils.tree_norm(grad)

    def cond(carry):
        return (carry[2] < max_iterations) & (carry[3] > tolerance)

    w, _, iterations, grad_norm = jax.lax.while_loop(
        cond, body, (w0, solver.init(w0), jnp.zeros((), jnp.int32), jnp.asarray(jnp.inf)))
    return w, iterations, grad_norm


def logistic_regression(x: np.ndarray, y: np.ndarray, *, l2: float, max_iterations: int = 300,
                        tolerance: float = 1e-4, init: Any = None, num_classes: int = 10
                        ) -> tuple[dict, dict]:
    """Multinomial logistic regression, mean cross-entropy + ``l2 / 2 ||W||^2``, by full-batch
    L-BFGS (optax) until the gradient norm falls below ``tolerance`` or ``max_iterations``.

    Returns ``(weights {kernel, bias}, info {iterations, grad_norm})``; ``init`` warm-starts it
    (e.g. from the solution at a larger ``l2``).
    """
    x = jnp.asarray(x, jnp.float32)
    if init is None:
        init = {"kernel": jnp.zeros((x.shape[1], num_classes)), "bias": jnp.zeros(num_classes)}
    w, iterations, grad_norm = _lbfgs_logistic(init, x, jnp.asarray(y, jnp.int32),
                                               jnp.float32(l2), max_iterations=max_iterations,
                                               tolerance=float(tolerance))
    return w, {"iterations": int(iterations), "grad_norm": float(grad_norm)}


def logistic_error(w: dict, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of ``x`` that :func:`logistic_regression`'s weights misclassify."""
    predicted = np.asarray(jnp.argmax(jnp.asarray(x, jnp.float32) @ w["kernel"] + w["bias"], -1))
    return float((predicted != np.asarray(y)).mean())


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


def standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """``train`` and ``others`` shifted and scaled by ``train``'s per-feature mean and standard
    deviation (plus 1e-6, which keeps a constant feature finite), as float32."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    return [((a - mean) / std).astype(np.float32) for a in (train, *others)]


def save_json(path: str, obj) -> None:
    import json

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
