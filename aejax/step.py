"""The pure train step and evaluation: ``TrainState``, the per-example objective, one update.

``make_train_step`` is the one step: on the global batch, or, with ``axis_name``, the
per-device body of a data-parallel step (``jax.pmap``, ``shard_map``). Randomness comes from
the run's key folded with the step, so a resumed run draws the same noise.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from aejax import corruptions, objectives
from aejax.data import batching

Array = jax.Array
PerExampleFn = Callable[[Any, Mapping[str, Array], Array, Array], tuple[Array, dict[str, Array]]]


class NonFiniteLossError(FloatingPointError):
    """The loss (or one of its terms) became NaN or infinite."""

    @classmethod
    def at(cls, step: int, metrics: Mapping[str, Any], advice: str = "") -> "NonFiniteLossError":
        """The error for ``step``, naming the metrics of that step that are not finite."""
        bad = sorted(k for k, v in metrics.items() if not math.isfinite(float(v)))
        return cls(f"Non-finite loss at step {step} (non-finite: {', '.join(bad)})."
                   + (f" {advice}" if advice else ""))


@flax.struct.dataclass
class TrainState:
    """Everything a step changes.

    Attributes:
      step: number of steps taken.
      params: model parameters.
      opt_state: optimizer state.
      bad_step: first step whose loss or metrics were not finite, -1 while all were finite (the
        loop stops there and reads which term went bad from that step's metrics).
    """

    step: Array
    params: Any
    opt_state: Any
    bad_step: Array

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   bad_step=jnp.full((), -1, jnp.int32))


COMPUTE_DTYPES = ("float32", "bfloat16")


def _cast_floats(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                        tree)


def make_per_example_fn(model, objective: objectives.Objective, *,
                        corrupt: Optional[corruptions.Corruption] = None, binarize: bool = False,
                        binarize_method: str = "threefry",
                        compute_dtype: str = "float32") -> PerExampleFn:
    """``fn(params, batch, rng, step) -> (total (B,), metrics {name: (B,)})``.

    ``batch`` has ``x`` (clean images), optionally ``mask`` (B,), and ``y`` (B,), the labels a
    conditional model (:func:`aejax.models.conditional`) is given. Binarization and corruption
    draw from ``rng``; metrics hold every objective term, the reconstruction errors (of the
    objective's own reconstruction term's images) and, for objectives with a KL term, the ELBO.
    ``binarize_method`` chooses the generator of the binarization (:func:`batching.binarize`).

    With ``compute_dtype="bfloat16"`` the model runs in bfloat16 (parameters and inputs cast
    inside, so gradients and the optimizer stay float32) and its outputs are cast back to
    float32 before the terms score them: losses are summed and averaged in float32. Terms that
    run the encoder again (the contractive Jacobian) run it in bfloat16 too.
    """
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"Unknown compute_dtype {compute_dtype!r}; choose one of {COMPUTE_DTYPES}.")
    if binarize_method not in batching.BINARIZE_METHODS:
        raise ValueError(f"Unknown binarize_method {binarize_method!r}; choose one of "
                         f"{batching.BINARIZE_METHODS}.")
    recon = getattr(objective, "reconstruction", None)
    if recon is None:
        raise ValueError("make_per_example_fn needs an objective (objectives.combine) with a "
                         "reconstruction term, objectives.reconstruction(kind): its images give "
                         "the reconstruction-error metrics.")
    low = compute_dtype != "float32"

    def fn(params, batch, rng, step):
        x = batch["x"]
        mask = batch.get("mask")
        r_bin, r_cor, r_fwd = jax.random.split(rng, 3)
        if binarize:
            x = batching.binarize(r_bin, x, method=binarize_method)
        x_in = corrupt(r_cor, x) if corrupt is not None else x
        if low:
            params, x_in = _cast_floats((params, x_in), compute_dtype)
        f = objectives.forward(model, params, x, x_in, rng=r_fwd, step=step, mask=mask,
                               condition=batch.get("y"))
        if low:
            f = f._replace(**_cast_floats(dict(logits=f.logits, code=f.code, activations=f.activations,
                                               extras=f.extras), jnp.float32))
        total, parts = objective(f)
        if low:
            total, parts = _cast_floats((total, parts), jnp.float32)
        se = jnp.square(recon.images(f.logits) - x)
        se = se.reshape(x.shape[0], -1).sum(axis=1)
        code = f.activations["code"].reshape(x.shape[0], -1)
        metrics = {"loss": total, **parts, "squared_error_per_image": se,
                   "mse_per_pixel": se / math.prod(x.shape[1:]),
                   "code_mean_activation": code.mean(axis=1)}
        if "kl" in parts:
            metrics["elbo"] = -(parts["reconstruction"] + parts["kl"])
        return total, metrics

    return fn


def apply_gradients(tx: optax.GradientTransformation, state: TrainState, grads,
                    metrics: Mapping[str, Array]) -> tuple[TrainState, dict]:
    """One optimizer update from ``grads``; the state after it and ``metrics`` with ``grad_norm``.

    A non-finite metric records the step in ``state.bad_step`` (the first one only), so the
    loop can stop without a host sync every step.

    Only the gradient's norm is computed every step: on CPU each further global norm costs a
    small model's step a few percent (the norm of the update most, because it makes XLA write
    the update out instead of fusing it into the parameters' addition). The train loop logs the
    parameters' norm at its log steps (``param_norm``), from the state.
    """
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    finite = jnp.all(jnp.stack([jnp.isfinite(v) for v in metrics.values()]))
    first_bad = (state.bad_step < 0) & ~finite
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              bad_step=jnp.where(first_bad, state.step, state.bad_step))
    return new_state, metrics


def make_train_step(per_example: PerExampleFn, tx: optax.GradientTransformation, *,
                    axis_name: Optional[str] = None):
    """The pure step ``train_step(state, batch, rng) -> (state, metrics)``.

    ``rng`` is the run's key; the step folds in ``state.step`` so every step draws fresh noise
    and a resumed run draws the same noise as an uninterrupted one. Metrics are masked means
    over the batch (``batch["mask"]``, 1 for real examples).

    With ``axis_name`` it is the per-device body of a data-parallel step, to run under
    ``jax.pmap`` or ``shard_map`` over that axis with this device's shard of the batch: each
    device takes the gradient of its shard's masked *sum*, and gradients and metrics are
    ``psum``-ed and divided by the global count of real examples (the global masked mean, also
    when shards hold different numbers of them). Device ``d`` draws from
    ``fold_in(fold_in(rng, step), d)``; ``shardwise(per_example, D)`` is the one-device step
    that draws exactly this noise.
    """

    def sums_fn(params, batch, rng, step):
        total, metrics = per_example(params, batch, rng, step)
        mask = batch.get("mask", jnp.ones_like(total))
        return {k: (v * mask).sum() for k, v in metrics.items()}, mask.sum()

    def mean_loss(params, batch, rng, step):  # the global batch: differentiate the mean itself
        sums, count = sums_fn(params, batch, rng, step)
        means = {k: v / jnp.maximum(count, 1.0) for k, v in sums.items()}
        return means["loss"], means

    def sum_loss(params, batch, rng, step):  # one shard: its sums, divided after the psum
        sums, count = sums_fn(params, batch, rng, step)
        return sums["loss"], (sums, count)

    def train_step(state: TrainState, batch: Mapping[str, Array], rng: Array):
        step_rng = jax.random.fold_in(rng, state.step)
        if axis_name is None:
            grads, metrics = jax.grad(mean_loss, has_aux=True)(state.params, batch, step_rng,
                                                               state.step)
            return apply_gradients(tx, state, grads, metrics)
        step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))
        grads, (sums, count) = jax.grad(sum_loss, has_aux=True)(state.params, batch, step_rng,
                                                               state.step)
        grads, sums, count = jax.lax.psum((grads, sums, count), axis_name)
        count = jnp.maximum(count, 1.0)
        return apply_gradients(tx, state, jax.tree.map(lambda g: g / count, grads),
                               {k: v / count for k, v in sums.items()})

    return train_step


def make_pmap_step(per_example: PerExampleFn, tx: optax.GradientTransformation, *,
                   axis_name: str = "batch"):
    """:func:`make_train_step`'s per-device body under ``jax.pmap``, for scripts that use it.

    The state and every batch entry carry a leading device axis (``(D, B / D, ...)``); place the
    state as ``jax.pmap`` places its outputs, e.g. with ``flax.jax_utils.replicate``, or the
    second call retraces. ``rng`` is one key, not replicated. The state is donated; every
    device's copy of the result is equal.
    """
    return jax.pmap(make_train_step(per_example, tx, axis_name=axis_name), axis_name=axis_name,
                    in_axes=(0, 0, None), donate_argnums=(0,))


def shardwise(per_example: PerExampleFn, num_shards: int) -> PerExampleFn:
    """``per_example`` applied shard by shard, as the per-device step applies it, on one device.

    The batch ``(B, ...)`` is cut into ``num_shards`` contiguous shards; shard ``d`` draws from
    ``fold_in(rng, d)``. Under :func:`make_train_step` this is the single-device twin of the
    data-parallel step (same noise, same per-shard batch statistics).
    """

    def fn(params, batch, rng, step):
        size = next(iter(batch.values())).shape[0]
        if size % num_shards:
            raise ValueError(f"A batch of {size} examples does not split into {num_shards} shards.")
        shards = jax.tree.map(lambda a: a.reshape((num_shards, -1) + a.shape[1:]), dict(batch))
        keys = jax.vmap(lambda d: jax.random.fold_in(rng, d))(jnp.arange(num_shards))
        total, metrics = jax.vmap(per_example, in_axes=(None, 0, 0, None))(params, shards, keys, step)
        flat = lambda a: a.reshape((-1,) + a.shape[2:])
        return flat(total), jax.tree.map(flat, metrics)

    return fn


def as_batch(x) -> dict:
    """``x`` as a batch dict: an array is ``{"x": x}``; a dict (``x``, ``y``, ...) is kept."""
    return dict(x) if isinstance(x, Mapping) else {"x": x}


def metric_names(per_example: PerExampleFn, params, x) -> tuple[str, ...]:
    """The names of the step's metrics for inputs like ``x`` (an array, or a batch dict with the
    labels of a conditional model), found without running anything."""
    _, metrics = jax.eval_shape(per_example, params, as_batch(x), jax.random.PRNGKey(0),
                                jnp.zeros((), jnp.int32))
    return tuple(metrics) + ("grad_norm",)


def make_evaluate(per_example: PerExampleFn):
    """``evaluate(params, xs (N, B, ...), masks (N, B), rng, step) -> {metric: mean}`` in one call.

    ``xs`` is an array of images, or a dict of batched arrays (``x``, and ``y`` for a conditional
    model). Batches are scanned inside one jitted call; padded examples (mask 0) do not count.
    """

    def evaluate(params, xs, masks, rng, step):
        xs = as_batch(xs)

        def body(sums, inputs):
            i, batch, mask = inputs
            _, metrics = per_example(params, dict(batch, mask=mask), jax.random.fold_in(rng, i), step)
            return jax.tree.map(lambda s, v: s + (v * mask).sum(), sums, metrics), None

        first = jax.tree.map(lambda a: a[0], xs)
        zeros = jax.tree.map(lambda s: jnp.zeros((), s.dtype),
                             jax.eval_shape(lambda: per_example(params, first, rng, step)[1]))
        sums, _ = jax.lax.scan(body, zeros, (jnp.arange(masks.shape[0]), xs, masks))
        count = masks.sum()
        return jax.tree.map(lambda s: s / count, sums)

    return evaluate
