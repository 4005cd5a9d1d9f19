"""Where the train loop keeps the state, the data and each batch: one placement over a mesh.

Every mode runs on a one-axis mesh (``data``) of devices, with the state and the
device-resident training set replicated and every batch split along the axis:

* ``none``: a mesh of one device (the global step; XLA partitions nothing).
* ``sharded``: a mesh of every device of every process; the global step under ``jax.jit``,
  XLA inserts the collectives. It draws the one-device step's noise, so results do not depend
  on the device count.
* ``pmap``: a mesh of this process's devices running the per-device step
  (``step.make_train_step(..., axis_name=DATA_AXIS)``, explicit ``psum``) under
  ``jit(shard_map)``, as ``jax.pmap`` runs, but with the state one replicated array per leaf
  rather than a stack of per-device copies (with the stack, XLA copies the donated state in and
  out of every step).

A batch whose size the devices do not divide is refused by the config check, never padded
silently.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from aejax import step as step_lib
from aejax.data import batching
from aejax.runtime import distributed

Array = jax.Array

MODES = ("none", "pmap", "sharded")
DATA_AXIS = "data"


def make_mesh(devices) -> Mesh:
    """A one-axis ``data`` mesh over ``devices``.

    The axis is ``Auto``: the step is unannotated global-batch code, so the compiler, not the
    array types, chooses the shardings of intermediates.
    """
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                         devices=devices)


def _global(tree: Any, sharding: NamedSharding) -> Any:
    """``tree`` as global arrays with ``sharding``; every process passes the same values."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    placed = lambda a: isinstance(a, jax.Array) and a.sharding == sharding
    return jax.tree.map(lambda a: a if placed(a) else
                        jax.make_array_from_process_local_data(sharding, np.asarray(a)), tree)


def to_host(tree: Any) -> Any:
    """``tree`` as numpy arrays; global arrays must be replicated (every process gets them)."""
    return jax.tree.map(np.asarray, tree)


