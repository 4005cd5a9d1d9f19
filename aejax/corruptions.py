"""Input corruptions for denoising autoencoders (Vincent et al. 2008): pure functions of (rng, x).

Each factory binds its hyperparameters and returns ``corrupt(rng, x) -> x_noisy`` with the shape
and dtype of ``x``; ``compose`` chains them with independent keys.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
Corruption = Callable[[Array, Array], Array]

__all__ = ["gaussian", "masking", "salt_and_pepper", "compose", "identity", "build", "CORRUPTIONS"]


def _check_fraction(name: str, fraction: float) -> None:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{name}: fraction must lie in [0, 1], got {fraction}.")


def identity() -> Corruption:
    """No corruption."""
    return lambda rng, x: x


def gaussian(std: float, *, clip: bool = True) -> Corruption:
    """Additive Gaussian noise ``x + std * eps``, clipped to [0, 1] when ``clip``.

    >>> x = jnp.full((2, 3), 0.5)
    >>> gaussian(0.0)(jax.random.PRNGKey(0), x).tolist() == x.tolist()
    True
    """
    if not std >= 0:  # also rejects NaN
        raise ValueError(f"gaussian: std must be >= 0, got {std}.")

    def corrupt(rng: Array, x: Array) -> Array:
        y = x + std * jax.random.normal(rng, x.shape, x.dtype)
        return jnp.clip(y, 0.0, 1.0) if clip else y

    return corrupt


def masking(fraction: float) -> Corruption:
    """Masking noise: each input set to 0 with probability ``fraction``."""
    _check_fraction("masking", fraction)

    def corrupt(rng: Array, x: Array) -> Array:
        keep = jax.random.bernoulli(rng, 1.0 - fraction, x.shape)
        return jnp.where(keep, x, jnp.zeros_like(x))

    return corrupt


def salt_and_pepper(fraction: float) -> Corruption:
    """Salt-and-pepper noise: each input, with probability ``fraction``, set to 0 or 1 (even odds)."""
    _check_fraction("salt_and_pepper", fraction)

    def corrupt(rng: Array, x: Array) -> Array:
        r_hit, r_salt = jax.random.split(rng)
        hit = jax.random.bernoulli(r_hit, fraction, x.shape)
        salt = jax.random.bernoulli(r_salt, 0.5, x.shape).astype(x.dtype)
        return jnp.where(hit, salt, x)

    return corrupt


def compose(*corruptions: Corruption) -> Corruption:
    """Applies ``corruptions`` in order, each with its own key folded from ``rng``."""

    def corrupt(rng: Array, x: Array) -> Array:
        for i, c in enumerate(corruptions):
            x = c(jax.random.fold_in(rng, i), x)
        return x

    return corrupt


CORRUPTIONS: dict[str, Callable[..., Corruption]] = {
    "none": identity,
    "gaussian": gaussian,
    "masking": masking,
    "salt_and_pepper": salt_and_pepper,
}


def build(kind: str, **kwargs) -> Corruption:
    """The corruption called ``kind`` with ``kwargs`` (e.g. ``build('masking', fraction=0.25)``)."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"Unknown corruption {kind!r}; choose one of {sorted(CORRUPTIONS)}.")
    try:
        return CORRUPTIONS[kind](**kwargs)
    except TypeError as e:
        raise ValueError(f"Corruption {kind!r} got bad options {sorted(kwargs)}: {e}") from None
