"""PCA in JAX: the linear baseline every autoencoder is compared with at the same code size.

Reports the same reconstruction metrics as the autoencoders (MSE per pixel, squared error per
image, the convention of Hinton & Salakhutdinov 2006).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class PCA(NamedTuple):
    """A fitted PCA: ``mean`` (D,), ``components`` (k, D) orthonormal rows, ``variances`` (k,)."""

    mean: Array
    components: Array
    variances: Array


@jax.jit
def _gram_eigh(xc: Array) -> tuple[Array, Array]:
    gram = xc.T @ xc
    return jnp.linalg.eigh(gram)


def fit(x: Array | np.ndarray, k: int) -> PCA:
    """Principal components of ``x`` (N, D) (flattened per example), largest first.

    Computed from the eigendecomposition of the D x D scatter matrix, which is cheaper than an
    SVD of the data when N >> D; the test compares it with NumPy's SVD.
    """
    x = jnp.asarray(x).reshape(len(x), -1)
    n, d = x.shape
    if not 1 <= k <= min(n, d):
        raise ValueError(f"pca.fit: k must be in [1, {min(n, d)}], got {k}.")
    mean = x.mean(axis=0)
    evals, evecs = _gram_eigh(x - mean)
    order = jnp.argsort(evals)[::-1][:k]
    comps = evecs[:, order].T
    # Fix each component's sign (largest entry positive) so results are reproducible.
    signs = jnp.sign(comps[jnp.arange(k), jnp.argmax(jnp.abs(comps), axis=1)])
    return PCA(mean, comps * signs[:, None], evals[order] / max(n - 1, 1))


def encode(pca: PCA, x: Array) -> Array:
    """Codes (N, k)."""
    return (jnp.asarray(x).reshape(len(x), -1) - pca.mean) @ pca.components.T


def decode(pca: PCA, z: Array, shape: tuple[int, ...] | None = None) -> Array:
    """Reconstructions from codes, flattened or reshaped to ``(N, *shape)``."""
    out = z @ pca.components + pca.mean
    return out if shape is None else out.reshape((len(z), *shape))


def reconstruction_errors(pca: PCA, x: Array) -> dict[str, float]:
    """``mse_per_pixel`` and ``squared_error_per_image`` of PCA reconstructions of ``x``."""
    flat = jnp.asarray(x).reshape(len(x), -1)
    se = jnp.square(decode(pca, encode(pca, flat)) - flat).sum(axis=1)
    return {"mse_per_pixel": float(se.mean() / flat.shape[1]),
            "squared_error_per_image": float(se.mean())}
