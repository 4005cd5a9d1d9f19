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

import collections
import dataclasses
import functools
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from aejax import distributed
from aejax.data.batching import epoch_permutation, gather_rows
from aejax.step import PerExampleFn, apply_gradients, make_train_step, pad_batches

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
    callers that gather their shard themselves inside the mapped function
    (:meth:`Placement.fused_step`).
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


# --------------------------------------------------------------------------- the train loop's placement

MODES = ("none", "pmap", "sharded")
PMAP_AXIS = "batch"
DATA_AXIS = "data"


def _is_placed(a, sharding) -> bool:
    return isinstance(a, jax.Array) and a.sharding == sharding


def _global(tree: Any, sharding: NamedSharding) -> Any:
    """``tree`` as global arrays with ``sharding``; every process passes the same values."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda a: a if _is_placed(a, sharding) else
                        jax.make_array_from_process_local_data(sharding, np.asarray(a)), tree)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where :func:`aejax.train.train_and_evaluate` keeps the state, the data and each batch.

    * ``none``: one device.
    * ``pmap``: the per-device step (:func:`make_device_step`, explicit ``psum`` over
      ``PMAP_AXIS``) on ``num_devices`` local devices, each gathering its contiguous shard of
      every global batch; run as ``jit(shard_map)`` with the state replicated
      (:meth:`_per_device`), not stacked on a leading axis as ``jax.pmap`` would.
    * ``sharded``: global arrays on a one-axis mesh over every device of every process: the
      state and the device-resident data replicated, every batch split on ``data``.

    The step sees the same global batches in every mode, so the runs agree up to the order of
    float32 sums (and, for ``pmap``, the per-device noise its module docstring describes).
    Checkpoints and evaluation use one copy of the state (:meth:`single`).
    """

    mode: str
    num_devices: int
    mesh: Optional[Mesh] = None

    @classmethod
    def create(cls, mode: str, num_devices: int) -> "Placement":
        if mode not in MODES:
            raise ValueError(f"Unknown parallel mode {mode!r}; choose one of {MODES}.")
        if mode == "sharded":
            return cls(mode, num_devices, make_mesh(num_devices, data_axis=DATA_AXIS))
        if mode == "pmap":  # a mesh over this process's devices: several processes use "sharded"
            return cls(mode, num_devices, _pmap_sharding(num_devices, PMAP_AXIS).mesh)
        return cls(mode, 1)

    @property
    def _replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def _split(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(DATA_AXIS))

    # -- placing and fetching

    def state(self, tree: Any) -> Any:
        """A single copy of ``tree`` (state, metric accumulator) placed as the step takes it."""
        if self.mode in ("pmap", "sharded"):
            return _global(tree, self._replicated)
        return jax.device_put(tree)

    def single(self, tree: Any) -> Any:
        """One copy of a placed ``tree``: what is checkpointed and evaluated."""
        if self.mode == "pmap":  # evaluation runs on the first device, as with parallel="none"
            device = jax.local_devices()[0]
            return jax.tree.map(lambda a: jax.device_put(a, device), tree)
        return tree

    def fetch(self, tree: Any) -> Any:
        """One copy of a placed ``tree`` as numpy arrays (every process gets it)."""
        return to_host(self.single(tree))

    def constant(self, x: Any) -> Any:
        """One value (a key) that every device reads, passed to the step without a device axis."""
        if self.mode in ("pmap", "sharded"):
            return _global(np.asarray(x), self._replicated)
        return jax.device_put(x)

    def data(self, x: np.ndarray) -> Any:
        """The whole training set on every device, for the device-resident path."""
        return self.state(x)

    def permutation(self, rng: Array, num_examples: int, epoch: int) -> Any:
        """The epoch's example order (:func:`aejax.data.batching.epoch_permutation`), placed for the step."""
        sharding = self._replicated if self.mode != "none" else None
        return _permutation_fn(num_examples, sharding)(rng, epoch)

    def host_permutation(self, rng: Array, num_examples: int, epoch: int) -> np.ndarray:
        """:meth:`permutation` as numpy, for the streaming path (every process computes it)."""
        sharding = self._replicated if self.mode != "none" else None
        return np.asarray(_permutation_fn(num_examples, sharding)(rng, epoch))

    def batch(self, global_size: int, local: Mapping[str, np.ndarray]) -> dict:
        """A global batch from this process's rows ``local`` (:func:`process_rows`), placed.

        Transfers start at once and run while the device computes (``device_put`` is
        asynchronous), which is what :func:`prefetch_to_device` relies on.
        """
        if self.mode == "pmap":  # device d gets rows d * B / D ... (d + 1) * B / D - 1
            _check_divisible(local, self.num_devices)
            return jax.device_put(dict(local), _pmap_sharding(self.num_devices, PMAP_AXIS))
        if self.mode == "sharded":
            return {k: jax.make_array_from_process_local_data(
                self._split, np.asarray(v), (global_size,) + np.shape(v)[1:])
                for k, v in local.items()}
        return jax.device_put(dict(local))

    def eval_batches(self, x: np.ndarray, batch_size: int) -> tuple[Any, Any]:
        """``(xs (N, B, ...), masks (N, B))`` of a whole split, placed for ``make_evaluate``.

        ``sharded``: each process reads only its even part of the split (as
        ``tfds.split_for_jax_process``) into its columns of every batch; the masked sums of
        ``make_evaluate`` then reduce over all processes, so every example counts once.
        """
        if self.mode != "sharded":
            xs, masks = pad_batches(x, batch_size)
            return jax.device_put(xs), jax.device_put(masks)
        count = jax.process_count()
        if batch_size % self.num_devices:
            raise ValueError(f"An evaluation batch of {batch_size} does not split over "
                             f"{self.num_devices} devices.")
        local_size = batch_size // count
        part = x[distributed.even_split(len(x), count, jax.process_index())]
        largest = -(-len(x) // count)
        num = max(-(-largest // local_size), 1)  # the same on every process
        xs = np.zeros((num * local_size,) + x.shape[1:], x.dtype)
        xs[:len(part)] = part
        masks = np.zeros(num * local_size, np.float32)
        masks[:len(part)] = 1.0
        sharding = NamedSharding(self.mesh, P(None, DATA_AXIS))
        place = lambda a, shape: jax.make_array_from_process_local_data(
            sharding, a.reshape((num, local_size) + a.shape[1:]), shape)
        return (place(xs, (num, batch_size) + x.shape[1:]), place(masks, (num, batch_size)))

    # -- the loop's steps

    def _per_device(self, body: Callable, in_specs: tuple) -> Callable:
        """``body`` (per-device code over ``PMAP_AXIS``, as under ``jax.pmap``) as ``jit(shard_map)``.

        This is how JAX itself now runs ``jax.pmap``, but the state stays one replicated array
        per leaf instead of a stack of per-device copies on a leading axis: with the stack, XLA
        copies the donated state in and out of every step (on one CPU device ``jax.pmap`` took
        1.07x the jitted step's time, this 0.98x: ``python -m experiments.bench``).
        """
        # check_vma=False, as jax.pmap: the body psums its gradients itself (with the check on,
        # autodiff adds all-reduces of its own, which cost time even on one device).
        return jax.jit(jax.shard_map(body, mesh=self.mesh, in_specs=in_specs,
                                     out_specs=(P(), P()), check_vma=False), donate_argnums=(0, 1))

    def fused_step(self, step_fn: Callable, batch_size: int, steps_per_epoch: int) -> Callable:
        """``run(state, acc, x_all, perm, num_steps, rng) -> (state, acc)``: ``num_steps`` steps.

        The device-resident fast path. Each step gathers batch ``state.step % steps_per_epoch``
        of the epoch's order ``perm`` from the placed training set, takes one step and adds its
        metrics to ``acc``. A ``fori_loop`` with a traced trip count runs the steps, so one
        compiled program serves any ``num_steps`` (the loop runs up to its next log, checkpoint
        or epoch end in one call): one dispatch, and no host round trip, per call rather than
        per step. ``step_fn`` is ``make_train_step(...)`` or, for ``pmap``,
        ``make_device_step(...)``. State and accumulator are donated.
        """
        pmap = self.mode == "pmap"
        split = self._split if self.mode == "sharded" else None
        num_rows = batch_size // self.num_devices if pmap else batch_size

        def one_step(state, acc, x_all, perm, rng):
            start = (state.step % steps_per_epoch) * batch_size
            if pmap:  # device d gathers rows d * B / D ... of the batch
                start = start + jax.lax.axis_index(PMAP_AXIS) * num_rows
            rows = jax.lax.dynamic_slice(perm, (start,), (num_rows,))
            if split is not None:  # each device gathers only the rows of its shard
                rows = jax.lax.with_sharding_constraint(rows, split)
            x = gather_rows(x_all, rows)
            if split is not None:
                x = jax.lax.with_sharding_constraint(x, split)
            state, metrics = step_fn(state, {"x": x}, rng)
            return state, jax.tree.map(jnp.add, acc, metrics)

        def run(state, acc, x_all, perm, num_steps, rng):
            return jax.lax.fori_loop(0, num_steps, lambda _, carry: one_step(*carry, x_all, perm, rng),
                                     (state, acc))

        if pmap:
            return self._per_device(run, (P(),) * 6)
        if self.mode == "sharded":
            rep = self._replicated
            return jax.jit(run, out_shardings=(rep, rep), donate_argnums=(0, 1))
        return jax.jit(run, donate_argnums=(0, 1))

    def stream_step(self, step_fn: Callable) -> Callable:
        """``run(state, acc, batch, rng) -> (state, acc)`` for batches placed by :meth:`batch`."""

        def fused(state, acc, batch, rng):
            state, metrics = step_fn(state, batch, rng)
            return state, jax.tree.map(jnp.add, acc, metrics)

        if self.mode == "pmap":
            return self._per_device(fused, (P(), P(), P(PMAP_AXIS), P()))
        if self.mode == "sharded":
            rep = self._replicated
            return jax.jit(fused, in_shardings=(rep, rep, self._split, rep),
                           out_shardings=(rep, rep), donate_argnums=(0, 1))
        return jax.jit(fused, donate_argnums=(0, 1))


def to_host(tree: Any) -> Any:
    """``tree`` as numpy arrays; global arrays must be replicated (every process gets them)."""
    return jax.tree.map(np.asarray, tree)


@functools.lru_cache(maxsize=None)
def _permutation_fn(num_examples: int, sharding: Optional[NamedSharding]):
    fn = lambda rng, epoch: epoch_permutation(rng, num_examples, epoch)
    return jax.jit(fn) if sharding is None else jax.jit(fn, out_shardings=sharding)


def prefetch_to_device(batches: Iterator[Any], size: int = 2) -> Iterator[Any]:
    """Yields ``batches`` (already being placed, e.g. by :meth:`Placement.batch`) ``size`` ahead.

    ``jax.device_put`` returns before the copy ends, so keeping ``size`` placed batches queued
    overlaps their host-to-device transfer with the steps before them (as
    ``flax.jax_utils.prefetch_to_device``, but for any placement, jit or pmap).
    """
    queue = collections.deque()
    for batch in batches:
        queue.append(batch)
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
