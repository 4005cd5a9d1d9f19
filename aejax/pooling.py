"""Max-pooling that records where each maximum was ("switches") and max-unpooling that puts values back.

Zeiler & Fergus' deconvolutional decoders: every pooling layer stores its argmax locations, and the
matching unpooling layer places values there and zeros elsewhere. NHWC, pure, jittable, vmappable.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

PADDINGS = ("VALID", "SAME")


def _check_window(window: int, fn: str) -> None:
    # bool is an int subclass; window=True is surely a mistake, not a 1x1 pool.
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"{fn}: window must be an integer >= 1, got {window!r}.")


def _check_rank4(a: Array, name: str, fn: str) -> None:
    if getattr(a, "ndim", None) != 4:
        raise ValueError(f"{fn}: {name} must have shape (B, H, W, C), got shape "
                         f"{tuple(getattr(a, 'shape', ()))}.")


def _same_pads(size: int, window: int) -> tuple[int, int]:
    """``(low, high)`` padding of SAME pooling with stride == window.

    Split as ``lax.padtype_to_pads`` does (extra on the high side), so pooled values match
    ``flax.linen.max_pool(padding='SAME')``; for window 2 the padding is at most 1, all bottom/right.
    """
    total = -(-size // window) * window - size
    return total // 2, total - total // 2


def _to_windows(x: Array, window: int) -> Array:
    """``(B, H'*k, W'*k, C) -> (B, H', k, W', k, C)``: a reshape, no data moved."""
    b, h, w, c = x.shape
    return x.reshape(b, h // window, window, w // window, window, c)


def _window_index(window: int) -> Array:
    """Each window element's row-major index ``0 .. k*k - 1``, shaped ``(1, 1, k, 1, k, 1)`` to
    broadcast against :func:`_to_windows`' layout."""
    rows, cols = jnp.arange(window, dtype=jnp.int32)[:, None], jnp.arange(window, dtype=jnp.int32)
    return (rows * window + cols).reshape(1, 1, window, 1, window, 1)


def _per_window(a: Array) -> Array:
    """``(B, H', W', C) -> (B, H', 1, W', 1, C)``: one value per window, against its elements."""
    return a[:, :, None, :, None, :]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _pool_windows(windows: Array, window: int) -> tuple[Array, Array]:
    """Maxima and first-argmax switches of ``windows`` (the :func:`_to_windows` layout).

    Elementwise over the ``k * k`` strided views of the windows' elements (one per position in
    the window): no transpose, no reduction over the window axes and no variadic (argmax)
    reduction, all slow on XLA's CPU. NaN counts as the maximum, as in ``jnp.argmax``.
    """
    views = [windows[:, :, i, :, j, :] for i in range(window) for j in range(window)]
    pooled = functools.reduce(jnp.maximum, views)  # lax.max propagates NaN
    switches = jnp.full(pooled.shape, window * window - 1, jnp.int32)
    for index in reversed(range(window * window - 1)):  # the first hit wins
        hit = (views[index] == pooled) | jnp.isnan(views[index])
        switches = jnp.where(hit, jnp.int32(index), switches)
    return pooled, switches


@_pool_windows.defjvp
def _pool_windows_jvp(window, primals, tangents):
    # The tangent of each maximum is its switch element's tangent: linear in the tangents, so
    # reverse mode transposes it into one select that puts each incoming gradient at its switch
    # (not split between tied maxima, as the gradient of jnp.max would).
    (windows,), (d_windows,) = primals, tangents
    pooled, switches = _pool_windows(windows, window)
    at_switch = _window_index(window) == _per_window(switches)
    d_pooled = jnp.sum(jnp.where(at_switch, d_windows, jnp.zeros((), d_windows.dtype)), axis=(2, 4))
    return (pooled, switches), (d_pooled, np.zeros(switches.shape, jax.dtypes.float0))


def max_pool_with_switches(x: Array, window: int = 2, *,
                           padding: str = "VALID") -> tuple[Array, Array]:
    """Non-overlapping max-pooling (stride = window) that also returns the argmax "switches".

    Args:
      x: inputs ``(B, H, W, C)``.
      window: side ``k`` of the square window; the stride is also ``k``.
      padding: ``"VALID"`` drops the last ``H % k`` rows (and ``W % k`` columns), giving
        ``H' = H // k``; ``"SAME"`` pads with ``-inf`` (the dtype's minimum for integers), giving
        ``H' = ceil(H / k)`` (7 -> 4 for ``k = 2``). The padding is split as lax splits it, extra
        on the bottom/right (for ``k = 2`` all of it), so pooled values equal
        ``flax.linen.max_pool(x, (k, k), strides=(k, k), padding=padding)``.

    Returns:
      ``(pooled, switches)``, both ``(B, H', W', C)``: the window maxima, and, as int32, the
      row-major index ``0 .. k*k - 1`` of each maximum within its (padded) window; ties go to
      the first in row-major order. The gradient of ``pooled`` flows only to that element (not
      split between ties as ``jnp.max`` would), so it matches what ``max_unpool`` routes back.

    Raises:
      ValueError: ``x`` is not rank 4, ``window < 1``, an unknown ``padding``, or a VALID window
        larger than the input (which would pool to nothing).

    >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    >>> pooled, switches = max_pool_with_switches(x)
    >>> pooled[0, :, :, 0].tolist(), switches[0, :, :, 0].tolist()
    ([[5.0, 7.0], [13.0, 15.0]], [[3, 3], [3, 3]])
    """
    fn = "max_pool_with_switches"
    _check_rank4(x, "x", fn)
    _check_window(window, fn)
    if padding not in PADDINGS:
        raise ValueError(f"{fn}: padding must be one of {PADDINGS}, got {padding!r}.")
    _, h, w, _ = x.shape
    if padding == "SAME":
        x = jnp.pad(x, ((0, 0), _same_pads(h, window), _same_pads(w, window), (0, 0)),
                    constant_values=_lowest(x.dtype))
    else:
        if h < window or w < window:
            raise ValueError(f"{fn}: a VALID window of {window} does not fit in {h}x{w} inputs; "
                             "use padding='SAME' or a smaller window.")
        x = x[:, : h - h % window, : w - w % window]
    return _pool_windows(_to_windows(x, window), window)


