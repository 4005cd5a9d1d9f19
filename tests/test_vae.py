"""Tests of aejax.vae against closed forms: a linear-Gaussian VAE whose log p(x) is exact."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aejax import losses, models, vae

D, Z = 5, 2  # linear-Gaussian model: data and latent dimensions
LOG_SCALE = math.log(0.6)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


# --------------------------------------------------------------------------- linear-Gaussian model


def linear_gaussian(seed: int = 0, batch: int = 8):
    """Decoder ``x = W z + b + s eps`` with orthogonal columns of W, so the posterior is diagonal.

    The model is fixed; ``seed`` draws the data. Returns a dict of float64 NumPy arrays: W (D, Z),
    b (D,), s, data x (B, D) drawn from the model, the exact posterior (mean (B, Z), var (Z,))
    and log p(x) (B,).
    """
    model_rng = np.random.default_rng(1234)
    q, _ = np.linalg.qr(model_rng.normal(size=(D, Z)))
    w = q * np.array([1.5, 0.8])
    b = model_rng.normal(size=D) * 0.5
    rng = np.random.default_rng(seed)
    s = math.exp(LOG_SCALE)
    x = rng.normal(size=(batch, Z)) @ w.T + b + s * rng.normal(size=(batch, D))
    # p(x) = N(b, W W^T + s^2 I).
    cov = w @ w.T + s**2 * np.eye(D)
    chol = np.linalg.cholesky(cov)
    white = np.linalg.solve(chol, (x - b).T)
    log_px = (-0.5 * np.sum(white**2, axis=0) - np.sum(np.log(np.diag(chol)))
              - 0.5 * D * math.log(2 * math.pi))
    # p(z|x) = N(Sigma W^T (x - b) / s^2, Sigma), Sigma = (I + W^T W / s^2)^-1, diagonal here.
    post_var = 1.0 / (1.0 + np.diag(w.T @ w) / s**2)
    gain = w * post_var / s**2  # (D, Z): posterior mean = (x - b) @ gain
    post_mean = (x - b) @ gain
    return dict(w=w, b=b, s=s, x=x, log_px=log_px, post_mean=post_mean, post_var=post_var,
                gain=gain)


LINEAR_MODEL = models.VAE(input_shape=(D,), hidden=(), latent_size=Z, likelihood="gaussian",
                          activation="linear")


def linear_params(lg, *, kernel_shift=0.0, bias_shift=0.0, logvar_shift=0.0) -> dict:
    """VAE params of the linear-Gaussian model; zero shifts make q(z|x) the exact posterior."""
    gain = lg["gain"] + kernel_shift
    mean_bias = -lg["b"] @ lg["gain"] + bias_shift
    p = {
        "encoder_mean": {"kernel": gain, "bias": mean_bias},
        "encoder_logvar": {"kernel": np.zeros((D, Z)),
                           "bias": np.log(lg["post_var"]) + logvar_shift},
        "decoder_out": {"kernel": lg["w"].T, "bias": lg["b"]},
        "log_scale": np.asarray(LOG_SCALE),
    }
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p)


# An encoder wrong in slope, offset and scale: an ELBO gap of about 2 nats. Its q is wider than
# the posterior, so the importance weights are light-tailed and IWAE converges within k = 1000.
WRONG = dict(kernel_shift=0.1, bias_shift=np.array([0.6, -0.5]), logvar_shift=np.array([0.6, 0.9]))


def posterior_kl(lg, kernel_shift=0.0, bias_shift=0.0, logvar_shift=0.0) -> np.ndarray:
    """``KL(q(z|x) || p(z|x))`` per example for the encoder of ``linear_params``, in closed form."""
    q_mean = lg["x"] @ (lg["gain"] + kernel_shift) - lg["b"] @ lg["gain"] + bias_shift
    q_var = lg["post_var"] * np.exp(logvar_shift)
    p_mean, p_var = lg["post_mean"], lg["post_var"]
    return 0.5 * np.sum(q_var / p_var + (q_mean - p_mean) ** 2 / p_var - 1 + np.log(p_var / q_var),
                        axis=1)


def test_hidden_free_vae_is_linear_gaussian(x64):
    lg = linear_gaussian()
    params = linear_params(lg, **WRONG)
    x = jnp.asarray(lg["x"])
    z = np.random.default_rng(1).normal(size=(8, Z))
    mean, logvar = LINEAR_MODEL.apply({"params": params}, x, method="posterior")
    out = LINEAR_MODEL.apply({"params": params}, jnp.asarray(z), method="decode")
    np.testing.assert_allclose(out, z @ lg["w"].T + lg["b"], rtol=1e-12)
    np.testing.assert_allclose(
        mean, lg["x"] @ (lg["gain"] + WRONG["kernel_shift"]) - lg["b"] @ lg["gain"]
        + WRONG["bias_shift"], rtol=1e-12)
    np.testing.assert_allclose(logvar, np.broadcast_to(
        np.log(lg["post_var"]) + WRONG["logvar_shift"], (8, Z)), rtol=1e-12)


# --------------------------------------------------------------------------- log-likelihoods


def test_gaussian_log_likelihood_matches_numpy(x64):
    lg = linear_gaussian()
    z = np.random.default_rng(2).normal(size=(8, Z))
    got = vae.log_likelihood(LINEAR_MODEL, linear_params(lg), jnp.asarray(z), jnp.asarray(lg["x"]))
    resid = lg["x"] - (z @ lg["w"].T + lg["b"])
    want = np.sum(-0.5 * (resid / lg["s"]) ** 2 - LOG_SCALE - 0.5 * math.log(2 * math.pi), axis=1)
    assert got.shape == (8,)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_bernoulli_log_likelihood_matches_numpy():
    model = models.VAE(input_shape=(2, 3), hidden=(8,), latent_size=3)
    params = models.init(model, jax.random.PRNGKey(0), jnp.zeros((1, 2, 3)))
    rng = np.random.default_rng(3)
    z = rng.normal(size=(4, 3)).astype(np.float32) * 2
    x = rng.uniform(size=(4, 2, 3)).astype(np.float32)
    got = vae.log_likelihood(model, params, jnp.asarray(z), jnp.asarray(x))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = np.maximum(z @ p["decoder_0"]["kernel"] + p["decoder_0"]["bias"], 0)
    logits = (h @ p["decoder_out"]["kernel"] + p["decoder_out"]["bias"]).reshape(4, 2, 3)
    prob = 1 / (1 + np.exp(-logits))
    want = np.sum(x * np.log(prob) + (1 - x) * np.log1p(-prob), axis=(1, 2))
    np.testing.assert_allclose(got, want, rtol=1e-5)


# --------------------------------------------------------------------------- KL


def test_gaussian_kl_matches_monte_carlo(x64):
    rng = np.random.default_rng(4)
    mean = rng.normal(size=(3, 4))
    logvar = rng.normal(size=(3, 4))
    n = 200_000
    z = mean + np.exp(0.5 * logvar) * rng.normal(size=(n, 3, 4))
    log_q = np.sum(-0.5 * ((z - mean) ** 2 * np.exp(-logvar) + logvar + math.log(2 * math.pi)), -1)
    log_p = np.sum(-0.5 * (z**2 + math.log(2 * math.pi)), -1)
    diff = log_q - log_p  # (n, 3)
    mc, se = diff.mean(0), diff.std(0) / math.sqrt(n)
    got = np.asarray(losses.gaussian_kl(jnp.asarray(mean), jnp.asarray(logvar)))
    assert np.all(se < 0.02)  # the MC error is small next to the KL values (several nats)
    np.testing.assert_array_less(np.abs(got - mc), 4 * se)


# --------------------------------------------------------------------------- bounds


def test_exact_posterior_gives_zero_variance_bounds_equal_to_log_px(x64):
    # p(x, z) / q(z|x) = p(x) for every z when q is the posterior. (The analytic-KL ELBO
    # estimator is not zero-variance: its reconstruction term still varies with z; it is checked
    # in expectation below.)
    lg = linear_gaussian()
    x, rng = jnp.asarray(lg["x"]), jax.random.PRNGKey(5)

    @jax.jit
    def bounds(params):
        return (vae.log_weights(LINEAR_MODEL, params, x, rng, 16),
                vae.iwae(LINEAR_MODEL, params, x, rng, num_samples=1),
                vae.iwae(LINEAR_MODEL, params, x, rng, num_samples=7, chunk_size=3),
                vae.elbo(LINEAR_MODEL, params, x, rng))

    lw, iwae_1, iwae_7, elbo_1 = bounds(linear_params(lg))
    assert lw.shape == (16, 8)
    np.testing.assert_allclose(lw, np.broadcast_to(lg["log_px"], (16, 8)), rtol=0, atol=1e-10)
    np.testing.assert_allclose(iwae_1, lg["log_px"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(iwae_7, lg["log_px"], rtol=0, atol=1e-10)
    assert np.ptp(np.asarray(elbo_1 - lg["log_px"])) > 0.1
    # A wrong encoder breaks the constancy, so the checks above can fail.
    lw_wrong = bounds(linear_params(lg, **WRONG))[0]
    assert np.all(np.asarray(lw_wrong).std(axis=0) > 0.1)


@functools.partial(jax.jit, static_argnames="num_samples")
def _linear_elbos(params, x, keys, num_samples):
    return jax.vmap(lambda r: vae.elbo(LINEAR_MODEL, params, x, r, num_samples=num_samples))(keys)


@pytest.mark.parametrize("shifts", [{}, WRONG], ids=["exact_posterior", "wrong_encoder"])
def test_elbo_equals_log_px_minus_posterior_kl(x64, shifts):
    lg = linear_gaussian()
    keys = jax.random.split(jax.random.PRNGKey(6), 20)
    runs = np.asarray(_linear_elbos(linear_params(lg, **shifts), jnp.asarray(lg["x"]), keys, 500))
    mc, se = runs.mean(0), runs.std(0, ddof=1) / math.sqrt(len(runs))  # over 20 runs: (B,)
    kl = posterior_kl(lg, **shifts)
    np.testing.assert_array_less(np.abs(mc - (lg["log_px"] - kl)), 4 * se + 1e-9)
    np.testing.assert_array_less(mc, lg["log_px"] + 4 * se)
    if shifts:
        assert np.all(kl > 10 * se)  # the bound is strict, visibly so


def test_iwae_with_one_sample_is_the_elbo_in_expectation(x64):
    lg = linear_gaussian()
    params = linear_params(lg, **WRONG)
    x, rng = jnp.asarray(lg["x"]), jax.random.PRNGKey(7)
    keys = jax.random.split(rng, 20_000)

    @jax.jit
    def run(keys):
        # The same key gives the same sample: iwae(k=1) is exactly the first log-weight.
        return (jax.vmap(lambda r: vae.iwae(LINEAR_MODEL, params, x, r, num_samples=1))(keys),
                vae.log_weights(LINEAR_MODEL, params, x, keys[0], 1)[0])

    draws, first_weight = run(keys)
    np.testing.assert_allclose(draws[0], first_weight, rtol=1e-14)
    draws = np.asarray(draws)  # (R, B)
    mc, se = draws.mean(0), draws.std(0, ddof=1) / math.sqrt(len(draws))
    kl = posterior_kl(lg, **WRONG)
    np.testing.assert_array_less(np.abs(mc - (lg["log_px"] - kl)), 4 * se)
    assert np.all(se < 0.1 * kl)


def test_iwae_rises_toward_log_px_with_k(x64):
    lg = linear_gaussian()
    params = linear_params(lg, **WRONG)
    x = jnp.asarray(lg["x"])
    ks = (1, 10, 100, 1000)

    # One compilation for all k: IWAE_k of the first k samples, as vae.iwae draws them.
    @jax.jit
    def run(keys):
        lw = jax.vmap(lambda r: vae.log_weights(LINEAR_MODEL, params, x, r, ks[-1]))(keys)
        chunked = jax.vmap(lambda r: vae.iwae(LINEAR_MODEL, params, x, r, num_samples=ks[-1],
                                              chunk_size=300))(keys)
        return [losses.iwae_bound(lw[:, :k], axis=1) for k in ks], chunked

    bounds, chunked = run(jax.random.split(jax.random.PRNGKey(8), 10))
    np.testing.assert_allclose(chunked, bounds[-1], rtol=1e-12)
    per_key = np.stack([np.asarray(b).mean(axis=1) for b in bounds])  # (len(ks), keys)
    means = per_key.mean(axis=1)
    ses = per_key.std(axis=1, ddof=1) / math.sqrt(per_key.shape[1])
    log_px = lg["log_px"].mean()
    gaps = log_px - means
    assert gaps[0] > 1.0  # a visibly wrong encoder
    np.testing.assert_array_less(means[:-1], means[1:] + 3 * np.hypot(ses[:-1], ses[1:]))
    np.testing.assert_array_less(means, log_px + 3 * ses)  # a lower bound, up to MC error
    assert gaps[-1] < 0.05 * gaps[0]


# --------------------------------------------------------------------------- chunking


@pytest.fixture(scope="module")
def bernoulli_vae():
    model = models.VAE(input_shape=(6,), hidden=(8,), latent_size=3)
    params = models.init(model, jax.random.PRNGKey(9), jnp.zeros((1, 6)))
    x = jnp.asarray(np.random.default_rng(10).uniform(size=(4, 6)), jnp.float32)
    return model, params, x


def test_iwae_chunked_equals_unchunked(bernoulli_vae):
    model, params, x = bernoulli_vae
    rng = jax.random.PRNGKey(11)
    chunk_sizes = (1, 5, 37, 100)  # 37 = k: one chunk; 5: the last chunk is padded

    @jax.jit
    def run(params):
        whole = vae.iwae(model, params, x, rng, num_samples=37)
        chunked = [vae.iwae(model, params, x, rng, num_samples=37, chunk_size=c)
                   for c in chunk_sizes]
        lw = vae.log_weights(model, params, x, rng, 37)
        other = vae.iwae(model, params, x, jax.random.PRNGKey(12), num_samples=37, chunk_size=5)
        return whole, chunked, lw, other

    whole, chunked, lw, other = run(params)
    np.testing.assert_allclose(whole, losses.iwae_bound(lw), rtol=1e-6)
    for c, bound in zip(chunk_sizes, chunked):
        np.testing.assert_allclose(bound, whole, rtol=1e-6, err_msg=f"chunk_size={c}")
    # A different key gives a different bound, so the agreement above is not vacuous.
    assert np.all(np.abs(other - whole) > 1e-4)


def test_iwae_gradients_do_not_depend_on_chunking(bernoulli_vae):
    model, params, x = bernoulli_vae
    rng = jax.random.PRNGKey(13)

    def loss(p, chunk_size):
        return -vae.iwae(model, p, x, rng, num_samples=37, chunk_size=chunk_size).mean()

    # chunk_size=5 pads the last chunk with -inf log-weights, which must not poison gradients.
    whole, chunked = jax.jit(lambda p: (jax.grad(loss)(p, None), jax.grad(loss)(p, 5)))(params)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked)):
        assert np.all(np.isfinite(b))
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(whole)) > 1e-3


# --------------------------------------------------------------------------- prior samples


def test_sample_prior_bernoulli_shapes_and_range():
    model = models.VAE(input_shape=(2, 3), hidden=(8,), latent_size=3)
    params = models.init(model, jax.random.PRNGKey(14), jnp.zeros((1, 2, 3)))
    n = 20_000
    probs = np.asarray(vae.sample_prior(model, params, jax.random.PRNGKey(15), n))
    draws = np.asarray(vae.sample_prior(model, params, jax.random.PRNGKey(16), n, mean=False))
    assert probs.shape == draws.shape == (n, 2, 3)
    assert probs.min() >= 0 and probs.max() <= 1 and probs.std() > 0
    assert set(np.unique(draws)) <= {0.0, 1.0}
    # Both estimate E_z sigmoid(logits(z)), the model's marginal pixel means.
    se = np.sqrt(draws.var(0) / n + probs.var(0) / n)
    np.testing.assert_array_less(np.abs(draws.mean(0) - probs.mean(0)), 4 * se)


def test_sample_prior_gaussian_has_the_model_covariance(x64):
    lg = linear_gaussian()
    params = linear_params(lg)
    n = 50_000
    for mean, cov in ((True, lg["w"] @ lg["w"].T),
                      (False, lg["w"] @ lg["w"].T + lg["s"] ** 2 * np.eye(D))):
        xs = vae.sample_prior(LINEAR_MODEL, params, jax.random.PRNGKey(17), n, mean=mean)
        xs = np.asarray(xs)
        assert xs.shape == (n, D) and xs.dtype == np.float64
        sd = np.sqrt(np.diag(cov))
        np.testing.assert_array_less(np.abs(xs.mean(0) - lg["b"]), 4 * sd / math.sqrt(n))
        # Var of a sample covariance entry: (C_ii C_jj + C_ij^2) / n.
        cov_se = np.sqrt((np.outer(sd**2, sd**2) + cov**2) / n)
        np.testing.assert_array_less(np.abs(np.cov(xs.T) - cov), 4 * cov_se + 1e-12)


# --------------------------------------------------------------------------- test NLL


TRACES = []


class CountingVAE(models.VAE):
    """The VAE, counting how often its encoder is traced (Python runs only while tracing)."""

    def posterior(self, x):
        TRACES.append(x.shape)
        return super().posterior(x)


def test_evaluate_nll_is_exact_for_the_true_posterior_and_compiles_once(x64):
    model = CountingVAE(input_shape=(D,), hidden=(), latent_size=Z, likelihood="gaussian",
                        activation="linear")
    lg = linear_gaussian(seed=18, batch=250)
    params = linear_params(lg)
    TRACES.clear()
    # 250 = 100 + 100 + 50: the last batch is padded, and must not count.
    nll = vae.evaluate_nll(model, params, lg["x"], jax.random.PRNGKey(19), num_samples=20,
                           batch_size=100, chunk_size=8)
    np.testing.assert_allclose(nll, -lg["log_px"].mean(), rtol=1e-12)
    assert len(TRACES) == 1
    more = linear_gaussian(seed=20, batch=400)
    nll = vae.evaluate_nll(model, params, more["x"], jax.random.PRNGKey(21), num_samples=20,
                           batch_size=100, chunk_size=8)
    np.testing.assert_allclose(nll, -more["log_px"].mean(), rtol=1e-12)
    assert len(TRACES) == 1  # four more batches, no new trace


def test_evaluate_nll_approaches_the_exact_nll_with_a_wrong_encoder(x64):
    lg = linear_gaussian(seed=22, batch=120)
    params = linear_params(lg, **WRONG)
    exact = -lg["log_px"].mean()
    x, rng = lg["x"], jax.random.PRNGKey(23)
    nll_1 = vae.evaluate_nll(LINEAR_MODEL, params, x, rng, num_samples=1, batch_size=50,
                             chunk_size=1)
    nll_k = vae.evaluate_nll(LINEAR_MODEL, params, x, rng, num_samples=2000, batch_size=50,
                             chunk_size=500)
    assert nll_1 - exact > 1.0
    assert -0.02 < nll_k - exact < 0.05 * (nll_1 - exact)
    # The default chunking (vae.eval_chunk_size) changes the sums' order, not the estimate.
    nll_default = vae.evaluate_nll(LINEAR_MODEL, params, x, rng, num_samples=2000, batch_size=50)
    np.testing.assert_allclose(nll_default, nll_k, rtol=1e-12)


def test_nll_per_example_are_the_bounds_of_each_image_and_average_to_evaluate_nll(x64):
    lg = linear_gaussian(seed=24, batch=70)
    params = linear_params(lg, **WRONG)
    x, rng = lg["x"], jax.random.PRNGKey(25)
    per = vae.nll_per_example(LINEAR_MODEL, params, x, rng, num_samples=50, batch_size=30)
    assert per.shape == (70,) and per.dtype == np.float64  # 30 + 30 + 10: the pad rows dropped
    np.testing.assert_allclose(per.mean(), vae.evaluate_nll(LINEAR_MODEL, params, x, rng,
                                                            num_samples=50, batch_size=30),
                               rtol=1e-12)
    # Image j of batch i is bounded with fold_in(rng, i), as vae.iwae would bound it alone.
    first = vae.iwae(LINEAR_MODEL, params, jnp.asarray(x[:30]), jax.random.fold_in(rng, 0),
                     num_samples=50, chunk_size=vae.eval_chunk_size(50, 30))
    np.testing.assert_allclose(per[:30], -np.asarray(first), rtol=1e-10)


def test_eval_chunk_size_keeps_a_chunk_near_2048_decoder_rows_on_a_cpu():
    assert jax.default_backend() == "cpu"
    assert vae.eval_chunk_size(5000, 100) == 20
    assert vae.eval_chunk_size(5000, 5000) == 1  # never below one sample
    assert vae.eval_chunk_size(8, 10) == 8  # never above num_samples


# --------------------------------------------------------------------------- validation


def test_invalid_inputs_raise_clear_errors(bernoulli_vae):
    model, params, x = bernoulli_vae
    rng = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="num_samples"):
        vae.elbo(model, params, x, rng, num_samples=0)
    with pytest.raises(ValueError, match="num_samples"):
        vae.iwae(model, params, x, rng, num_samples=2.5)
    with pytest.raises(ValueError, match="num_samples"):
        vae.log_weights(model, params, x, rng, 0)
    with pytest.raises(ValueError, match="chunk_size"):
        vae.iwae(model, params, x, rng, num_samples=4, chunk_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        vae.evaluate_nll(model, params, x, rng, batch_size=0)
    with pytest.raises(ValueError, match="floating"):
        vae.iwae(model, params, x.astype(jnp.int32), rng, num_samples=4)
    with pytest.raises(ValueError, match="floating"):
        vae.evaluate_nll(model, params, np.zeros((4, 6), np.uint8), rng)
    with pytest.raises(ValueError, match=r"shape \(B, 6\)"):
        vae.elbo(model, params, x[:, :5], rng)
    with pytest.raises(ValueError, match="the batch is empty"):
        vae.evaluate_nll(model, params, x[:0], rng)
    with pytest.raises(ValueError, match="model must be stochastic"):
        vae.sample_prior(models.MLPAutoencoder(input_shape=(6,)), params, rng, 3)
    with pytest.raises(ValueError, match="num"):
        vae.sample_prior(model, params, rng, 0)
