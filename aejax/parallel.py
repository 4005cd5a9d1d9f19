"""Data-parallel train steps: the pure step of :mod:`aejax.step` over several devices.

Both steps give what ``train.make_train_step`` gives on the same global batch (same loss, same
optimizer), up to the order of float32 reductions.

* :func:`make_pmap_step` is per-device code (``jax.pmap``): each device takes the gradient of its
  shard's masked *sum*, and gradients and metrics are ``psum``-ed and divided by the ``psum`` of
  the mask counts. Dividing sums by the global count, rather than ``pmean``-ing per-device means,
  keeps the result the global masked mean when shards hold different numbers of real examples.
  Randomness: shard ``d`` draws from ``fold_in(fold_in(rng, step), d)``, so noise differs per
  shard and a run is reproducible for a given device count. ``train.make_train_step(
  shardwise(per_example, D), tx)`` is the single-device step that draws exactly this noise.
* :func:`make_sharded_step` is the unchanged global-batch step under ``jax.jit`` with the batch
  split along a mesh axis and the state replicated; XLA inserts the collectives. It draws the
  single-device step's noise, ``fold_in(rng, step)`` over the whole batch: with
  ``jax_threefry_partitionable`` (on by default) random values do not depend on how the batch is
  sharded, so this step's noise is independent of the device count.

A batch whose size the device count does not divide is refused with a ``ValueError`` (by
:func:`shard_batch`, :func:`shard` and the sharded step) rather than padded silently: a changed
shape would also recompile. :func:`pad_to_multiple` pads it explicitly with mask-0 rows, which
keeps the loss exact for per-example terms (terms that look at the whole batch, like
``kl_sparsity``, see the padding's mask too, as in evaluation).

Terms that couple examples (``kl_sparsity``: a mean activation over the batch) see the global
batch in the sharded step but only their shard in the pmap step, as ``shardwise`` reproduces.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from aejax.step import PerExampleFn, apply_gradients, make_train_step

Array = jax.Array


# --------------------------------------------------------------------------- batches


def _batch_size(batch: Mapping[str, Any]) -> int:
    sizes = {k: np.shape(v)[0] for k, v in batch.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"Batch entries have different leading sizes {sizes}; they must be equal.")
    return next(iter(sizes.values()))


def _check_divisible(batch: Mapping[str, Any], num_devices: int) -> int:
    size = _batch_size(batch)
    if size % num_devices:
        raise ValueError(
            f"A batch of {size} examples does not split evenly over {num_devices} devices. Use a "
            f"batch size divisible by {num_devices} (e.g. {size + (-size) % num_devices}), or pad "
            f"it with aejax.parallel.pad_to_multiple(batch, {num_devices}), which adds mask-0 "
            "rows so the loss stays the mean over the real examples.")
    return size


def pad_to_multiple(batch: Mapping[str, Any], multiple: int) -> dict:
    """``batch`` padded with zero rows to a size divisible by ``multiple``, with a 0/1 ``mask``.

    An existing ``mask`` is kept for the real rows; padded rows get mask 0, so masked means (the
    loss, every metric) are those of the unpadded batch.
    """
    size = _batch_size(batch)
    pad = (-size) % multiple
    out = {k: np.asarray(v) for k, v in batch.items()}
    out.setdefault("mask", np.ones(size, np.float32))
    if not pad:
        return out
    return {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in out.items()}


def shardwise(per_example: PerExampleFn, num_shards: int) -> PerExampleFn:
    """``per_example`` applied shard by shard, as the pmap step applies it, on one device.

    The batch ``(B, ...)`` is cut into ``num_shards`` contiguous shards; shard ``d`` draws from
    ``fold_in(rng, d)``. Under ``train.make_train_step`` this is the single-device twin of
    ``make_pmap_step`` (same noise, same per-shard batch statistics).
    """

    def fn(params, batch, rng, step):
        _check_divisible(batch, num_shards)
        shards = jax.tree.map(lambda a: a.reshape((num_shards, -1) + a.shape[1:]), dict(batch))
        keys = jax.vmap(lambda d: jax.random.fold_in(rng, d))(jnp.arange(num_shards))
        total, metrics = jax.vmap(per_example, in_axes=(None, 0, 0, None))(params, shards, keys, step)
        flat = lambda a: a.reshape((-1,) + a.shape[2:])
        return flat(total), jax.tree.map(flat, metrics)

    return fn


# --------------------------------------------------------------------------- pmap


def shard_batch(batch: Mapping[str, Any], num_devices: int) -> dict:
    """Reshapes every entry ``(B, ...) -> (num_devices, B / num_devices, ...)`` for the pmap step."""
    _check_divisible(batch, num_devices)
    return {k: v.reshape((num_devices, -1) + tuple(v.shape[1:])) for k, v in batch.items()}


def _pmap_sharding(num_devices: int, axis_name: str) -> NamedSharding:
    # The sharding pmap gives its outputs: inputs placed the same way do not trigger a retrace.
    devices = jax.local_devices()[:num_devices]
    if len(devices) < num_devices:
        raise ValueError(f"Asked for {num_devices} devices, {len(devices)} available.")
    return NamedSharding(Mesh(np.array(devices), (axis_name,)), P(axis_name))


def replicate(tree: Any, num_devices: Optional[int] = None, *, axis_name: str = "batch") -> Any:
    """One copy of ``tree`` per device, stacked on a leading axis, placed as ``jax.pmap`` places it.

    ``axis_name`` must be the pmap step's, or the first step retraces.
    """
    n = jax.local_device_count() if num_devices is None else num_devices
    sharding = _pmap_sharding(n, axis_name)
    return jax.device_put(jax.tree.map(lambda a: np.stack([np.asarray(a)] * n), tree), sharding)


def unreplicate(tree: Any) -> Any:
    """The first device's copy of a replicated ``tree`` (state or metrics of the pmap step)."""
    return jax.tree.map(lambda a: a[0], tree)


