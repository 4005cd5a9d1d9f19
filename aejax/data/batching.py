"""Pure JAX/numpy batching of a dataset in memory: the epoch order, batches, padding, binarization.

No tensorflow: the device-resident training loop and evaluation need only these helpers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from aejax.data.offline import DataError


BINARIZE_METHODS = ("threefry", "counter")


def _mix32(h: jax.Array) -> jax.Array:
    """A bijection of uint32 that spreads every input bit over every output bit (xor-shift and
    multiply rounds with odd constants, the "lowbias32" finalizer)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def counter_uniform(rng: jax.Array, shape) -> jax.Array:
    """Uniform float32 in [0, 1) on a 2^-24 grid, one per element of ``shape``, from a keyed hash
    of the element's index: two 32-bit words ``k0``, ``k1`` drawn from ``rng``, then
    ``mix32((index ^ k0) * 0x9E3779B9 + k1)``, whose top 24 bits are the number.

    A counter-based generator: every element is computed alone, so the draw costs a few integer
    operations per element (jax.random's threefry costs about ten times more on a CPU). It is a
    pure function of ``(rng, shape)``: the same key gives the same numbers on every run and
    after a resume. Sizes up to 2^32 elements.
    """
    size = int(np.prod(shape, dtype=np.int64))
    if size > 2 ** 32:
        raise ValueError(f"counter_uniform draws at most 2^32 numbers per key; asked for {size}.")
    k = jax.random.bits(rng, (2,), jnp.uint32)
    i = jax.lax.iota(jnp.uint32, size).reshape(shape)
    h = _mix32((i ^ k[0]) * jnp.uint32(0x9E3779B9) + k[1])
    return (h >> 8).astype(jnp.float32) * jnp.float32(2.0 ** -24)


def binarize(rng: jax.Array, x: jax.Array, *, method: str = "threefry") -> jax.Array:
    """Dynamic binarization: a Bernoulli(x) sample, as x's dtype.

    Args:
      rng: PRNG key; fold in the step so each step draws fresh samples.
      x: intensities in [0, 1], any shape.
      method: ``"threefry"``, jax.random.bernoulli (the default, and what every recorded run in
        experiments/ used); or ``"counter"``, :func:`counter_uniform` below ``x``: the same
        distribution (up to ``x`` rounded up to the 2^-24 grid) from other random numbers, at a
        fraction of the cost on a CPU.

    Returns:
      Array like `x` with values in {0, 1}.

    >>> binarize(jax.random.key(0), jnp.array([0.0, 1.0]))
    Array([0., 1.], dtype=float32)
    """
    x = jnp.asarray(x)
    if method == "threefry":
        return jax.random.bernoulli(rng, x).astype(x.dtype)
    if method == "counter":
        return (counter_uniform(rng, x.shape) < x).astype(x.dtype)
    raise ValueError(f"Unknown binarization method {method!r}; choose one of {BINARIZE_METHODS}.")


def epoch_permutation(rng: jax.Array, num_examples: int, epoch) -> jax.Array:
    """The example order of `epoch`: a permutation of range(num_examples).

    It depends only on (rng, epoch), so a run resumed from a checkpoint sees the same order.

    Args:
      rng: PRNG key of the data order.
      num_examples: dataset size (static).
      epoch: epoch index; may be traced.

    Returns:
      int32 array of shape (num_examples,).
    """
    return jax.random.permutation(jax.random.fold_in(rng, epoch), num_examples)


def take_batch(x: jax.Array, perm: jax.Array, index, batch_size: int) -> jax.Array:
    """Rows `perm[index * batch_size : (index + 1) * batch_size]` of `x`; works under jit.

    `index` may be traced; `batch_size` must be static. Iterate `index` over
    `range(steps_per_epoch(len(x), batch_size))`: past the end, `dynamic_slice` clamps its start
    and would silently repeat examples.

    Args:
      x: dataset of shape (N, ...).
      perm: permutation of range(N), e.g. from `epoch_permutation`.
      index: batch index within the epoch.
      batch_size: rows per batch.

    Returns:
      Array of shape (batch_size, ...).
    """
    rows = jax.lax.dynamic_slice(perm, (index * batch_size,), (batch_size,))
    return gather_rows(x, rows)


