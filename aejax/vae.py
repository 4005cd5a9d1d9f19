"""Variational autoencoder bounds and evaluation: ELBO, IWAE bound, prior samples, test NLL.

Pure functions of a stochastic model (:class:`aejax.models.VAE`, or any model that offers
``posterior(x) -> (mean, logvar)`` and ``decode(z)``) and its params; every random draw comes from an
explicit key, and sample ``k`` of a bound always uses ``fold_in(rng, k)``. A conditional model
(:class:`aejax.models.CVAE`) is given its examples' labels as ``condition=y``; its bounds are
then bounds on ``log p(x|y)``.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from aejax import losses, models
from aejax.data import batching

Array = jax.Array
# (mean, logvar) of q(z|x), each (B, Z), from a batch x (B, ...).
EncodeFn = Callable[[Array], tuple[Array, Array]]
# log p(x|z) per example (B,) from latents z (B, Z) and inputs x (B, ...).
LogLikFn = Callable[[Array, Array], Array]

__all__ = ["log_likelihood", "elbo", "log_weights", "iwae", "sample_prior", "evaluate_nll"]


# --------------------------------------------------------------------------- validation


def _check_model(model, fn: str) -> None:
    if not (callable(getattr(model, "posterior", None)) and callable(getattr(model, "decode", None))):
        raise ValueError(f"{fn}: model must be stochastic, with posterior(x) -> (mean, logvar) and "
                         f"decode(z) (an aejax.models.VAE); {type(model).__name__} is not.")


def _check_x(model, x, fn: str) -> None:
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{fn}: x has dtype {getattr(x, 'dtype', type(x).__name__)}; a floating "
                         "dtype is needed (scale images with x.astype('float32') / 255).")
    if getattr(model, "input_shape", None) is not None:
        models.check_input(x, model.input_shape, fn)


def _check_count(value, name: str, fn: str) -> int:
    # operator.index accepts Python and NumPy integers but rejects floats such as 1e3.
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{fn}: {name} must be an integer >= 1, got {value!r}.") from None
    if value < 1:
        raise ValueError(f"{fn}: {name} must be an integer >= 1, got {value}.")
    return value


def _likelihood(model) -> str:
    return getattr(model, "likelihood", "bernoulli")


def _bind(model, params, condition=None) -> tuple[EncodeFn, LogLikFn]:
    variables = {"params": params}
    args = lambda first: models.call_args(model, first, condition, "aejax.vae")

    def encode_fn(x: Array) -> tuple[Array, Array]:
        return model.apply(variables, *args(x), method="posterior")

    def log_lik_fn(z: Array, x: Array) -> Array:
        out = model.apply(variables, *args(z), method="decode")
        if _likelihood(model) == "bernoulli":
            return losses.bernoulli_log_prob(out, x)
        log_scale = model.apply(variables, method="decoder_log_scale")
        return -losses.gaussian_nll(out, x, log_scale=log_scale)

    return encode_fn, log_lik_fn


# --------------------------------------------------------------------------- core on callables


def _noise(rng: Array, indices: Array, shape: tuple[int, ...], dtype) -> Array:
    # One key per sample index, not per chunk: sample k is the same draw whatever the chunking,
    # so chunked and unchunked bounds agree to rounding and the ELBO shares the IWAE's samples.
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(rng, i), shape, dtype))(indices)


def _log_weights_at(posterior: tuple[Array, Array], log_lik_fn: LogLikFn, x: Array, rng: Array,
                    indices: Array) -> Array:
    """``log p(x, z_k) - log q(z_k|x)`` for the sample indices ``k`` in ``indices``: ``(n, B)``."""
    mean, logvar = posterior
    eps = _noise(rng, indices, mean.shape, mean.dtype)  # (n, B, Z)
    z = mean + jnp.exp(0.5 * logvar) * eps
    # log q from eps rather than from z: no cancellation in (z - mean), so an exact posterior
    # gives log weights that are constant to rounding.
    log_q = -0.5 * jnp.sum(jnp.square(eps) + logvar + math.log(2 * math.pi), axis=-1)
    log_prior = losses.gaussian_log_prob(z)
    log_lik = jax.vmap(log_lik_fn, in_axes=(0, None))(z, x)
    return log_lik + log_prior - log_q


def _elbo(encode_fn: EncodeFn, log_lik_fn: LogLikFn, x: Array, rng: Array,
          num_samples: int) -> Array:
    mean, logvar = encode_fn(x)
    eps = _noise(rng, jnp.arange(num_samples), mean.shape, mean.dtype)
    z = mean + jnp.exp(0.5 * logvar) * eps
    reconstruction = jax.vmap(log_lik_fn, in_axes=(0, None))(z, x).mean(axis=0)
    return reconstruction - losses.gaussian_kl(mean, logvar)


def _iwae(posterior: tuple[Array, Array], log_lik_fn: LogLikFn, x: Array, rng: Array,
          num_samples: int, chunk_size: Optional[int]) -> Array:
    if chunk_size is None or chunk_size >= num_samples:
        lw = _log_weights_at(posterior, log_lik_fn, x, rng, jnp.arange(num_samples))
        return losses.iwae_bound(lw)

    num_chunks = -(-num_samples // chunk_size)

    def chunk_logsumexp(c: Array) -> Array:
        idx = c * chunk_size + jnp.arange(chunk_size)
        lw = _log_weights_at(posterior, log_lik_fn, x, rng, idx)
        # The last chunk may run past num_samples; -inf weights drop out of the logsumexp.
        lw = jnp.where((idx < num_samples)[:, None], lw, -jnp.inf)
        return jax.scipy.special.logsumexp(lw, axis=0)

    # A scan (lax.map with a carry) keeps only the running logsumexp (B,), so memory is one
    # chunk's decoder outputs (chunk_size, B, D) whatever num_samples is.
    def step(acc: Array, c: Array) -> tuple[Array, None]:
        return jnp.logaddexp(acc, chunk_logsumexp(c)), None

    out = jax.eval_shape(chunk_logsumexp, jnp.zeros((), jnp.int32))
    acc0 = jnp.full(out.shape, -jnp.inf, out.dtype)
    acc, _ = jax.lax.scan(step, acc0, jnp.arange(num_chunks))
    return acc - math.log(num_samples)


# --------------------------------------------------------------------------- public API


def log_likelihood(model: models.VAE, params, z: Array, x: Array, *, condition=None) -> Array:
    """Decoder log-likelihood ``log p(x|z)`` per example, in nats.

    Bernoulli models read the decoder output as logits; Gaussian models as means with the
    model's learned global log standard deviation ``log_scale``.

    Args:
      model: the VAE.
      params: its flax params dict.
      z: ``(B, latent_size)`` latents.
      x: ``(B, *input_shape)`` floating inputs (in [0, 1] for Bernoulli models).

    Returns:
      ``(B,)`` log-likelihoods.

    >>> m = models.VAE(input_shape=(3,), hidden=(), latent_size=1)
    >>> p = models.init(m, jax.random.PRNGKey(0), jnp.zeros((1, 3)))
    >>> p = jax.tree.map(jnp.zeros_like, p)  # logits 0: every pixel has probability 1/2
    >>> round(float(log_likelihood(m, p, jnp.zeros((1, 1)), jnp.ones((1, 3)))[0]), 4)
    -2.0794
    """
    _check_model(model, "log_likelihood")
    _check_x(model, x, "log_likelihood")
    return _bind(model, params, condition)[1](z, x)


def elbo(model: models.VAE, params, x: Array, rng: Array, *, num_samples: int = 1,
         condition=None) -> Array:
    """Evidence lower bound ``E_q[log p(x|z)] - KL(q(z|x) || N(0, I))`` per example, in nats.

    The reconstruction term is a Monte Carlo average over ``num_samples`` reparameterized draws
    (sample ``k`` from ``fold_in(rng, k)``, as in :func:`log_weights`); the KL is analytic.
    All ``num_samples`` decoder outputs are held at once.

    Args:
      model: the VAE.
      params: its flax params dict.
      x: ``(B, *input_shape)`` floating inputs.
      rng: PRNG key.
      num_samples: draws of ``z`` per example, >= 1.

    Returns:
      ``(B,)`` ELBO estimates.
    """
    _check_model(model, "elbo")
    _check_x(model, x, "elbo")
    num_samples = _check_count(num_samples, "num_samples", "elbo")
    return _elbo(*_bind(model, params, condition), x, rng, num_samples)


def log_weights(model: models.VAE, params, x: Array, rng: Array, num_samples: int, *,
                condition=None) -> Array:
    """Importance log-weights ``log p(x, z_k) - log q(z_k|x)`` with ``z_k ~ q(z|x)``.

    ``z_k = mean + exp(logvar / 2) * eps_k`` with ``eps_k`` drawn from ``fold_in(rng, k)``.
    Their mean over ``k`` estimates the ELBO; their log-mean-exp is the IWAE bound.

    Args:
      model: the VAE.
      params: its flax params dict.
      x: ``(B, *input_shape)`` floating inputs.
      rng: PRNG key.
      num_samples: ``K >= 1``.

    Returns:
      ``(K, B)`` log-weights, in nats.
    """
    _check_model(model, "log_weights")
    _check_x(model, x, "log_weights")
    num_samples = _check_count(num_samples, "num_samples", "log_weights")
    encode_fn, log_lik_fn = _bind(model, params, condition)
    return _log_weights_at(encode_fn(x), log_lik_fn, x, rng, jnp.arange(num_samples))


def iwae(model: models.VAE, params, x: Array, rng: Array, *, num_samples: int,
         chunk_size: Optional[int] = None,
         posterior: Optional[tuple[Array, Array]] = None, condition=None) -> Array:
    """Importance-weighted bound ``log (1/k) sum_k p(x, z_k) / q(z_k|x)`` (Burda et al. 2016).

    A lower bound on ``log p(x)`` that rises toward it as ``k = num_samples`` grows; ``k = 1`` is
    an (unbiased, higher-variance) estimate of the ELBO. With ``chunk_size`` the samples are
    processed ``chunk_size`` at a time with a running logsumexp, so ``k = 5000`` fits in memory;
    because sample ``k`` is drawn from ``fold_in(rng, k)``, the result does not depend on
    ``chunk_size`` beyond float rounding and equals ``iwae_bound(log_weights(...))``.

    Args:
      model: the VAE.
      params: its flax params dict.
      x: ``(B, *input_shape)`` floating inputs.
      rng: PRNG key.
      num_samples: ``k >= 1``.
      chunk_size: samples per chunk (>= 1); ``None`` takes all at once.
      posterior: ``(mean, logvar)`` of ``q(z|x)``, each ``(B, Z)``, where a forward pass has
        computed them already (the ``iwae`` training term); by default the model's
        ``posterior(x)``.
      condition: the labels ``(B,)`` of a conditional model.

    Returns:
      ``(B,)`` bounds, in nats.
    """
    _check_model(model, "iwae")
    _check_x(model, x, "iwae")
    num_samples = _check_count(num_samples, "num_samples", "iwae")
    if chunk_size is not None:
        chunk_size = _check_count(chunk_size, "chunk_size", "iwae")
    encode_fn, log_lik_fn = _bind(model, params, condition)
    if posterior is None:
        posterior = encode_fn(x)  # once: the encoder does not depend on the sample
    return _iwae(posterior, log_lik_fn, x, rng, num_samples, chunk_size)


def sample_prior(model: models.VAE, params, rng: Array, num: int, *, mean: bool = True,
                 latent_size: Optional[int] = None, condition=None) -> Array:
    """Decoded samples of the generative model with ``z ~ N(0, I)``.

    Args:
      model: the VAE.
      params: its flax params dict.
      rng: PRNG key (split for ``z`` and, when ``mean=False``, for the pixels).
      num: number of samples, >= 1.
      mean: return the decoder's mean (Bernoulli probabilities ``sigmoid(logits)`` in [0, 1], or
        Gaussian means) instead of a draw from ``p(x|z)`` (binary pixels, or means plus
        ``exp(log_scale)`` times Gaussian noise).
      latent_size: dimension of ``z``; by default the model's ``latent_size``.
      condition: for a conditional model, the ``(num,)`` labels to generate.

    Returns:
      ``(num, *input_shape)`` images.
    """
    _check_model(model, "sample_prior")
    latent_size = latent_size or getattr(model, "latent_size", None)
    if not latent_size:
        raise ValueError("sample_prior: give latent_size= for a model without a latent_size field.")
    num = _check_count(num, "num", "sample_prior")
    z_rng, x_rng = jax.random.split(rng)
    dtype = jnp.result_type(*jax.tree.leaves(params))
    z = jax.random.normal(z_rng, (num, latent_size), dtype)
    variables = {"params": params}
    out = models.decoder(model, params, condition)(z)
    if _likelihood(model) == "bernoulli":
        probs = jax.nn.sigmoid(out)
        return probs if mean else jax.random.bernoulli(x_rng, probs).astype(out.dtype)
    if mean:
        return out
    scale = jnp.exp(model.apply(variables, method="decoder_log_scale"))
    return out + scale * jax.random.normal(x_rng, out.shape, out.dtype)


def eval_chunk_size(num_samples: int, batch_size: int) -> int:
    """Importance samples per chunk that :func:`evaluate_nll` takes by default.

    A chunk runs the decoder on ``chunk * batch_size`` rows at once. On a CPU about 2,048 rows
    keep a chunk's activations in the caches: with Burda et al.'s 784-200-200-50 VAE and 100
    images a batch, chunks of 20 samples ran at about twice the rate of chunks of 500 (whose
    decoder output alone is 157 MB). Accelerators are given 64 times as many rows.
    """
    rows = 2048 if jax.default_backend() == "cpu" else 131072
    return max(1, min(num_samples, rows // max(batch_size, 1)))


# Module-level so repeated evaluations (every epoch, several checkpoints) reuse one compilation
# per (model, batch shape, num_samples, chunk_size).
@functools.partial(jax.jit, static_argnames=("model", "num_samples", "chunk_size"))
def _batch_iwae(params, x: Array, rng: Array, index: Array, condition, *, model: models.VAE,
                num_samples: int, chunk_size: Optional[int]) -> Array:
    return iwae(model, params, x, jax.random.fold_in(rng, index), num_samples=num_samples,
                chunk_size=chunk_size, condition=condition)


def nll_per_example(model: models.VAE, params, x, rng: Array, *, num_samples: int = 5000,
                    batch_size: int = 100, chunk_size: Optional[int] = None,
                    condition=None) -> np.ndarray:
    """``-iwae_k(x_i)`` for every example: the per-image test NLL estimates, in nats, ``(N,)``.

    Their mean is :func:`evaluate_nll`; their standard deviation over ``sqrt(N)`` is its
    standard error over the images. Arguments as for :func:`evaluate_nll`.
    """
    _check_model(model, "evaluate_nll")
    _check_x(model, x, "evaluate_nll")
    num_samples = _check_count(num_samples, "num_samples", "evaluate_nll")
    batch_size = _check_count(batch_size, "batch_size", "evaluate_nll")
    n = x.shape[0]  # >= 1: _check_x refuses an empty batch
    chunk_size = (eval_chunk_size(num_samples, min(batch_size, n)) if chunk_size is None
                  else _check_count(chunk_size, "chunk_size", "evaluate_nll"))
    xs, masks = batching.pad_batches(np.asarray(x), min(batch_size, n))
    ys = (len(xs) * [None] if condition is None
          else batching.pad_batches(np.asarray(condition), min(batch_size, n))[0])
    bounds = [_batch_iwae(params, batch, rng, np.int32(i), y, model=model,
                          num_samples=num_samples, chunk_size=chunk_size)
              for i, (batch, y) in enumerate(zip(xs, ys))]
    # Padded rows are dropped here, on the host: a non-finite bound of a pad row never counts.
    bounds = np.concatenate([np.asarray(b, np.float64)[np.asarray(m) > 0]
                             for b, m in zip(jax.device_get(bounds), masks)])
    return -bounds


def evaluate_nll(model: models.VAE, params, x, rng: Array, *, num_samples: int = 5000,
                 batch_size: int = 100, chunk_size: Optional[int] = None,
                 condition=None) -> float:
    """Test negative log-likelihood ``-mean_i iwae_k(x_i)`` over a dataset, in nats.

    The IWAE bound with large ``k`` (Burda et al. use 5000) is the standard estimate of a VAE's
    ``-log p(x)``; it over-estimates the NLL by a gap that shrinks with ``k``. Batches are padded
    to ``batch_size``, so every batch has one shape and the jitted batch function compiles once;
    batch ``i`` draws from ``fold_in(rng, i)``. :func:`nll_per_example` gives the per-image
    values (for a standard error).

    Args:
      model: the VAE.
      params: its flax params dict.
      x: ``(N, *input_shape)`` floating inputs (NumPy or JAX), N >= 1.
      rng: PRNG key.
      num_samples: ``k`` of the IWAE bound.
      batch_size: examples per jitted call (capped at N).
      chunk_size: importance samples per chunk; memory grows as ``batch_size * chunk_size * D``.
        ``None``: :func:`eval_chunk_size`.
      condition: the labels ``(N,)`` of a conditional model (then the estimate is of
        ``-log p(x|y)``).

    Returns:
      The mean NLL estimate per example, in nats.
    """
    return float(np.mean(nll_per_example(model, params, x, rng, num_samples=num_samples,
                                         batch_size=batch_size, chunk_size=chunk_size,
                                         condition=condition)))