def make_pmap_step(per_example: PerExampleFn, tx: optax.GradientTransformation, *,
                   axis_name: str = "batch"):
    """``step(state, batch, rng) -> (state, metrics)`` over a leading device axis (``jax.pmap``).

    Args:
      per_example: ``fn(params, batch, rng, step) -> (total (B,), metrics)``
        (:func:`aejax.step.make_per_example_fn`).
      tx: the optimizer.
      axis_name: name of the device axis (pass the same to :func:`replicate`).

    Returns:
      A pmapped step taking ``state`` from :func:`replicate`, ``batch`` from :func:`shard_batch`
      (entries ``(D, B / D, ...)``, optional ``mask``) and one ``rng`` for the run (not
      replicated). State is donated; state and metrics come back with the device axis (every
      copy equal; take one with :func:`unreplicate`).
    """

    return jax.pmap(make_device_step(per_example, tx, axis_name=axis_name), axis_name=axis_name,
                    in_axes=(0, 0, None), donate_argnums=(0,))


def make_device_step(per_example: PerExampleFn, tx: optax.GradientTransformation, *,
                     axis_name: str = "batch"):
    """The per-device body of :func:`make_pmap_step`, to run under ``jax.pmap`` over ``axis_name``.

    ``step(state, batch, rng) -> (state, metrics)`` with this device's shard of the batch, for
    callers that gather their shard themselves inside the mapped function.
    """

    def shard_sums(params, batch, rng, step):
        total, metrics = per_example(params, batch, rng, step)
        mask = batch.get("mask", jnp.ones_like(total))
        sums = {k: (v * mask).sum() for k, v in metrics.items()}
        return sums["loss"], sums

    def step_fn(state, batch, rng):
        x = batch["x"]
        local_count = (batch["mask"].sum() if "mask" in batch
                       else jnp.asarray(x.shape[0], jnp.float32))
        count = jnp.maximum(jax.lax.psum(local_count, axis_name), 1.0)
        shard_rng = jax.random.fold_in(jax.random.fold_in(rng, state.step),
                                       jax.lax.axis_index(axis_name))
        grads, sums = jax.grad(shard_sums, has_aux=True)(state.params, batch, shard_rng, state.step)
        grads = jax.tree.map(lambda g: g / count, jax.lax.psum(grads, axis_name))
        metrics = jax.tree.map(lambda s: s / count, jax.lax.psum(sums, axis_name))
        return apply_gradients(tx, state, grads, metrics)

    return step_fn


# --------------------------------------------------------------------------- jit + shardings


def make_mesh(num_devices: Optional[int] = None, *, data_axis: str = "data") -> Mesh:
    """A one-axis mesh over the first ``num_devices`` devices (all by default).

    The axis is ``Auto``: the step is unannotated global-batch code, so the compiler, not the
    array types, chooses the shardings of intermediates.
    """
    available = jax.device_count()
    n = available if num_devices is None else num_devices
    if not 0 < n <= available:
        raise ValueError(f"make_mesh: asked for {n} devices, {available} available. To test on CPU, "
                         "set XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts.")
    return jax.make_mesh((n,), (data_axis,), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:n])


def shard(batch: Mapping[str, Any], mesh: Mesh, *, data_axis: str = "data") -> dict:
    """``batch`` placed on ``mesh``, every entry split along its first dimension over ``data_axis``."""
    _check_divisible(batch, mesh.shape[data_axis])
    return jax.device_put(dict(batch), NamedSharding(mesh, P(data_axis)))


def replicate_on(tree: Any, mesh: Mesh) -> Any:
    """``tree`` (the train state) with a full copy on every device of ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def make_sharded_step(per_example: PerExampleFn, tx: optax.GradientTransformation,
                      mesh: Mesh, *, data_axis: str = "data"):
    """``train.make_train_step`` jitted with the batch split over ``data_axis`` of ``mesh``.

    State (params, optimizer state) and metrics are replicated; the state is donated. A batch
    whose size does not divide over the axis raises ``ValueError`` before anything is traced.

    Args:
      per_example: as for :func:`aejax.step.make_train_step`.
      tx: the optimizer.
      mesh: from :func:`make_mesh`.
      data_axis: the mesh axis that splits the batch.

    Returns:
      ``step(state, batch, rng) -> (state, metrics)`` with global-batch semantics.
    """
    replicated = NamedSharding(mesh, P())
    split = NamedSharding(mesh, P(data_axis))
    jitted = jax.jit(make_train_step(per_example, tx),
                     in_shardings=(replicated, split, replicated),
                     out_shardings=(replicated, replicated), donate_argnums=0)
    num_devices = mesh.shape[data_axis]

    @functools.wraps(jitted)
    def step(state, batch, rng):
        _check_divisible(batch, num_devices)
        return jitted(state, batch, rng)

    return step