@dataclasses.dataclass(frozen=True)
class Placement:
    """The mesh of a run and how its step runs on it (see the module docstring).

    Attributes:
      mesh: the one-axis ``data`` mesh.
      per_device: run the per-device step under ``shard_map`` (``pmap`` mode) rather than the
        global step under ``jit``.
    """

    mesh: Mesh
    per_device: bool = False

    @classmethod
    def create(cls, mode: str, num_devices: int) -> "Placement":
        if mode not in MODES:
            raise ValueError(f"Unknown parallel mode {mode!r}; choose one of {MODES}.")
        # pmap's mesh holds this process's devices: several processes use "sharded".
        devices = jax.local_devices() if mode == "pmap" else jax.devices()
        if len(devices) < num_devices:
            raise ValueError(f"Asked for {num_devices} devices, {len(devices)} available. To test "
                             "on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=8 "
                             "before JAX starts.")
        return cls(make_mesh(devices[:num_devices]), per_device=mode == "pmap")

    @property
    def num_devices(self) -> int:
        return self.mesh.shape[DATA_AXIS]

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def split(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(DATA_AXIS))

    # -- placing and fetching

    def replicate(self, tree: Any) -> Any:
        """``tree`` (state, accumulator, key, the device-resident data) on every device."""
        return _global(tree, self.replicated)

    def fetch(self, tree: Any) -> Any:
        """A replicated ``tree`` as numpy arrays (every process gets it)."""
        return to_host(tree)

    def permutation(self, rng: Array, num_examples: int, epoch: int) -> Array:
        """The epoch's example order (:func:`aejax.data.batching.epoch_permutation`), replicated."""
        return _permutation_fn(num_examples, self.replicated)(rng, epoch)

    def batch(self, global_size: int, local: Mapping[str, np.ndarray]) -> dict:
        """A global batch from this process's rows ``local`` (:func:`distributed.process_rows`).

        Transfers start at once and run while the device computes (``device_put`` is
        asynchronous), which is what :func:`prefetch_to_device` relies on.
        """
        if global_size % self.num_devices:
            raise ValueError(
                f"A batch of {global_size} examples does not split evenly over "
                f"{self.num_devices} devices. Use a batch size divisible by {self.num_devices}, or "
                f"pad it with aejax.data.batching.pad_rows(x, {self.num_devices}) and pass its "
                "mask as batch['mask']: mask-0 rows keep the loss the mean over the real examples.")
        return {k: jax.make_array_from_process_local_data(
            self.split, np.asarray(v), (global_size,) + np.shape(v)[1:]) for k, v in local.items()}

    def eval_batches(self, x, batch_size: int) -> tuple[Any, Array]:
        """``(xs (N, B, ...), masks (N, B))`` of a whole split, placed for ``make_evaluate``.

        ``x`` is the split's images, or a dict of its arrays (``x``, and ``y`` for a conditional
        model): then ``xs`` is the same dict, batched. Each process reads only its even part of
        the split (as ``tfds.split_for_jax_process``) into its columns of every batch; the
        masked sums of ``make_evaluate`` then reduce over all devices, so every example counts
        once.
        """
        if isinstance(x, Mapping):
            parts = {k: self.eval_batches(v, batch_size) for k, v in x.items()}
            return {k: xs for k, (xs, _) in parts.items()}, next(iter(parts.values()))[1]
        if batch_size % self.num_devices:
            raise ValueError(f"An evaluation batch of {batch_size} does not split over "
                             f"{self.num_devices} devices.")
        count = jax.process_count()
        local_size = batch_size // count
        part = x[distributed.even_split(len(x), count, jax.process_index())]
        num = max(-(-(-(-len(x) // count)) // local_size), 1)  # the same on every process
        xs, masks = batching.pad_batches(part, local_size, num_batches=num)
        sharding = NamedSharding(self.mesh, P(None, DATA_AXIS))
        place = lambda a, shape: jax.make_array_from_process_local_data(sharding, a, shape)
        return (place(xs, (num, batch_size) + x.shape[1:]), place(masks, (num, batch_size)))

    # -- the loop's steps

    def _compile(self, body: Callable, in_specs: tuple) -> Callable:
        """``body`` jitted on the mesh: per device under ``shard_map``, or as global code."""
        if self.per_device:
            # check_vma=False, as jax.pmap: the body psums its gradients itself (with the check
            # on, autodiff adds all-reduces of its own, which cost time even on one device).
            body = jax.shard_map(body, mesh=self.mesh, in_specs=in_specs, out_specs=(P(), P()),
                                 check_vma=False)
            return jax.jit(body, donate_argnums=(0, 1))
        shardings = tuple(NamedSharding(self.mesh, spec) for spec in in_specs)
        return jax.jit(body, in_shardings=shardings,
                       out_shardings=(self.replicated, self.replicated), donate_argnums=(0, 1))

    def fused_step(self, step_fn: Callable, batch_size: int, steps_per_epoch: int, *,
                   loop: Optional[bool] = None) -> Callable:
        """``run(state, acc, x_all, perm, num_steps, rng) -> (state, acc)``: up to ``num_steps`` steps.

        The device-resident fast path. Each step gathers batch ``state.step % steps_per_epoch``
        of the epoch's order ``perm`` from the placed training set ``x_all`` (the images, or a
        dict of the split's arrays, e.g. ``x`` and ``y``), takes one step and adds its
        metrics to ``acc``. A ``while_loop`` with a traced trip count runs the steps, so one
        compiled program serves any ``num_steps`` (the loop runs up to its next log, checkpoint
        or epoch end in one call): one dispatch, and no host round trip, per call. It stops
        after the first step with a non-finite metric (``state.bad_step``), so ``acc`` then
        holds that step's values. ``step_fn`` is the global step, or for ``per_device`` the
        per-device one over ``DATA_AXIS``. State and accumulator are donated.

        ``loop=False`` runs the same step as a program of one step, called ``num_steps`` times
        from the host (which reads ``state.bad_step`` after each). ``None`` chooses it for a
        step with convolutions on a CPU, in one process and not ``per_device``: inside a loop,
        XLA's CPU backend leaves the convolutions' kernel gradients in a slow generic form that
        it rewrites for its fast kernels in straight-line code (a conv step took a third of the
        time there), while a convolutional step is long enough that a dispatch per step costs
        nothing measurable.
        """
        num_rows = batch_size // self.num_devices if self.per_device else batch_size
        constrain = (lambda a: a) if self.per_device else (
            lambda a: jax.lax.with_sharding_constraint(a, self.split))

        def one_step(state, acc, x_all, perm, rng):
            start = (state.step % steps_per_epoch) * batch_size
            if self.per_device:  # device d gathers rows d * B / D ... of the batch
                start = start + jax.lax.axis_index(DATA_AXIS) * num_rows
            # each device gathers only the rows of its shard
            rows = constrain(jax.lax.dynamic_slice(perm, (start,), (num_rows,)))
            batch = {k: constrain(batching.gather_rows(v, rows))
                     for k, v in step_lib.as_batch(x_all).items()}
            state, metrics = step_fn(state, batch, rng)
            return state, jax.tree.map(jnp.add, acc, metrics)

        def run(state, acc, x_all, perm, num_steps, rng):
            def cond(carry):
                i, state, _ = carry
                return (i < num_steps) & (state.bad_step < 0)

            def body(carry):
                i, state, acc = carry
                return (i + 1, *one_step(state, acc, x_all, perm, rng))

            _, state, acc = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state, acc))
            return state, acc

        looped = self._compile(run, (P(),) * 6)
        if loop or self.per_device or jax.process_count() > 1:
            return looped
        single = self._compile(one_step, (P(),) * 5)
        chosen: dict = {} if loop is None else {"loop": False}

        def dispatch(state, acc, x_all, perm, num_steps, rng):
            if "loop" not in chosen:
                # The loop's own trace (shared with its call: the step is traced once).
                traced = looped.trace(state, acc, x_all, perm, num_steps, rng).jaxpr
                chosen["loop"] = not (jax.default_backend() == "cpu" and _has_primitive(
                    getattr(traced, "jaxpr", traced), "conv_general_dilated"))
                dispatch.loops = chosen["loop"]
            if chosen["loop"]:
                return looped(state, acc, x_all, perm, num_steps, rng)
            for _ in range(int(num_steps)):
                state, acc = single(state, acc, x_all, perm, rng)
                if int(state.bad_step) >= 0:
                    break
            return state, acc

        dispatch.loops = chosen.get("loop")  # None until the first call has chosen
        return dispatch

    def stream_step(self, step_fn: Callable) -> Callable:
        """``run(state, acc, batch, rng) -> (state, acc)`` for batches placed by :meth:`batch`.

        After a step with a non-finite metric, the next ones change nothing (as
        :meth:`fused_step` stops there).
        """

        def run(state, acc, batch, rng):
            def take(state, acc):
                state, metrics = step_fn(state, batch, rng)
                return state, jax.tree.map(jnp.add, acc, metrics)

            return jax.lax.cond(state.bad_step < 0, take, lambda s, a: (s, a), state, acc)

        return self._compile(run, (P(), P(), P(DATA_AXIS), P()))


def _has_primitive(jaxpr, name: str) -> bool:
    """Whether ``jaxpr`` or any program inside it (a loop's body, a call) applies ``name``."""
    from jax.extend.core import jaxprs_in_params

    return any(e.primitive.name == name or any(_has_primitive(j, name)
                                               for j in jaxprs_in_params(e.params))
               for e in jaxpr.eqns)


@functools.lru_cache(maxsize=None)
def _permutation_fn(num_examples: int, sharding: NamedSharding):
    fn = lambda rng, epoch: batching.epoch_permutation(rng, num_examples, epoch)
    return jax.jit(fn, out_shardings=sharding)


def prefetch_to_device(batches: Iterator[Any], size: int = 2) -> Iterator[Any]:
    """Yields ``batches`` (already being placed, e.g. by :meth:`Placement.batch`) ``size`` ahead.

    ``jax.device_put`` returns before the copy ends, so keeping ``size`` placed batches queued
    overlaps their host-to-device transfer with the steps before them.
    """
    queue = collections.deque()
    for batch in batches:
        queue.append(batch)
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