def gather_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    """``x[rows]`` without bounds checks: ``rows`` must be valid row indices (from a permutation).

    Inside a jitted step this is the whole input pipeline of the device-resident path; skipping
    the clamping that ``jnp.take`` adds keeps it to one plain gather.
    """
    return x.at[rows].get(mode="promise_in_bounds")


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Number of full batches in an epoch (the remainder is left to the next epoch's shuffle).

    Raises:
      DataError: batch_size <= 0 or larger than num_examples.
    """
    if batch_size <= 0 or batch_size > num_examples:
        raise DataError(
            f"batch_size must be in 1..{num_examples} (the number of examples); got {batch_size}."
        )
    return num_examples // batch_size



def pad_rows(x, multiple: int):
    """`x` with zero rows appended up to a multiple of `multiple` rows, and a mask of the real rows.

    Numpy input is padded with numpy (on the host), anything else with jax.numpy, so this also
    works under jit (`multiple` static).

    Args:
      x: numpy or JAX array of shape (N, ...).
      multiple: positive int.

    Returns:
      `(x_padded, mask)`: x_padded of shape (M, ...) with M = ceil(N / multiple) * multiple, zeros
      in rows N.., and mask float32 of shape (M,), 1 for the rows of `x` and 0 for padding; both
      numpy for numpy input, else JAX arrays.

    Raises:
      DataError: multiple <= 0.
    """
    if multiple <= 0:
        raise DataError(f"multiple must be positive; got {multiple}.")
    xp = np if isinstance(x, np.ndarray) else jnp
    n = len(x)
    pad = -n % multiple
    mask = xp.concatenate([xp.ones((n,), xp.float32), xp.zeros((pad,), xp.float32)])
    if pad:
        x = xp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x, mask


def pad_batches(x: np.ndarray, batch_size: int, *, num_batches: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-shape batches that cover every example exactly once, with a mask for the padding.

    The last batch is padded with zeros to `batch_size`, so a jitted eval step compiles once; the
    mask (float32, 1 for real rows, 0 for padding) lets a masked mean count each example once:
    `sum(loss * mask) / sum(mask)`.

    Args:
      x: numpy array of shape (N, ...).
      batch_size: rows per batch, > 0.
      num_batches: pad to this many batches instead (at least enough for `x`): every process
        of a multi-process run gets the same shape.

    Returns:
      `(xs, masks)` of shapes (num_batches, batch_size, ...) and (num_batches, batch_size), with
      num_batches = ceil(N / batch_size).

    Raises:
      DataError: batch_size <= 0.

    >>> xs, masks = pad_batches(np.ones((3, 2), np.float32), 2)
    >>> xs.shape, masks.tolist()
    ((2, 2, 2), [[1.0, 1.0], [1.0, 0.0]])
    """
    if batch_size <= 0:
        raise DataError(f"batch_size must be positive; got {batch_size}.")
    x, mask = pad_rows(x, batch_size)
    if num_batches is not None and num_batches * batch_size > len(x):
        extra = num_batches * batch_size - len(x)
        x = np.concatenate([x, np.zeros((extra,) + x.shape[1:], x.dtype)])
        mask = np.concatenate([mask, np.zeros(extra, np.float32)])
    num_batches = len(x) // batch_size
    return x.reshape((num_batches, batch_size) + x.shape[1:]), mask.reshape(num_batches, batch_size)


def fits_on_device(nbytes: int, *, fraction: float = 0.5) -> bool:
    """Whether `nbytes` is below `fraction` of the default device's memory.

    Uses `memory_stats()["bytes_limit"]` where the device reports it; a CPU device reports nothing
    useful, so there 4 GiB is taken as the limit.

    Args:
      nbytes: size of the data to place on the device.
      fraction: share of device memory the data may take, in (0, 1]; the rest is for the model,
        optimizer state and activations.
    """
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"fraction must be in (0, 1]; got {fraction}.")
    device = jax.devices()[0]
    limit = None
    try:
        stats = device.memory_stats()
    except Exception:  # Some backends raise instead of returning None.
        stats = None
    if stats and stats.get("bytes_limit"):
        limit = stats["bytes_limit"] * fraction
    if limit is None:
        return nbytes < 4 * 2**30
    return nbytes < limit
