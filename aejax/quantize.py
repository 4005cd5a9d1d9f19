"""Vector quantization for the VQ-VAE: the quantizer module, straight-through codes, codebook use.

The codebook trains through the ``codebook`` and ``commitment`` loss terms
(:func:`aejax.losses.vq_codebook`); :func:`ema_update` is the moving-average alternative as a
pure function, for training loops that carry its state themselves.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


class Quantized(NamedTuple):
    """The quantizer's outputs for encodings ``z_e`` ``(..., D)``.

    Attributes:
      code: ``(..., D)`` straight-through codes: the value of ``codeword``, the gradient of
        ``z_e`` (the decoder's input).
      codeword: ``(..., D)`` the nearest codewords ``e = codebook[indices]``, differentiable
        with respect to the codebook (the codebook loss's input).
      indices: ``(...)`` int32, the index of each nearest codeword.
    """

    code: Array
    codeword: Array
    indices: Array


def nearest(z: Array, codebook: Array) -> Array:
    """Index of the codeword nearest each vector in Euclidean distance.

    Args:
      z: ``(..., D)`` vectors.
      codebook: ``(K, D)`` codewords.

    Returns:
      ``(...)`` int32 indices in ``[0, K)``; ties go to the lowest index.

    >>> nearest(jnp.array([[0.9, 0.0], [0.0, -2.0]]), jnp.array([[0.0, 0.0], [1.0, 0.0]])).tolist()
    [1, 0]
    """
    if codebook.ndim != 2 or z.shape[-1:] != codebook.shape[1:]:
        raise ValueError(f"nearest: z must be (..., D) and codebook (K, D); got {z.shape} and "
                         f"{codebook.shape}.")
    # ||z||^2 is the same for every codeword, so it does not change the argmin.
    scores = jnp.square(codebook).sum(-1) - 2.0 * z @ codebook.T
    return jnp.argmin(scores, axis=-1).astype(jnp.int32)


def straight_through(encoding: Array, codeword: Array) -> Array:
    """``codeword`` in the forward pass, the identity to ``encoding`` in the backward pass.

    ``z_e + sg(e - z_e)`` (van den Oord et al. 2017): the decoder's gradient is copied to the
    encoder output, and nothing flows to the codebook through it.
    """
    if encoding.shape != codeword.shape:
        raise ValueError(f"straight_through: encoding {encoding.shape} and codeword "
                         f"{codeword.shape} must have the same shape.")
    return encoding + jax.lax.stop_gradient(codeword - encoding)


def quantize(z: Array, codebook: Array) -> Quantized:
    """Each vector of ``z`` ``(..., D)`` replaced by its nearest codeword of ``codebook`` ``(K, D)``."""
    indices = nearest(z, codebook)
    codeword = jnp.take(codebook, indices, axis=0)
    return Quantized(straight_through(z, codeword), codeword, indices)


def code_counts(indices: Array, num_codes: int) -> Array:
    """How many latents of each example chose each codeword, ``(B, K)`` (floats).

    Args:
      indices: ``(B, ...)`` codeword indices.
      num_codes: ``K``.
    """
    flat = indices.reshape(indices.shape[0], -1)
    return jax.nn.one_hot(flat, num_codes, dtype=jnp.float32).sum(axis=1)


def _batch_counts(counts: Array, mask: Optional[Array]) -> Array:
    if counts.ndim != 2:
        raise ValueError(f"counts must be (B, K) per-example code counts, got {counts.shape}.")
    if mask is None:
        return counts.sum(axis=0)
    if mask.shape != counts.shape[:1]:
        raise ValueError(f"mask must be (B,) = {counts.shape[:1]}, got {mask.shape}.")
    return (counts * mask.astype(counts.dtype)[:, None]).sum(axis=0)


def perplexity(counts: Array, mask: Optional[Array] = None) -> Array:
    """Codebook perplexity ``exp(-sum_k p_k log p_k)`` of the batch's code frequencies ``p``.

    ``K`` when every codeword is used equally often, 1 when one codeword takes every latent.

    Args:
      counts: ``(B, K)`` per-example code counts (:func:`code_counts`).
      mask: optional ``(B,)``, 1 for real examples and 0 for padding.

    Returns:
      A scalar.

    >>> float(perplexity(jnp.array([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])))
    2.0
    """
    total = _batch_counts(counts, mask)
    p = total / jnp.maximum(total.sum(), 1.0)
    return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


def usage(counts: Array, mask: Optional[Array] = None) -> Array:
    """Fraction of the codewords that some latent of the (masked) batch chose, a scalar.

    Args:
      counts: ``(B, K)`` per-example code counts (:func:`code_counts`).
      mask: optional ``(B,)``, 1 for real examples and 0 for padding.
    """
    return jnp.mean((_batch_counts(counts, mask) > 0).astype(counts.dtype))


class EMAState(NamedTuple):
    """Moving averages of the exponential-moving-average codebook.

    Attributes:
      counts: ``(K,)`` moving average of how many vectors chose each codeword.
      sums: ``(K, D)`` moving average of the sum of those vectors.
    """

    counts: Array
    sums: Array


def ema_init(codebook: Array) -> EMAState:
    """The state whose codebook is ``codebook`` ``(K, D)``: counts of 1, sums equal to it."""
    return EMAState(jnp.ones(codebook.shape[:1], codebook.dtype), codebook)


def ema_update(state: EMAState, encoding: Array, indices: Array, *, decay: float = 0.99,
               eps: float = 1e-5, mask: Optional[Array] = None) -> tuple[EMAState, Array]:
    """One exponential-moving-average codebook update (van den Oord et al. 2017, appendix A.1).

    ``N_k <- decay N_k + (1 - decay) n_k`` and ``m_k <- decay m_k + (1 - decay) sum_{i: k} z_i``,
    where ``n_k`` vectors of the batch chose codeword ``k``; the new codeword is ``m_k / N_k``
    with ``N`` Laplace-smoothed by ``eps`` so that an unused codeword keeps a finite value.
    A training loop that uses it carries ``state`` beside the parameters, writes the returned
    codebook into them, and trains without the ``codebook`` loss term (the commitment term
    stays). aejax's own train step does not: it trains the codebook by the loss.

    Args:
      state: the moving averages (:func:`ema_init` at the start).
      encoding: ``(N, D)`` encoder outputs ``z_e`` (latents of every example, flattened).
      indices: ``(N,)`` their nearest codewords.
      decay: in [0, 1).
      eps: Laplace smoothing of the counts, > 0.
      mask: optional ``(N,)``, 1 for real vectors and 0 for padding.

    Returns:
      ``(new state, new codebook (K, D))``.
    """
    num_codes, dim = state.sums.shape
    if encoding.ndim != 2 or encoding.shape[1] != dim or indices.shape != encoding.shape[:1]:
        raise ValueError(f"ema_update: encoding must be (N, {dim}) and indices (N,); got "
                         f"{encoding.shape} and {indices.shape}.")
    if not 0.0 <= decay < 1.0 or not eps > 0:
        raise ValueError(f"ema_update: need 0 <= decay < 1 and eps > 0; got {decay}, {eps}.")
    onehot = jax.nn.one_hot(indices, num_codes, dtype=encoding.dtype)  # (N, K)
    if mask is not None:
        onehot = onehot * mask.astype(encoding.dtype)[:, None]
    counts = decay * state.counts + (1.0 - decay) * onehot.sum(axis=0)
    sums = decay * state.sums + (1.0 - decay) * onehot.T @ encoding
    total = counts.sum()
    smoothed = (counts + eps) / (total + num_codes * eps) * total
    return EMAState(counts, sums), sums / smoothed[:, None]


class VectorQuantizer(nn.Module):
    """A learned codebook of ``num_codes`` vectors of size ``code_dim``.

    Called on encodings ``(..., code_dim)``, returns :class:`Quantized` (straight-through codes,
    the chosen codewords, their indices).

    Attributes:
      num_codes: ``K``, the codebook's size.
      code_dim: ``D``, the size of each codeword.
    """

    num_codes: int = 64
    code_dim: int = 8

    @nn.compact
    def __call__(self, z: Array) -> Quantized:
        if self.num_codes < 1 or self.code_dim < 1:
            raise ValueError(f"VectorQuantizer: num_codes and code_dim must be positive, got "
                             f"{self.num_codes} and {self.code_dim}.")
        # Codewords about as spread as the encodings (unit variance per coordinate at the start).
        codebook = self.param("codebook", nn.initializers.variance_scaling(1.0, "fan_out", "uniform"),
                              (self.num_codes, self.code_dim))
        return quantize(z, codebook.astype(z.dtype))