def _lowest(dtype) -> Array:
    """The value below every other of ``dtype``: ``-inf``, or the integer minimum."""
    return jnp.array(-jnp.inf if jnp.issubdtype(dtype, jnp.inexact) else jnp.iinfo(dtype).min,
                     dtype)


def upsample_nearest(x: Array, factor: int = 2) -> Array:
    """Nearest-neighbour upsampling by an integer ``factor``: each pixel becomes a
    ``factor x factor`` block, ``(B, H, W, C) -> (B, H*factor, W*factor, C)``.

    The values of ``jax.image.resize(x, ..., "nearest")`` at an integer scale, as a broadcast and
    a reshape (no gather; the gradient sums each block).

    >>> upsample_nearest(jnp.array([[1.0, 2.0]]).reshape(1, 1, 2, 1))[0, :, :, 0].tolist()
    [[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0]]
    """
    fn = "upsample_nearest"
    _check_rank4(x, "x", fn)
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"{fn}: factor must be an integer >= 1, got {factor!r}.")
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, factor, w, factor, c))
    return x.reshape(b, h * factor, w * factor, c)


def max_unpool(y: Array, switches: Array, window: int = 2, *,
               output_hw: tuple[int, int] | None = None) -> Array:
    """Places each value of ``y`` at its switch position in a ``k x k`` window of zeros.

    Args:
      y: values ``(B, H', W', C)``, e.g. pooled codes after a decoder layer.
      switches: int ``(B, H', W', C)`` from ``max_pool_with_switches`` with the same ``window``.
        A switch outside ``0 .. k*k - 1`` (not checked, to stay jittable) leaves its window zero.
      window: side ``k`` of the pooling window.
      output_hw: the pre-pooling ``(H, W)`` to crop to, removing the padding that SAME pooling
        added (e.g. ``(7, 7)`` after a SAME pool of 7x7 to 4x4). Must pool back to ``(H', W')``,
        i.e. ``H' * k - k < H <= H' * k``. ``None`` keeps ``(H' * k, W' * k)``.

    Returns:
      ``(B, H' * k, W' * k, C)`` (or ``(B, *output_hw, C)``), zero except ``y`` at the switches.
      Linear in ``y``, so its gradient w.r.t. ``y`` picks the incoming gradient at the switches.

    Raises:
      ValueError: ``y`` or ``switches`` not rank 4, shapes differ, switches not integer,
        ``window < 1``, or ``output_hw`` larger than the unpooled size (or too small to have
        pooled to ``(H', W')``).

    >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    >>> max_unpool(*max_pool_with_switches(x))[0, :2, :2, 0].tolist()
    [[0.0, 0.0], [0.0, 5.0]]
    """
    fn = "max_unpool"
    _check_rank4(y, "y", fn)
    _check_rank4(switches, "switches", fn)
    _check_window(window, fn)
    if y.shape != switches.shape:
        raise ValueError(f"{fn}: y and switches must have the same shape, got {tuple(y.shape)} "
                         f"and {tuple(switches.shape)}.")
    if not jnp.issubdtype(switches.dtype, jnp.integer):
        raise ValueError(f"{fn}: switches must be integer (from max_pool_with_switches), got "
                         f"dtype {switches.dtype}.")
    _, ho, wo, _ = y.shape
    full = (ho * window, wo * window)
    if output_hw is not None:
        output_hw = tuple(output_hw)
        if len(output_hw) != 2:
            raise ValueError(f"{fn}: output_hw must be (H, W), got {output_hw!r}.")
        if any(o > f for o, f in zip(output_hw, full)):
            raise ValueError(f"{fn}: output_hw {output_hw} is larger than the unpooled size "
                             f"{full} (window {window} on {ho}x{wo}).")
        if any(o <= f - window for o, f in zip(output_hw, full)):
            raise ValueError(f"{fn}: output_hw {output_hw} would not pool to {ho}x{wo} with "
                             f"window {window}; it must be within ({full[0] - window}, {full[0]}] "
                             f"x ({full[1] - window}, {full[1]}].")

    # A compare against the switches (no scatter): its gradient is a select too.
    b, _, _, c = y.shape
    at_switch = _window_index(window) == _per_window(switches.astype(jnp.int32))
    out = jnp.where(at_switch, _per_window(y), jnp.zeros((), y.dtype))
    out = out.reshape(b, ho * window, wo * window, c)
    if output_hw is not None:
        # Undo exactly the padding max_pool_with_switches(padding="SAME") added to this size.
        (top, _), (left, _) = _same_pads(output_hw[0], window), _same_pads(output_hw[1], window)
        out = out[:, top: top + output_hw[0], left: left + output_hw[1]]
    return out
