"""Per-example loss and penalty functions: pure functions of arrays, unreduced.

Every function returns one value per example (shape ``(B,)``) unless it says otherwise; the
caller reduces. Nothing here knows about models or training (see ``aejax.objectives``).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from aejax.data import batching

Array = jax.Array

__all__ = [
    "mse",
    "squared_error",
    "bce_with_logits",
    "gaussian_nll",
    "l1_activity",
    "kl_sparsity",
    "contractive",
    "contractive_dense_input",
    "contractive_sigmoid",
    "contractive_one_hidden",
    "contractive_higher_order",
    "gaussian_kl",
    "gaussian_log_prob",
    "bernoulli_log_prob",
    "iwae_bound",
    "l2_activity",
    "imq_kernel",
    "rbf_kernel",
    "mmd",
    "tc_decomposition",
    "TCDecomposition",
    "vq_codebook",
    "vq_commitment",
    "CONTRACTIVE_MODES",
    "MMD_KERNELS",
]

CONTRACTIVE_MODES = ("fwd", "rev", "auto", "estimate")


def _check_pair(predictions: Array, targets: Array, fn: str) -> None:
    if predictions.shape != targets.shape:
        raise ValueError(
            f"{fn}: predictions have shape {predictions.shape} but targets have shape "
            f"{targets.shape}; they must be equal (reshape the model output or the data, e.g. "
            "flat=True for MLP models).")
    for name, a in (("predictions", predictions), ("targets", targets)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{fn}: {name} have dtype {a.dtype}; a floating dtype is needed "
                            "(convert images with x.astype('float32') / 255).")
    if predictions.ndim < 1:
        raise ValueError(f"{fn}: expected a batch (B, ...), got a scalar.")
    if predictions.shape[0] == 0:
        raise ValueError(f"{fn}: the batch is empty (shape {predictions.shape}); pass at least "
                         "one example.")


def _sum_per_example(a: Array) -> Array:
    return a.reshape(a.shape[0], -1).sum(axis=1)


def _per_example_rows(*arrays: Array) -> tuple[Array, ...]:
    """Each ``(B, ...)`` array as ``(B, D)``, before per-pixel work: XLA's CPU sums a per-pixel
    term over an image-shaped ``(B, H, W, 1)`` array several times slower than over its rows."""
    return tuple(a.reshape(a.shape[0], -1) for a in arrays)


def squared_error(predictions: Array, targets: Array) -> Array:
    """Squared error summed over all pixels of each example.

    This is the per-image convention of Hinton & Salakhutdinov (2006).

    Args:
      predictions: ``(B, ...)`` floating.
      targets: same shape and dtype kind as ``predictions``.

    Returns:
      ``(B,)`` sum of squared differences per example.

    >>> float(squared_error(jnp.ones((1, 2)), jnp.zeros((1, 2)))[0])
    2.0
    """
    _check_pair(predictions, targets, "squared_error")
    predictions, targets = _per_example_rows(predictions, targets)
    return _sum_per_example(jnp.square(predictions - targets))


def mse(predictions: Array, targets: Array) -> Array:
    """Mean squared error per example (mean over pixels).

    Args:
      predictions: ``(B, ...)`` floating.
      targets: same shape as ``predictions``.

    Returns:
      ``(B,)``.

    >>> float(mse(jnp.ones((1, 4)), jnp.zeros((1, 4)))[0])
    1.0
    """
    _check_pair(predictions, targets, "mse")
    return squared_error(predictions, targets) / math.prod(predictions.shape[1:])


def bce_with_logits(logits: Array, targets: Array) -> Array:
    """Binary cross-entropy of Bernoulli logits against targets in [0, 1], summed per example.

    Computed per pixel as ``log1p(exp(-|l|)) + (1 - t) l`` for ``l >= 0`` and
    ``log1p(exp(-|l|)) - t l`` for ``l < 0``, which equals ``t softplus(-l) + (1 - t) softplus(l)``:
    both parts are non-negative for ``t`` in [0, 1], so there is no cancellation and the value is
    finite for any finite logit. One ``exp`` and one ``log1p`` per pixel (the two-softplus form
    costs two of each, the costliest part of a small model's step on CPU). A custom JVP gives the
    exact gradient ``sigmoid(l) - t`` everywhere, also at the kink ``l = 0`` where plain autodiff
    of this form would not; it reuses ``sigmoid(l)``, which XLA shares with a reconstruction
    metric computed from the same logits. Differentiable any number of times.
    Summing over pixels makes it the negative Bernoulli log-likelihood in nats.

    Args:
      logits: ``(B, ...)`` decoder outputs before the sigmoid.
      targets: same shape, values in [0, 1]. Concrete (non-traced) targets are checked here;
        inside ``jit`` the data are checked where they enter (``aejax.data.splits.check_images``).

    Raises:
      ValueError: concrete targets outside [0, 1] (or NaN).

    Returns:
      ``(B,)`` nats per example.

    >>> round(float(bce_with_logits(jnp.zeros((1, 1)), jnp.ones((1, 1)))[0]), 4)
    0.6931
    """
    _check_pair(logits, targets, "bce_with_logits")
    if not isinstance(targets, jax.core.Tracer):
        # NumPy, not jnp: inside a trace even a constant's jnp.min would be staged out.
        t = np.asarray(targets)
        lo, hi = (float(t.min()), float(t.max())) if t.size else (0.0, 0.0)
        if not (0.0 <= lo and hi <= 1.0):  # also catches NaN
            raise ValueError(f"bce_with_logits: targets must lie in [0, 1] (Bernoulli means), got "
                             f"values in [{lo}, {hi}]. Scale images by 1/255, or use mse for "
                             "real-valued targets.")
    return _sum_per_example(_bce_pixels(*_per_example_rows(logits, targets)))


@jax.custom_jvp
def _bce_pixels(logits: Array, targets: Array) -> Array:
    """Per-pixel Bernoulli cross-entropy (see :func:`bce_with_logits`)."""
    linear = jnp.where(logits >= 0, (1 - targets) * logits, -targets * logits)
    return jnp.log1p(jnp.exp(-jnp.abs(logits))) + linear


_bce_pixels.defjvps(
    lambda dl, _, logits, targets: (jax.nn.sigmoid(logits) - targets) * dl,
    lambda dt, _, logits, targets: -logits * dt)


def gaussian_nll(mean: Array, targets: Array, *, log_scale: Array | float = 0.0) -> Array:
    """Negative Gaussian log-likelihood ``-log N(targets; mean, exp(log_scale)^2)``, summed per example.

    Args:
      mean: ``(B, ...)``.
      targets: same shape.
      log_scale: scalar or broadcastable log standard deviation.

    Returns:
      ``(B,)`` nats per example.
    """
    _check_pair(mean, targets, "gaussian_nll")
    log_scale = jnp.broadcast_to(jnp.asarray(log_scale, mean.dtype), mean.shape)
    per_pixel = (0.5 * jnp.square((targets - mean) * jnp.exp(-log_scale)) + log_scale
                 + 0.5 * math.log(2 * math.pi))
    return _sum_per_example(per_pixel)


# --------------------------------------------------------------------------- sparsity


def l1_activity(activations: Array) -> Array:
    """L1 activity penalty ``sum_i |a_i|`` per example (multiply by lambda via the objective).

    Args:
      activations: ``(B, ...)`` activations of a layer.

    Returns:
      ``(B,)``.
    """
    if activations.ndim < 1:
        raise ValueError("l1_activity: expected activations of shape (B, ...), got a scalar.")
    return _sum_per_example(jnp.abs(activations))


def kl_sparsity(activations: Array, *, rho: float = 0.05, mask: Optional[Array] = None,
                eps: float = 1e-6) -> Array:
    """KL sparsity penalty ``sum_j KL(rho || rho_hat_j)`` (Ng's sparse autoencoder notes).

    ``rho_hat_j`` is the mean activation of unit ``j`` over the (masked) batch, so this penalty
    is a property of the batch, not of one example: it returns a scalar.

    Args:
      activations: ``(B, H)`` activations in (0, 1), e.g. of sigmoid units.
      rho: target mean activation in (0, 1).
      mask: optional ``(B,)`` weights, 1 for real examples and 0 for padding.
      eps: clipping of ``rho_hat`` away from 0 and 1 for finite logs.

    Returns:
      A scalar, in nats.
    """
    if not 0.0 < rho < 1.0:
        raise ValueError(f"kl_sparsity: rho must lie in (0, 1), got {rho}.")
    a = activations.reshape(activations.shape[0], -1)
    if mask is None:
        rho_hat = a.mean(axis=0)
    else:
        w = mask.astype(a.dtype)
        rho_hat = (a * w[:, None]).sum(axis=0) / jnp.maximum(w.sum(), 1.0)
    rho_hat = jnp.clip(rho_hat, eps, 1.0 - eps)
    kl = rho * jnp.log(rho / rho_hat) + (1 - rho) * jnp.log((1 - rho) / (1 - rho_hat))
    return kl.sum()


# --------------------------------------------------------------------------- contractive


def _code_shape(encode_fn: Callable[[Array], Array], x: Array, fn: str) -> tuple[int, int]:
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{fn}: x must be a batch of shape (B, ...) with B >= 1, got shape "
                         f"{x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{fn}: x has dtype {x.dtype}; the Jacobian needs a floating input.")
    out = jax.eval_shape(encode_fn, x)
    if not hasattr(out, "shape") or len(out.shape) != 2 or out.shape[0] != x.shape[0]:
        got = getattr(out, "shape", type(out).__name__)
        raise ValueError(
            f"{fn}: encode_fn must map a batch (B, ...) to codes (B, H); for input of shape "
            f"{x.shape} it returned {got}. Flatten the code (e.g. lambda x: f(x).reshape(len(x), -1)).")
    return out.shape


def _unit_rows(vjp_fn: Callable, y: Array, units: slice) -> Array:
    """Rows ``units`` of every example's Jacobian, ``(n, B, D)``: one VJP of the batch per unit.

    Examples are independent, so the cotangent ``e_h`` on every example returns row ``h`` of
    every example's Jacobian at once. ``vjp_fn`` and ``y`` are ``jax.vjp(fn, x)``'s.
    """
    eye = jnp.eye(y.shape[1], dtype=y.dtype)[units]
    (rows,) = jax.vmap(vjp_fn)(jnp.broadcast_to(eye[:, None, :], (eye.shape[0],) + y.shape))
    return rows.reshape(eye.shape[0], y.shape[0], -1)


def _jacobian_rows(fn: Callable[[Array], Array], x: Array, num_out: int) -> Array:
    """Row ``h`` of every example's Jacobian, ``(H, B, D)`` (:func:`_unit_rows`, all units)."""
    y, vjp_fn = jax.vjp(fn, x)
    return _unit_rows(vjp_fn, y, slice(0, num_out))


# The exact penalty in reverse mode holds ``H x B x D`` Jacobian rows (25.7 MB for a 784-128-32
# encoder at batch 256). On a CPU it forms them a group of code units at a time, each group's
# rows about CPU_ROWS_BYTES, so that a group stays in cache between the product that forms it,
# its square and the products of its gradient (the README's benchmark: that encoder's exact
# step from 19.5 to 13.0 times the plain step's time). At most MAX_UNIT_GROUPS groups: each is
# a copy of the encoder's reverse pass in the program. Other platforms form all at once.
CPU_ROWS_BYTES = 4 * 2**20
MAX_UNIT_GROUPS = 8


def unit_slices(num_out: int, rows_bytes: int, groups: Optional[int] = None) -> list[slice]:
    """The code units ``0..num_out`` in ``groups`` near-equal consecutive slices.

    ``groups=None`` chooses by platform: on a CPU, enough groups for about
    :data:`CPU_ROWS_BYTES` of rows each (``rows_bytes`` in all), at most
    :data:`MAX_UNIT_GROUPS` and at most ``num_out``; elsewhere one.

    >>> unit_slices(10, 0, groups=3)
    [slice(0, 3, None), slice(3, 7, None), slice(7, 10, None)]
    """
    if groups is None:
        groups = (min(num_out, MAX_UNIT_GROUPS, max(1, math.ceil(rows_bytes / CPU_ROWS_BYTES)))
                  if jax.default_backend() == "cpu" else 1)
    if not isinstance(groups, (int, np.integer)) or not 1 <= groups <= max(num_out, 1):
        raise ValueError(f"unit_groups must be an integer between 1 and the code size {num_out}, "
                         f"got {groups!r}.")
    bounds = [round(i * num_out / groups) for i in range(groups + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _rows_square_sums(fn: Callable[[Array], Array], x: Array, num_out: int,
                      groups: Optional[int]) -> Array:
    """``sum_h ||row h of J_i||^2`` for every example ``i``, ``(B,)``: the rows formed a group of
    code units at a time (:func:`unit_slices`)."""
    y, vjp_fn = jax.vjp(fn, x)
    total = jnp.zeros(x.shape[0], y.dtype)
    for units in unit_slices(num_out, num_out * x.size * x.dtype.itemsize, groups):
        total = total + jnp.square(_unit_rows(vjp_fn, y, units)).sum(axis=(0, 2))
    return total


def _jacobian_cols(fn: Callable[[Array], Array], x: Array) -> Array:
    """Column ``d`` of every example's Jacobian, ``(D, B, H)``: one JVP of the batch per input."""
    num_in = math.prod(x.shape[1:])
    basis = jnp.eye(num_in, dtype=x.dtype).reshape((num_in, 1) + x.shape[1:])
    return _jvps(fn, x, jnp.broadcast_to(basis, (num_in,) + x.shape))


def _jvps(fn: Callable[[Array], Array], x: Array, tangents: Array) -> Array:
    """``J t`` for each of ``P`` batched tangents ``(P, B, ...)``: ``(P, B, H)``, one JVP each."""
    return jax.vmap(lambda t: jax.jvp(fn, (x,), (t,))[1])(tangents)


_PROBES = {"gaussian": jax.random.normal, "rademacher": jax.random.rademacher}


def _frob_estimate(fn: Callable[[Array], Array], x: Array, rng: Array, num_probes: int,
                   probes: str = "gaussian") -> Array:
    # E_v ||J v||^2 = ||J||_F^2 whenever E[v v^T] = I (Gaussian or Rademacher v): unbiased, one
    # batched JVP per probe.
    jv = _jvps(fn, x, _PROBES[probes](rng, (num_probes,) + x.shape, x.dtype))  # (P, B, H)
    return jnp.square(jv).sum(axis=2).mean(axis=0)


def _chunked(per_chunk: Callable[..., Array], x: Array, chunk_size: Optional[int],
             rng: Optional[Array] = None) -> Array:
    """Applies a batch function ``(c, ...) -> (c, ...)`` chunk by chunk with ``lax.map``.

    Bounds memory; with ``rng``, ``per_chunk(x_chunk, key)`` gets ``fold_in(rng, i)`` for chunk
    ``i`` (or ``rng`` itself when the batch is one chunk), so every chunk draws its own noise.
    """
    batch = x.shape[0]
    if chunk_size is None or chunk_size >= batch:
        return per_chunk(x) if rng is None else per_chunk(x, rng)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}.")
    xp, _ = batching.pad_rows(x, chunk_size)
    xs = xp.reshape((-1, chunk_size) + x.shape[1:])
    if rng is None:
        out = jax.lax.map(per_chunk, xs)
    else:
        keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(xs.shape[0]))
        out = jax.lax.map(lambda a: per_chunk(*a), (xs, keys))
    return out.reshape((-1,) + out.shape[2:])[:batch]


def jacobian(encode_fn: Callable[[Array], Array], x: Array, *, mode: str = "auto",
             chunk_size: Optional[int] = None) -> Array:
    """Every example's encoder Jacobian ``d encode(x_i) / d x_i``, ``(B, H, D)`` (inputs flattened).

    Formed as :func:`contractive` forms it: ``"rev"`` one VJP of the batch per code unit,
    ``"fwd"`` one JVP per input dimension, ``"auto"`` the one with fewer passes.

    >>> w = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    >>> jacobian(lambda x: x @ w, jnp.ones((1, 2)))[0].tolist()
    [[1.0, 3.0], [2.0, 4.0]]
    """
    if mode not in ("fwd", "rev", "auto"):
        raise ValueError(f"jacobian: unknown mode {mode!r}; choose fwd, rev or auto.")
    _, num_out = _code_shape(encode_fn, x, "jacobian")
    if mode == "auto":
        mode = "rev" if num_out <= math.prod(x.shape[1:]) else "fwd"
    if mode == "rev":
        per_chunk = lambda c: jnp.transpose(_jacobian_rows(encode_fn, c, num_out), (1, 0, 2))
    else:
        per_chunk = lambda c: jnp.transpose(_jacobian_cols(encode_fn, c), (1, 2, 0))
    return _chunked(per_chunk, x, chunk_size)


def contractive(encode_fn: Callable[[Array], Array], x: Array, *, mode: str = "fwd",
                chunk_size: Optional[int] = None, num_probes: int = 1,
                rng: Optional[Array] = None, unit_groups: Optional[int] = None) -> Array:
    """Squared Frobenius norm of each example's encoder Jacobian (Rifai et al. 2011).

    ``||d encode(x_i) / d x_i||_F^2`` for every example ``i``, exact except in ``"estimate"`` mode.
    The Jacobian rows (``"rev"``) or columns (``"fwd"``) of all examples are computed together by
    differentiating the batched ``encode_fn``, which is exact when examples do not interact
    (no batch statistics in the encoder).

    Args:
      encode_fn: maps a batch ``(B, ...)`` to codes ``(B, H)``.
      x: ``(B, ...)`` floating inputs.
      mode: ``"fwd"`` (one JVP per input dimension, ``jax.jvp``/``jacfwd``), ``"rev"`` (one VJP
        per code unit, ``jax.vjp``/``jacrev``), ``"auto"`` (``rev`` when the code is smaller than
        the input, else ``fwd``), or ``"estimate"`` (unbiased random projections).
      chunk_size: examples processed at a time, to bound memory (the Jacobians of a chunk are
        ``chunk_size * H * D`` numbers). ``None`` processes the whole batch at once.
      num_probes: Gaussian probes per example in ``"estimate"`` mode.
      rng: PRNG key, required in ``"estimate"`` mode.
      unit_groups: in ``"rev"`` mode, how many groups of code units the Jacobian rows are
        formed in, one group after another (the same sums, in another order). ``None``: by
        platform, see :func:`unit_slices`.

    Returns:
      ``(B,)`` squared Frobenius norms.

    >>> w = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    >>> float(contractive(lambda x: x @ w, jnp.ones((1, 2)))[0])
    30.0
    """
    if mode not in CONTRACTIVE_MODES:
        raise ValueError(f"contractive: unknown mode {mode!r}; choose one of {CONTRACTIVE_MODES}.")
    _, num_out = _code_shape(encode_fn, x, "contractive")
    num_in = math.prod(x.shape[1:])
    if mode == "auto":
        mode = "rev" if num_out < num_in else "fwd"
    if mode == "estimate":
        if rng is None:
            raise ValueError("contractive: mode='estimate' needs rng=a PRNG key.")
        if num_probes < 1:
            raise ValueError(f"contractive: num_probes must be >= 1, got {num_probes}.")
        # Each chunk draws its own probes from its position so chunking keeps estimates unbiased.
        return _chunked(lambda c, key: _frob_estimate(encode_fn, c, key, num_probes), x,
                        chunk_size, rng)
    if mode == "rev":
        return _chunked(lambda c: _rows_square_sums(encode_fn, c, num_out, unit_groups), x,
                        chunk_size)
    return _chunked(lambda c: jnp.square(_jacobian_cols(encode_fn, c)).sum(axis=(0, 2)), x,
                    chunk_size)


def contractive_dense_input(head_fn: Callable[[Array], Array], kernel: Array, pre: Array, *,
                            mode: str = "auto", chunk_size: Optional[int] = None) -> Array:
    """Exact contractive penalty for an encoder whose first layer is dense: fast.

    For ``encode(x) = head(x @ kernel + bias)`` the Jacobian is ``J_head(pre) @ kernel.T``, so
    ``||J||_F^2 = tr(J_head G J_head^T)`` with the Gram matrix ``G = kernel.T @ kernel``. Only the
    small Jacobian of the head (``H x K``) is formed, never the ``H x D`` one: for the 784-128-32
    encoder that is about 6x fewer flops than differentiating through the first layer.

    Args:
      head_fn: maps first-layer pre-activations ``(B, K)`` to codes ``(B, H)``.
      kernel: ``(D, K)`` first-layer weights.
      pre: ``(B, K)`` first-layer pre-activations ``x @ kernel + bias``.
      mode: how the head's Jacobian is formed: ``"fwd"``, ``"rev"`` or ``"auto"``.
      chunk_size: as in :func:`contractive`.

    Returns:
      ``(B,)``, equal to ``contractive(lambda x: head_fn(x @ kernel + bias), x)``.
    """
    if mode not in ("fwd", "rev", "auto"):
        raise ValueError(f"contractive_dense_input: unknown mode {mode!r}; choose fwd, rev or auto.")
    if kernel.ndim != 2 or pre.ndim != 2 or pre.shape[1] != kernel.shape[1]:
        raise ValueError(f"contractive_dense_input: kernel must be (D, K) and pre (B, K); got "
                         f"{kernel.shape} and {pre.shape}.")
    _, num_out = _code_shape(head_fn, pre, "contractive_dense_input")
    gram = kernel.T @ kernel
    if mode == "auto":
        mode = "rev" if num_out <= pre.shape[1] else "fwd"

    def per_chunk(p: Array) -> Array:
        if mode == "rev":
            rows = _jacobian_rows(head_fn, p, num_out)  # (H, B, K): rows of J_head
            return jnp.einsum("hbk,kl,hbl->b", rows, gram, rows)
        cols = _jacobian_cols(head_fn, p)  # (K, B, H)
        return jnp.einsum("kbh,kl,lbh->b", cols, gram, cols)

    return _chunked(per_chunk, pre, chunk_size)


def contractive_sigmoid(code: Array, kernel: Array) -> Array:
    """Closed-form contractive penalty of a one-layer sigmoid encoder ``h = sigmoid(x W + b)``.

    ``||J||_F^2 = sum_j (h_j (1 - h_j))^2 sum_i W_ij^2`` (Rifai et al. 2011, eq. 5).

    Args:
      code: ``(B, H)`` sigmoid activations ``h``.
      kernel: ``(D, H)`` encoder weights ``W``.

    Returns:
      ``(B,)``.
    """
    if code.ndim != 2 or kernel.ndim != 2 or code.shape[1] != kernel.shape[1]:
        raise ValueError(f"contractive_sigmoid: code must be (B, H) and kernel (D, H); got "
                         f"{code.shape} and {kernel.shape}.")
    return jnp.square(code * (1 - code)) @ jnp.square(kernel).sum(axis=0)


def contractive_higher_order(encode_fn: Callable[[Array], Array], x: Array, rng: Array, *,
                             sigma: float = 0.1, num_corrupted: int = 4,
                             mode: str = "rev") -> Array:
    """Higher-order contractive term (CAE+H, Rifai et al. 2011b).

    ``E_eps ||J(x) - J(x + eps)||_F^2`` with ``eps ~ N(0, sigma^2 I)``, estimated with
    ``num_corrupted`` copies. Exact Jacobians are formed (``H x D`` per example), so this is for
    moderate sizes.

    Args:
      encode_fn: maps ``(B, ...)`` to ``(B, H)``.
      x: ``(B, ...)``.
      rng: PRNG key for the corruption.
      sigma: standard deviation of the Gaussian corruption.
      num_corrupted: number of corrupted copies averaged.
      mode: ``"fwd"`` or ``"rev"``: how Jacobians are formed.

    Returns:
      ``(B,)``.
    """
    _, num_out = _code_shape(encode_fn, x, "contractive_higher_order")
    if mode not in ("fwd", "rev"):
        raise ValueError(f"contractive_higher_order: mode must be 'fwd' or 'rev', got {mode!r}.")

    def jac(z: Array) -> Array:  # (H, B, D)
        if mode == "rev":
            return _jacobian_rows(encode_fn, z, num_out)
        return jnp.transpose(_jacobian_cols(encode_fn, z), (2, 1, 0))

    j0 = jac(x)
    noise = sigma * jax.random.normal(rng, (num_corrupted,) + x.shape, x.dtype)
    diffs = jax.lax.map(lambda e: jnp.square(jac(x + e) - j0).sum(axis=(0, 2)), noise)
    return diffs.mean(axis=0)


# --------------------------------------------------------------------------- VAE


def gaussian_kl(mean: Array, logvar: Array) -> Array:
    """``KL(N(mean, exp(logvar)) || N(0, I))`` per example, in nats, summed over latent units.

    Args:
      mean: ``(B, Z)``.
      logvar: ``(B, Z)`` log variances.

    Returns:
      ``(B,)``.

    >>> float(gaussian_kl(jnp.zeros((1, 3)), jnp.zeros((1, 3)))[0])
    0.0
    """
    if mean.shape != logvar.shape:
        raise ValueError(f"gaussian_kl: mean {mean.shape} and logvar {logvar.shape} must match.")
    return 0.5 * _sum_per_example(jnp.exp(logvar) + jnp.square(mean) - 1.0 - logvar)


def gaussian_log_prob(z: Array, mean: Array | float = 0.0, logvar: Array | float = 0.0) -> Array:
    """``log N(z; mean, exp(logvar))`` summed over the last axis. Shapes broadcast."""
    z = jnp.asarray(z)
    lp = -0.5 * (jnp.square(z - mean) * jnp.exp(-jnp.asarray(logvar)) + logvar
                 + math.log(2 * math.pi))
    return jnp.broadcast_to(lp, jnp.broadcast_shapes(jnp.shape(lp), z.shape)).sum(axis=-1)


def bernoulli_log_prob(logits: Array, targets: Array) -> Array:
    """``log Bernoulli(targets; sigmoid(logits))`` summed per example: ``-bce_with_logits``."""
    return -bce_with_logits(logits, targets)


def iwae_bound(log_weights: Array, *, axis: int = 0) -> Array:
    """Importance-weighted bound ``log (1/k) sum_k exp(log_weights_k)`` (Burda et al. 2016).

    Args:
      log_weights: ``log p(x, z_k) - log q(z_k | x)``, ``k`` samples along ``axis``.
      axis: the sample axis.

    Returns:
      The bound with ``axis`` reduced; ``k = 1`` gives the ELBO.
    """
    k = log_weights.shape[axis]
    # math.log gives a weakly typed Python float: np.log(k) would promote float32 to float64 (x64).
    return jax.scipy.special.logsumexp(log_weights, axis=axis) - math.log(k)


def contractive_one_hidden(activation_fn: Callable[[Array], Array], pre: Array,
                           kernel_in: Array, kernel_out: Array) -> Array:
    """Exact contractive penalty of ``encode(x) = act(x @ W1 + b1) @ W2 + b2``: cheapest form.

    The Jacobian is ``W2.T diag(act'(pre)) W1.T``, so
    ``||J||_F^2 = sum_kl act'_k act'_l (W1.T W1)_kl (W2 W2.T)_kl``: one ``K x K`` quadratic form
    per example, with both Gram matrices shared by the batch. For the 784-128-32 encoder that is
    about 25 times fewer flops than :func:`contractive_dense_input` and 800 times fewer than
    forming the Jacobians.

    Args:
      activation_fn: the elementwise hidden activation ``act``.
      pre: ``(B, K)`` hidden pre-activations ``x @ W1 + b1``.
      kernel_in: ``(D, K)`` first-layer weights ``W1``.
      kernel_out: ``(K, H)`` code-layer weights ``W2`` (the code layer must be linear).

    Returns:
      ``(B,)``.
    """
    if (pre.ndim != 2 or kernel_in.ndim != 2 or kernel_out.ndim != 2
            or kernel_in.shape[1] != pre.shape[1] or kernel_out.shape[0] != pre.shape[1]):
        raise ValueError(f"contractive_one_hidden: need pre (B, K), kernel_in (D, K), kernel_out "
                         f"(K, H); got {pre.shape}, {kernel_in.shape}, {kernel_out.shape}.")
    # Elementwise derivative act'(pre) by one JVP with a tangent of ones (exact, differentiable).
    _, slope = jax.jvp(activation_fn, (pre,), (jnp.ones_like(pre),))
    weights = (kernel_in.T @ kernel_in) * (kernel_out @ kernel_out.T)
    return jnp.einsum("bk,kl,bl->b", slope, weights, slope)


# --------------------------------------------------------------------------- latent-space terms


def l2_activity(activations: Array) -> Array:
    """Half squared L2 norm ``0.5 sum_i a_i^2`` per example (the RAE's code penalty).

    Args:
      activations: ``(B, ...)`` activations of a layer, e.g. the codes.

    Returns:
      ``(B,)``.

    >>> float(l2_activity(jnp.array([[3.0, 4.0]]))[0])
    12.5
    """
    if activations.ndim < 1:
        raise ValueError("l2_activity: expected activations of shape (B, ...), got a scalar.")
    return 0.5 * _sum_per_example(jnp.square(activations))


def _squared_distances(x: Array, y: Array) -> Array:
    """``||x_i - y_j||^2``, ``(N, M)``, for rows of ``x`` ``(N, D)`` and ``y`` ``(M, D)``."""
    d = (jnp.square(x).sum(-1)[:, None] + jnp.square(y).sum(-1)[None, :] - 2.0 * x @ y.T)
    return jnp.maximum(d, 0.0)  # rounding can make the expansion slightly negative


def imq_kernel(x: Array, y: Array, *, scale: float) -> Array:
    """Inverse multiquadratics kernel ``C / (C + ||x - y||^2)`` between rows, ``(N, M)``.

    Args:
      x: ``(N, D)``.
      y: ``(M, D)``.
      scale: ``C > 0``.
    """
    return scale / (scale + _squared_distances(x, y))


def rbf_kernel(x: Array, y: Array, *, scale: float) -> Array:
    """Gaussian (RBF) kernel ``exp(-||x - y||^2 / C)`` between rows, ``(N, M)``.

    Args:
      x: ``(N, D)``.
      y: ``(M, D)``.
      scale: ``C > 0``.
    """
    return jnp.exp(-_squared_distances(x, y) / scale)


MMD_KERNELS: dict[str, Callable[..., Array]] = {"imq": imq_kernel, "rbf": rbf_kernel}


def mmd(x: Array, y: Array, *, kernel: str = "imq", scales: tuple[float, ...] = (1.0,),
        mask_x: Optional[Array] = None, mask_y: Optional[Array] = None) -> Array:
    """Unbiased estimate of ``MMD^2`` between the samples ``x`` and ``y`` (Gretton et al. 2012).

    ``1/(n(n-1)) sum_{i != j} k(x_i, x_j) + 1/(m(m-1)) sum_{i != j} k(y_i, y_j)
    - 2/(nm) sum_{i,j} k(x_i, y_j)``, with ``k`` the sum of the kernel at each scale ``C``. The
    Wasserstein autoencoder's penalty (Tolstikhin et al. 2018, WAE-MMD) between codes and
    samples of the prior. A property of the two samples, not of one example: a scalar, whose
    expectation is 0 when both samples come from the same distribution (it can be negative).

    Args:
      x: ``(N, D)`` samples (codes).
      y: ``(M, D)`` samples (of the prior).
      kernel: ``"imq"`` (:func:`imq_kernel`) or ``"rbf"`` (:func:`rbf_kernel`).
      scales: the kernel scales ``C``, each > 0 (WAE: ``2 D sigma^2`` for a prior
        ``N(0, sigma^2 I)``).
      mask_x: optional ``(N,)``, 1 for real rows of ``x`` and 0 for padding.
      mask_y: the same for ``y``.

    Returns:
      A scalar.

    >>> x, y = jnp.zeros((2, 1)), jnp.full((2, 1), 3.0)  # k = 1 within each, 1 / (1 + 9) across
    >>> round(float(mmd(x, y, kernel="imq", scales=(1.0,))), 4)
    1.8
    """
    if kernel not in MMD_KERNELS:
        raise ValueError(f"mmd: unknown kernel {kernel!r}; choose one of {sorted(MMD_KERNELS)}.")
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd: x must be (N, D) and y (M, D); got {x.shape} and {y.shape}.")
    scales = tuple(float(s) for s in scales)
    if not scales or not all(s > 0 and math.isfinite(s) for s in scales):
        raise ValueError(f"mmd: scales must be positive numbers, got {scales}.")
    mx = jnp.ones(x.shape[:1], x.dtype) if mask_x is None else mask_x.astype(x.dtype)
    my = jnp.ones(y.shape[:1], y.dtype) if mask_y is None else mask_y.astype(y.dtype)
    if mx.shape != x.shape[:1] or my.shape != y.shape[:1]:
        raise ValueError(f"mmd: masks must be (N,) and (M,); got {mx.shape} and {my.shape} for "
                         f"x {x.shape} and y {y.shape}.")
    k = lambda a, b: sum(MMD_KERNELS[kernel](a, b, scale=s) for s in scales)
    n, m = mx.sum(), my.sum()

    def within(a: Array, w: Array, count: Array) -> Array:
        pairs = w[:, None] * w[None, :] * (1.0 - jnp.eye(a.shape[0], dtype=a.dtype))
        return (k(a, a) * pairs).sum() / jnp.maximum(count * (count - 1.0), 1.0)

    between = (k(x, y) * mx[:, None] * my[None, :]).sum() / jnp.maximum(n * m, 1.0)
    return within(x, mx, n) + within(y, my, m) - 2.0 * between


class TCDecomposition(NamedTuple):
    """The three parts of the sampled KL ``log q(z|x) - log p(z)``, each ``(B,)`` in nats.

    Attributes:
      index_code_mi: ``log q(z|x) - log q(z)``, the index-code mutual information.
      total_correlation: ``log q(z) - sum_d log q(z_d)``.
      dimwise_kl: ``sum_d log q(z_d) - log p(z_d)``, the dimension-wise KL to the prior.
    """

    index_code_mi: Array
    total_correlation: Array
    dimwise_kl: Array


def tc_decomposition(z: Array, mean: Array, logvar: Array, *, dataset_size: int,
                     mask: Optional[Array] = None) -> TCDecomposition:
    """The beta-TCVAE decomposition of the KL by minibatch-weighted sampling (Chen et al. 2018).

    The aggregate posterior ``q(z) = (1/N) sum_n q(z|x_n)`` is estimated at each sample ``z_i``
    from the batch: ``log q(z_i) ~ logsumexp_j log q(z_i|x_j) - log(N M)``, and each marginal
    ``log q(z_id)`` the same way one dimension at a time, where ``N`` is the size of the
    training set and ``M`` the number of real examples in the batch. The three parts sum to
    ``log q(z_i|x_i) - log p(z_i)`` with the prior ``N(0, I)``: their means are the ELBO's KL
    split into index-code MI, total correlation and dimension-wise KL.

    Args:
      z: ``(B, Z)`` samples, ``z_i ~ q(z|x_i)``.
      mean: ``(B, Z)`` posterior means.
      logvar: ``(B, Z)`` posterior log variances.
      dataset_size: ``N``, the number of training examples.
      mask: optional ``(B,)``, 1 for real examples and 0 for padding; padded rows are left out
        of every estimate (their own values are meaningless).

    Returns:
      :class:`TCDecomposition`, each part ``(B,)``.
    """
    if not (z.shape == mean.shape == logvar.shape) or z.ndim != 2:
        raise ValueError(f"tc_decomposition: z, mean and logvar must all be (B, Z); got {z.shape}, "
                         f"{mean.shape}, {logvar.shape}.")
    if isinstance(dataset_size, bool) or int(dataset_size) != dataset_size or dataset_size < 1:
        raise ValueError(f"tc_decomposition: dataset_size must be an integer >= 1, got "
                         f"{dataset_size!r}.")
    w = jnp.ones(z.shape[:1], z.dtype) if mask is None else mask.astype(z.dtype)
    if w.shape != z.shape[:1]:
        raise ValueError(f"tc_decomposition: mask must be (B,) = {z.shape[:1]}, got {w.shape}.")
    # log q(z_id | x_j), (B_i, B_j, Z); padded x_j drop out of every logsumexp.
    pairwise = -0.5 * (jnp.square(z[:, None, :] - mean[None]) * jnp.exp(-logvar[None])
                       + logvar[None] + math.log(2 * math.pi))
    pairwise = pairwise + jnp.where(w > 0, 0.0, -jnp.inf)[None, :, None]
    log_nm = jnp.log(float(dataset_size) * jnp.maximum(w.sum(), 1.0))
    log_qz_x = gaussian_log_prob(z, mean, logvar)
    log_qz = jax.scipy.special.logsumexp(pairwise.sum(axis=2), axis=1) - log_nm
    log_marginals = (jax.scipy.special.logsumexp(pairwise, axis=1) - log_nm).sum(axis=1)
    log_pz = gaussian_log_prob(z)
    return TCDecomposition(log_qz_x - log_qz, log_qz - log_marginals, log_marginals - log_pz)


# --------------------------------------------------------------------------- vector quantization


def _check_quantized(encoding: Array, codeword: Array, fn: str) -> None:
    if encoding.shape != codeword.shape or encoding.ndim < 1:
        raise ValueError(f"{fn}: encoding {encoding.shape} and codeword {codeword.shape} must "
                         "be batches of the same shape.")


def vq_codebook(encoding: Array, codeword: Array) -> Array:
    """VQ-VAE codebook loss ``||sg(z_e) - e||^2`` per example (van den Oord et al. 2017).

    Moves the chosen codewords toward the encoder outputs; no gradient reaches the encoder.

    Args:
      encoding: ``(B, ...)`` encoder outputs ``z_e``.
      codeword: the chosen codewords ``e``, the same shape.

    Returns:
      ``(B,)`` squared distances summed over every latent of an example.
    """
    _check_quantized(encoding, codeword, "vq_codebook")
    return _sum_per_example(jnp.square(jax.lax.stop_gradient(encoding) - codeword))


def vq_commitment(encoding: Array, codeword: Array) -> Array:
    """VQ-VAE commitment loss ``||z_e - sg(e)||^2`` per example (weight beta = 0.25 in the paper).

    Keeps the encoder outputs near their codewords; no gradient reaches the codebook.

    Args:
      encoding: ``(B, ...)`` encoder outputs ``z_e``.
      codeword: the chosen codewords ``e``, the same shape.

    Returns:
      ``(B,)``.
    """
    _check_quantized(encoding, codeword, "vq_commitment")
    return _sum_per_example(jnp.square(encoding - jax.lax.stop_gradient(codeword)))
