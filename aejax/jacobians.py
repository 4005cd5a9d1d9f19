"""Encoder Jacobians beyond the exact penalty: unbiased estimators of ``||J||_F^2`` and their
audit, per-example spectra and tangent planes, contraction ratios, saturation, the CAE+H term.

As in ``aejax.losses``, ``encode_fn`` maps a batch ``(B, ...)`` to codes ``(B, H)`` with no
interaction between examples, ``J`` is one example's ``H x D`` Jacobian (inputs flattened), and
every function returns one value per example unless it says otherwise.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from aejax import losses

Array = jax.Array

__all__ = [
    "hutchinson",
    "hutch_plus_plus",
    "contractive_estimate",
    "contractive_audit",
    "contractive_hessian",
    "singular_values",
    "tangent_directions",
    "contraction_ratios",
    "saturation",
    "ESTIMATORS",
    "PROBES",
]

ESTIMATORS = ("gaussian", "rademacher", "hutch++")
PROBES = tuple(losses._PROBES)


def _check_probes(probes: str, num_probes: int, least: int, fn: str) -> None:
    if probes not in PROBES:
        raise ValueError(f"{fn}: unknown probes {probes!r}; choose one of {PROBES}.")
    if num_probes < least:
        raise ValueError(f"{fn}: num_probes must be >= {least}, got {num_probes}.")


# --------------------------------------------------------------------------- estimators


def hutchinson(encode_fn: Callable[[Array], Array], x: Array, rng: Array, *,
               num_probes: int = 1, probes: str = "gaussian",
               chunk_size: Optional[int] = None) -> Array:
    """Hutchinson's unbiased estimate of ``||J||_F^2`` per example from ``num_probes`` JVPs.

    ``||J||_F^2 = tr(J^T J) = E_v ||J v||^2`` for any probe with ``E[v v^T] = I``. The variance of
    one probe is ``2 ||J^T J||_F^2 = 2 sum_i s_i^4`` (``s_i`` the singular values of ``J``) for
    Gaussian probes, and ``2 (||J^T J||_F^2 - sum_d (J^T J)_dd^2)``, never more, for Rademacher
    ones; ``num_probes`` probes divide it by ``num_probes``. With Gaussian probes this is
    ``losses.contractive(mode="estimate")``, draw for draw.

    Args:
      encode_fn: maps ``(B, ...)`` to ``(B, H)``.
      x: ``(B, ...)`` floating inputs.
      rng: PRNG key.
      num_probes: probes per example, each one batched JVP.
      probes: ``"gaussian"`` or ``"rademacher"`` (random signs).
      chunk_size: examples at a time; each chunk draws from ``fold_in(rng, chunk)``.

    Returns:
      ``(B,)`` estimates.

    >>> w = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    >>> hutchinson(lambda x: x @ w, jnp.ones((3, 2)), jax.random.key(0), num_probes=4).shape
    (3,)
    """
    _check_probes(probes, num_probes, 1, "hutchinson")
    losses._code_shape(encode_fn, x, "hutchinson")
    return losses._chunked(
        lambda c, key: losses._frob_estimate(encode_fn, c, key, num_probes, probes), x,
        chunk_size, rng)


def _hutch_plus_plus(fn: Callable[[Array], Array], x: Array, rng: Array, num_probes: int,
                     probes: str) -> Array:
    sketch, rest = num_probes // 3, num_probes - 2 * (num_probes // 3)
    key_s, key_g = jax.random.split(rng)
    draw = losses._PROBES[probes]
    y = losses._jvps(fn, x, draw(key_s, (sketch,) + x.shape, x.dtype))  # (k, B, H): J S
    # Q is held constant under differentiation: the estimate is unbiased for every fixed Q, so
    # its gradient stays unbiased, and no QR decomposition is differentiated.
    q = jax.lax.stop_gradient(jnp.linalg.qr(jnp.moveaxis(y, 0, -1))[0])  # (B, H, min(H, k))
    _, vjp_fn = jax.vjp(fn, x)
    (qj,) = jax.vmap(vjp_fn)(jnp.moveaxis(q, -1, 0))  # rows of Q^T J, one VJP each
    captured = jnp.square(qj.reshape(qj.shape[0], x.shape[0], -1)).sum(axis=(0, 2))
    jg = losses._jvps(fn, x, draw(key_g, (rest,) + x.shape, x.dtype))  # (l, B, H)
    deflated = jg - jnp.einsum("bhk,bjk,lbj->lbh", q, q, jg)  # (I - Q Q^T) J g
    return captured + jnp.square(deflated).sum(axis=2).mean(axis=0)


def hutch_plus_plus(encode_fn: Callable[[Array], Array], x: Array, rng: Array, *,
                    num_probes: int = 3, probes: str = "gaussian",
                    chunk_size: Optional[int] = None) -> Array:
    """Hutch++ estimate of ``||J||_F^2`` per example (Meyer, Musco, Musco & Woodruff 2021).

    Unbiased, with ``num_probes`` Jacobian products in all. ``k = num_probes // 3`` JVPs sketch
    the range of ``J``: ``Y = J S``, ``Q = orth(Y)`` (``H x k``). The part of the norm in that
    range, ``||Q^T J||_F^2``, is exact from ``k`` VJPs (cotangents the columns of ``Q``); the rest,
    ``||(I - Q Q^T) J||_F^2``, is Hutchinson's estimate from the remaining
    ``l = num_probes - 2k`` JVPs. This is Hutch++ on ``tr(J J^T)``, with the range of ``J J^T``
    sketched by ``J S`` (one product a column, where a product with ``J J^T`` costs two). The
    variance, ``2 sum_i t_i^4 / l`` for Gaussian probes with ``t_i`` the singular values of
    ``(I - Q Q^T) J``, is far below Hutchinson's at the same budget when the spectrum of ``J``
    decays, and zero when ``k >= rank(J)``.

    ``Q`` is constant under differentiation (``stop_gradient``): the estimate is unbiased for
    every fixed ``Q``, so its gradient is an unbiased estimate of the penalty's gradient.

    Args:
      encode_fn: maps ``(B, ...)`` to ``(B, H)``.
      x: ``(B, ...)`` floating inputs.
      rng: PRNG key.
      num_probes: Jacobian products per example (JVPs and VJPs together), at least 3.
      probes: distribution of the sketch and of the Hutchinson probes, ``"gaussian"`` or
        ``"rademacher"``.
      chunk_size: as in :func:`hutchinson`.

    Returns:
      ``(B,)`` estimates.

    >>> w = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # rank 2: two sketch probes suffice
    >>> est = hutch_plus_plus(lambda x: x @ w, jnp.ones((1, 3)), jax.random.key(0), num_probes=6)
    >>> round(float(est[0]), 4)
    91.0
    """
    _check_probes(probes, num_probes, 3, "hutch_plus_plus")
    losses._code_shape(encode_fn, x, "hutch_plus_plus")
    return losses._chunked(
        lambda c, key: _hutch_plus_plus(encode_fn, c, key, num_probes, probes), x, chunk_size,
        rng)


def contractive_estimate(encode_fn: Callable[[Array], Array], x: Array, rng: Array, *,
                         estimator: str = "gaussian", num_probes: int = 1,
                         chunk_size: Optional[int] = None) -> Array:
    """An unbiased estimate of the contractive penalty ``||J||_F^2`` per example, by name.

    Args:
      encode_fn: maps ``(B, ...)`` to ``(B, H)``.
      x: ``(B, ...)`` floating inputs.
      rng: PRNG key.
      estimator: ``"gaussian"`` or ``"rademacher"`` (:func:`hutchinson` with those probes) or
        ``"hutch++"`` (:func:`hutch_plus_plus`, Gaussian probes). A static Python string.
      num_probes: Jacobian products per example (the same budget for every estimator).
      chunk_size: examples at a time.

    Returns:
      ``(B,)`` estimates.
    """
    if estimator == "hutch++":
        return hutch_plus_plus(encode_fn, x, rng, num_probes=num_probes, chunk_size=chunk_size)
    if estimator in PROBES:
        return hutchinson(encode_fn, x, rng, num_probes=num_probes, probes=estimator,
                          chunk_size=chunk_size)
    raise ValueError(f"contractive_estimate: unknown estimator {estimator!r}; choose one of "
                     f"{ESTIMATORS}.")


def _tree_vdot(a: Any, b: Any) -> Array:
    return sum(jnp.vdot(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def contractive_audit(encode_with_params: Callable[[Any, Array], Array], params: Any, x: Array,
                      rng: Array, *, estimator: str = "gaussian", num_probes: int = 1,
                      mode: str = "auto", chunk_size: Optional[int] = None) -> dict[str, Array]:
    """How far an estimated contractive penalty, and its gradient, are from the exact ones.

    Both penalties are means over the batch; both gradients are with respect to ``params``.
    Jit it with the static arguments bound (``functools.partial``).

    Args:
      encode_with_params: ``(params, x (B, ...)) -> (B, H)``.
      params: the parameters, any pytree.
      x: ``(B, ...)`` floating inputs.
      rng: PRNG key of the estimate.
      estimator: one of :data:`ESTIMATORS` (see :func:`contractive_estimate`).
      num_probes: Jacobian products per example of the estimate.
      mode: how the exact penalty is formed: ``"fwd"``, ``"rev"`` or ``"auto"``
        (:func:`aejax.losses.contractive`).
      chunk_size: examples at a time, for both.

    Returns:
      A flat dict of scalars: ``audit_exact`` and ``audit_estimate`` (the penalties),
      ``audit_rel_error`` (``|estimate - exact| / exact``), ``audit_grad_cosine`` (cosine
      between the two gradients) and ``audit_grad_rel_error`` (``||g_est - g|| / ||g||``).

    >>> w = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    >>> audit = contractive_audit(lambda w, x: x @ w, w, jnp.ones((2, 2)), jax.random.key(0),
    ...                           estimator="hutch++", num_probes=6)
    >>> round(float(audit["audit_exact"]), 4), round(float(audit["audit_grad_cosine"]), 4)
    (30.0, 1.0)
    """
    if mode not in ("fwd", "rev", "auto"):
        raise ValueError(f"contractive_audit: unknown mode {mode!r}; choose fwd, rev or auto.")

    def exact(p):
        encode_fn = lambda z: encode_with_params(p, z)
        return losses.contractive(encode_fn, x, mode=mode, chunk_size=chunk_size).mean()

    def estimate(p):
        encode_fn = lambda z: encode_with_params(p, z)
        return contractive_estimate(encode_fn, x, rng, estimator=estimator,
                                    num_probes=num_probes, chunk_size=chunk_size).mean()

    value, grad = jax.value_and_grad(exact)(params)
    value_est, grad_est = jax.value_and_grad(estimate)(params)
    tiny = jnp.finfo(value.dtype).tiny
    norm, norm_est = jnp.sqrt(_tree_vdot(grad, grad)), jnp.sqrt(_tree_vdot(grad_est, grad_est))
    diff = jax.tree.map(jnp.subtract, grad_est, grad)
    return {
        "audit_exact": value,
        "audit_estimate": value_est,
        "audit_rel_error": jnp.abs(value_est - value) / jnp.maximum(value, tiny),
        "audit_grad_cosine": _tree_vdot(grad, grad_est) / jnp.maximum(norm * norm_est, tiny),
        "audit_grad_rel_error": jnp.sqrt(_tree_vdot(diff, diff)) / jnp.maximum(norm, tiny),
    }


# --------------------------------------------------------------------------- second order


def contractive_hessian(encode_fn: Callable[[Array], Array], x: Array, *,
                        chunk_size: Optional[int] = None) -> Array:
    """Exact higher-order contractive term ``||dJ/dx||_F^2`` per example (CAE+H).

    The squared Frobenius norm of the encoder's second derivative, the ``H x D x D`` tensor
    ``d^2 encode_h / dx_d dx_e``: one JVP per input dimension of the batched Jacobian, itself
    formed as in :func:`aejax.losses.jacobian` (reverse mode when the code is the smaller side:
    forward-over-reverse). It is the limit of Rifai et al.'s (2011b) stochastic term:
    ``E ||J(x + eps) - J(x)||_F^2 = sigma^2 ||dJ/dx||_F^2 + O(sigma^4)`` for
    ``eps ~ N(0, sigma^2 I)``, so ``losses.contractive_higher_order(...) / sigma^2`` tends to it.

    Args:
      encode_fn: maps ``(B, ...)`` to ``(B, H)``; twice differentiable.
      x: ``(B, ...)`` floating inputs.
      chunk_size: examples at a time: a chunk holds ``chunk_size * D * H * D`` numbers.

    Returns:
      ``(B,)``.

    >>> f = lambda x: jnp.square(x) @ jnp.array([[1.0], [2.0]])  # Hessian diag(2, 4)
    >>> float(contractive_hessian(f, jnp.ones((1, 2)))[0])
    20.0
    """
    losses._code_shape(encode_fn, x, "contractive_hessian")
    flat_jacobian = lambda z: losses.jacobian(encode_fn, z).reshape(z.shape[0], -1)  # (B, H*D)
    return losses._chunked(
        lambda c: jnp.square(losses._jacobian_cols(flat_jacobian, c)).sum(axis=(0, 2)), x,
        chunk_size)


# --------------------------------------------------------------------------- diagnostics


def singular_values(encode_fn: Callable[[Array], Array], x: Array, *, mode: str = "auto",
                    chunk_size: Optional[int] = None) -> Array:
    """Singular values of every example's Jacobian, ``(B, min(H, D))``, largest first.

    Their squares sum to the contractive penalty ``||J||_F^2``; how fast they fall says how
    many directions around ``x`` the code follows (Rifai et al. 2011).

    Args:
      encode_fn: maps ``(B, ...)`` to ``(B, H)``.
      x: ``(B, ...)`` floating inputs.
      mode: how the Jacobians are formed (:func:`aejax.losses.jacobian`).
      chunk_size: examples at a time: a chunk holds ``chunk_size * H * D`` numbers.

    Returns:
      ``(B, min(H, D))``.

    >>> w = jnp.array([[3.0, 0.0], [0.0, 4.0]])
    >>> singular_values(lambda x: x @ w, jnp.ones((1, 2)))[0].tolist()
    [4.0, 3.0]
    """
    losses._code_shape(encode_fn, x, "singular_values")
    return losses._chunked(
        lambda c: jnp.linalg.svd(losses.jacobian(encode_fn, c, mode=mode), compute_uv=False), x,
        chunk_size)


def tangent_directions(encode_fn: Callable[[Array], Array], x: Array, *, num_directions: int,
                       mode: str = "auto", chunk_size: Optional[int] = None) -> Array:
    """The leading right singular vectors of every example's Jacobian, ``(B, k, D)``.

    The input directions the code is most sensitive to: the tangent plane of the learned
    manifold at ``x`` (the Manifold Tangent Classifier, Rifai et al. 2011c). Orthonormal, in
    order of decreasing singular value; each is signed so that its largest component is positive.

    Args:
      encode_fn: maps ``(B, ...)`` to ``(B, H)``.
      x: ``(B, ...)`` floating inputs (``D`` is their flattened size: reshape to
        ``x.shape[1:]`` to view a direction as an input).
      num_directions: ``k``, at most ``min(H, D)``.
      mode: how the Jacobians are formed (:func:`aejax.losses.jacobian`).
      chunk_size: examples at a time.

    Returns:
      ``(B, k, D)``.

    >>> w = jnp.array([[1.0, 0.0], [0.0, 0.0], [0.0, -3.0]])  # D = 3 inputs, H = 2 codes
    >>> t = tangent_directions(lambda x: x @ w, jnp.ones((1, 3)), num_directions=1)
    >>> t.shape, float(t[0, 0, 2])  # the third input moves the code most
    ((1, 1, 3), 1.0)
    """
    _, num_out = losses._code_shape(encode_fn, x, "tangent_directions")
    rank = min(num_out, math.prod(x.shape[1:]))
    if not 1 <= num_directions <= rank:
        raise ValueError(f"tangent_directions: num_directions must lie in [1, min(H, D) = {rank}], "
                         f"got {num_directions}.")

    def per_chunk(c: Array) -> Array:
        vh = jnp.linalg.svd(losses.jacobian(encode_fn, c, mode=mode), full_matrices=False)[2]
        v = vh[:, :num_directions]  # (c, k, D)
        peak = jnp.take_along_axis(v, jnp.argmax(jnp.abs(v), axis=2)[..., None], axis=2)
        return v * jnp.where(peak < 0, -1.0, 1.0).astype(v.dtype)

    return losses._chunked(per_chunk, x, chunk_size)


def contraction_ratios(encode_fn: Callable[[Array], Array], x: Array, radii: Array, rng: Array,
                       *, chunk_size: Optional[int] = None) -> Array:
    """``||f(x + r u) - f(x)|| / r`` for every example and radius, ``(B, R)``.

    ``u`` is an isotropic random unit direction per example (Gaussian, normalized), the same at
    every radius ``r``; averaging over examples gives the contraction curve of Rifai et al.
    (2011): input distance on the x axis, mean ratio on the y axis. As ``r -> 0`` the
    squared ratio's expectation over ``u`` tends to ``||J||_F^2 / D``. Inputs are not clipped.

    Args:
      encode_fn: maps ``(B, ...)`` to ``(B, H)``.
      x: ``(B, ...)`` floating inputs.
      radii: ``(R,)`` positive input distances.
      rng: PRNG key of the directions; with one chunk they are
        ``jax.random.normal(rng, x.shape, x.dtype)``, normalized per example.
      chunk_size: examples at a time; each chunk draws from ``fold_in(rng, chunk)``.

    Returns:
      ``(B, R)``; ``.mean(axis=0)`` is the curve.

    >>> ratios = contraction_ratios(lambda x: 3.0 * x, jnp.ones((2, 4)), jnp.array([0.1, 1.0]),
    ...                             jax.random.key(0))
    >>> ratios.shape, round(float(ratios.min()), 4), round(float(ratios.max()), 4)
    ((2, 2), 3.0, 3.0)
    """
    losses._code_shape(encode_fn, x, "contraction_ratios")
    radii = jnp.asarray(radii, x.dtype)
    if radii.ndim != 1:
        raise ValueError(f"contraction_ratios: radii must be a vector (R,), got shape "
                         f"{radii.shape}.")
    if not isinstance(radii, jax.core.Tracer) and not np.all(np.asarray(radii) > 0):
        raise ValueError(f"contraction_ratios: radii must be positive, got {np.asarray(radii)}.")

    def per_chunk(c: Array, key: Array) -> Array:
        u = jax.random.normal(key, c.shape, c.dtype)
        norms = jnp.linalg.norm(u.reshape(c.shape[0], -1), axis=1)
        u = u / norms.reshape((-1,) + (1,) * (c.ndim - 1))
        f0 = encode_fn(c)
        ratio = lambda r: jnp.linalg.norm(encode_fn(c + r * u) - f0, axis=1) / r
        return jax.vmap(ratio, out_axes=1)(radii)

    return losses._chunked(per_chunk, x, chunk_size, rng)


def saturation(activations: Array, *, eps: float = 0.05) -> Array:
    """Fraction of each example's units that are saturated: below ``eps`` or above ``1 - eps``.

    For sigmoid layers (values in [0, 1]): Rifai et al.'s (2011) SAT is its mean over examples.
    A contractive penalty drives units into saturation, where their derivative vanishes.

    Args:
      activations: ``(B, ...)`` activations in [0, 1].
      eps: distance to 0 or 1 counted as saturated, in (0, 0.5).

    Returns:
      ``(B,)`` fractions in [0, 1], in the activations' dtype.

    >>> saturation(jnp.array([[0.01, 0.5, 0.99, 0.3]])).tolist()
    [0.5]
    """
    if not 0.0 < eps < 0.5:
        raise ValueError(f"saturation: eps must lie in (0, 0.5), got {eps}.")
    if activations.ndim < 1:
        raise ValueError("saturation: expected activations of shape (B, ...), got a scalar.")
    a = activations.reshape(activations.shape[0], -1)
    dtype = a.dtype if jnp.issubdtype(a.dtype, jnp.floating) else jnp.float32
    return ((a < eps) | (a > 1 - eps)).astype(dtype).mean(axis=1)
