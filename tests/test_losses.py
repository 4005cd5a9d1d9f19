"""Tests of aejax.losses: every loss against NumPy under jit, gradients against finite differences."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy import special, stats

from aejax import losses


@pytest.fixture(autouse=True)
def x64():
    """Every test computes in float64 unless it asks for float32; the flag is restored afterwards."""
    with jax.enable_x64(True):
        yield


def key(seed):
    """A typed key of the "rbg" PRNG. The functions under test only pass keys to jax.random, so the
    implementation does not matter to them, and threefry programs take seconds each to compile on
    the shared CPU runners. One test uses the default raw keys."""
    return jax.random.key(seed, impl="rbg")


def rand(seed, shape, low=-1.0, high=1.0):
    return np.random.default_rng(seed).uniform(low, high, size=shape)


def np_softplus(x):
    return np.logaddexp(0.0, x)


# --------------------------------------------------------------------------- reconstruction


@pytest.mark.parametrize("shape", [(4, 6), (3, 2, 5)])
def test_squared_error_and_mse_match_numpy(shape):
    p, t = rand(0, shape), rand(1, shape)
    expected_se = ((p - t) ** 2).reshape(shape[0], -1).sum(axis=1)
    expected_mse = ((p - t) ** 2).reshape(shape[0], -1).mean(axis=1)
    se = jax.jit(losses.squared_error)(jnp.asarray(p), jnp.asarray(t))
    m = jax.jit(losses.mse)(jnp.asarray(p), jnp.asarray(t))
    assert se.shape == m.shape == (shape[0],)
    np.testing.assert_allclose(se, expected_se, rtol=1e-12)
    np.testing.assert_allclose(m, expected_mse, rtol=1e-12)


def test_bce_with_logits_matches_numpy():
    logits, targets = rand(2, (5, 7), -6, 6), rand(3, (5, 7), 0, 1)
    p = 1.0 / (1.0 + np.exp(-logits))
    expected = -(targets * np.log(p) + (1 - targets) * np.log1p(-p)).sum(axis=1)
    got = jax.jit(losses.bce_with_logits)(jnp.asarray(logits), jnp.asarray(targets))
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_allclose(jax.jit(losses.bernoulli_log_prob)(jnp.asarray(logits),
                                                                   jnp.asarray(targets)),
                               -expected, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bce_with_logits_extreme_logits_finite_and_exact(dtype):
    logits = np.array([[100.0, -100.0, 1e4, -1e4, 0.0, 30.0, -30.0]] * 3)
    targets = np.array([[0.0] * 7, [1.0] * 7, [0.3] * 7])
    # Stable float64 reference, per pixel, free of cancellation: t softplus(-l) + (1 - t) softplus(l).
    ref_pixels = targets * np_softplus(-logits) + (1 - targets) * np_softplus(logits)
    bce = jax.jit(losses.bce_with_logits)
    got_pixels = bce(jnp.asarray(logits.reshape(-1, 1), dtype),
                     jnp.asarray(targets.reshape(-1, 1), dtype)).reshape(logits.shape)
    assert got_pixels.dtype == dtype
    assert np.all(np.isfinite(got_pixels))
    rtol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(got_pixels, ref_pixels, rtol=rtol, atol=1e-30)
    got = bce(jnp.asarray(logits, dtype), jnp.asarray(targets, dtype))
    np.testing.assert_allclose(got, ref_pixels.sum(axis=1), rtol=rtol)


def test_bce_with_logits_gradient_is_sigmoid_minus_target_everywhere():
    # Including the kink points of the stable formula (logit exactly 0) and huge logits.
    logits = np.array([[0.0, 100.0, -100.0, 1e4, -1e4, 2.5, -0.7]])
    targets = np.full_like(logits, 0.3)
    grad = jax.jit(jax.grad(lambda l, t: losses.bce_with_logits(l, t).sum()))(
        jnp.asarray(logits), jnp.asarray(targets))
    expected = special.expit(logits) - targets
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, expected, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("log_scale_kind", ["scalar", "per_pixel"])
def test_gaussian_nll_matches_scipy(log_scale_kind):
    mean, targets = rand(4, (3, 2, 4)), rand(5, (3, 2, 4))
    log_scale = -0.4 if log_scale_kind == "scalar" else rand(6, (4,), -1, 1)
    expected = -stats.norm.logpdf(targets, mean, np.exp(log_scale)).reshape(3, -1).sum(axis=1)
    fn = jax.jit(lambda m, t, s: losses.gaussian_nll(m, t, log_scale=s))
    got = fn(jnp.asarray(mean), jnp.asarray(targets), jnp.asarray(log_scale))
    np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.mark.parametrize("fn", [losses.mse, losses.squared_error, losses.bce_with_logits,
                                losses.gaussian_nll])
def test_pair_losses_reject_shape_mismatch(fn):
    with pytest.raises(ValueError, match=rf"{fn.__name__}: predictions have shape \(2, 3\) but "
                                         r"targets have shape \(2, 4\); they must be equal"):
        fn(jnp.zeros((2, 3)), jnp.zeros((2, 4)))


@pytest.mark.parametrize("fn", [losses.mse, losses.squared_error, losses.bce_with_logits,
                                losses.gaussian_nll])
def test_pair_losses_reject_integer_dtype(fn):
    with pytest.raises(TypeError, match=rf"{fn.__name__}: targets have dtype (int32|int64|uint8); "
                                        "a floating dtype is needed"):
        fn(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.uint8))
    with pytest.raises(TypeError, match="predictions have dtype int32; a floating dtype is needed"):
        fn(jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3)))


def test_pair_losses_reject_scalar():
    with pytest.raises(ValueError, match="expected a batch"):
        losses.mse(jnp.zeros(()), jnp.zeros(()))


def test_losses_keep_float32_under_x64():
    a, b = jnp.asarray(rand(7, (2, 3)), jnp.float32), jnp.asarray(rand(8, (2, 3), 0, 1), jnp.float32)

    @jax.jit
    def outs(a, b):
        return {
            "mse": losses.mse(a, b),
            "bce": losses.bce_with_logits(a, b),
            "nll": losses.gaussian_nll(a, b, log_scale=0.3),
            "kl": losses.gaussian_kl(a, b),
            "logp": losses.gaussian_log_prob(a, b, b),
            "iwae": losses.iwae_bound(a),
            "kl_sparsity": losses.kl_sparsity(b, rho=0.2),
        }

    assert {k: v.dtype for k, v in outs(a, b).items()} == {k: jnp.float32 for k in outs(a, b)}


# --------------------------------------------------------------------------- sparsity


def test_l1_activity_matches_numpy():
    a = rand(9, (4, 3, 2))
    np.testing.assert_allclose(jax.jit(losses.l1_activity)(jnp.asarray(a)),
                               np.abs(a).reshape(4, -1).sum(axis=1), rtol=1e-12)
    with pytest.raises(ValueError, match="got a scalar"):
        losses.l1_activity(jnp.zeros(()))


def np_kl_sparsity(a, rho, weights=None):
    w = np.ones(len(a)) if weights is None else weights
    rho_hat = (a * w[:, None]).sum(axis=0) / w.sum()
    return np.sum(rho * np.log(rho / rho_hat) + (1 - rho) * np.log((1 - rho) / (1 - rho_hat)))


def test_kl_sparsity_matches_numpy_without_mask():
    a = rand(10, (6, 5), 0.01, 0.6)
    got = jax.jit(lambda a: losses.kl_sparsity(a, rho=0.1))(jnp.asarray(a))
    assert got.shape == ()
    np.testing.assert_allclose(got, np_kl_sparsity(a, 0.1), rtol=1e-12)
    # Zero exactly when every unit's mean activation is rho.
    np.testing.assert_allclose(losses.kl_sparsity(jnp.full((3, 4), 0.1), rho=0.1), 0.0, atol=1e-15)


def test_kl_sparsity_mask_ignores_padded_rows():
    real = rand(11, (5, 4), 0.05, 0.9)
    padded = np.concatenate([real, np.full((3, 4), 0.99)])
    mask = np.array([1.0] * 5 + [0.0] * 3)
    fn = jax.jit(lambda a, m: losses.kl_sparsity(a, rho=0.2, mask=m))
    got = fn(jnp.asarray(padded), jnp.asarray(mask))
    np.testing.assert_allclose(got, np_kl_sparsity(real, 0.2), rtol=1e-12)
    np.testing.assert_allclose(got, np_kl_sparsity(padded, 0.2, mask), rtol=1e-12)
    # Without the mask the padding does count, so the mask is what made the difference.
    assert abs(float(losses.kl_sparsity(jnp.asarray(padded), rho=0.2)) - float(got)) > 1e-2


def test_kl_sparsity_rejects_rho_outside_unit_interval():
    for rho in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"rho must lie in \(0, 1\)"):
            losses.kl_sparsity(jnp.full((2, 2), 0.5), rho=rho)


# --------------------------------------------------------------------------- VAE


def test_gaussian_kl_matches_numerical_integration():
    mean, logvar = rand(12, (2, 3), -1.5, 1.5), rand(13, (2, 3), -1.5, 1.0)
    grid = np.linspace(-15, 15, 60001)
    q = stats.norm.pdf(grid[:, None, None], mean, np.exp(0.5 * logvar))
    log_ratio = (stats.norm.logpdf(grid[:, None, None], mean, np.exp(0.5 * logvar))
                 - stats.norm.logpdf(grid[:, None, None]))
    expected = np.trapezoid(q * log_ratio, grid, axis=0).sum(axis=1)
    got = jax.jit(losses.gaussian_kl)(jnp.asarray(mean), jnp.asarray(logvar))
    np.testing.assert_allclose(got, expected, rtol=1e-7)
    with pytest.raises(ValueError, match=r"mean \(2, 3\) and logvar \(2, 4\) must match"):
        losses.gaussian_kl(jnp.zeros((2, 3)), jnp.zeros((2, 4)))


def test_gaussian_log_prob_matches_scipy_with_broadcasting():
    z, mean, logvar = rand(14, (4, 3, 5), -2, 2), rand(15, (3, 5)), rand(16, (3, 5))
    expected = stats.norm.logpdf(z, mean, np.exp(0.5 * logvar)).sum(axis=-1)
    got = jax.jit(losses.gaussian_log_prob)(jnp.asarray(z), jnp.asarray(mean), jnp.asarray(logvar))
    assert got.shape == (4, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # Defaults: the standard normal prior.
    np.testing.assert_allclose(jax.jit(losses.gaussian_log_prob)(jnp.asarray(z)),
                               stats.norm.logpdf(z).sum(axis=-1), rtol=1e-12)


@pytest.mark.parametrize("axis", [0, 1])
def test_iwae_bound_matches_numpy_and_is_stable(axis):
    lw = rand(17, (5, 4), -3, 3) - 1000.0  # exp(lw) underflows: only a stable logsumexp works
    shift = lw.max(axis=axis, keepdims=True)
    expected = (np.log(np.mean(np.exp(lw - shift), axis=axis, keepdims=True)) + shift).squeeze(axis)
    got = jax.jit(lambda w: losses.iwae_bound(w, axis=axis))(jnp.asarray(lw))
    np.testing.assert_allclose(got, expected, rtol=1e-13)
    # One sample: the bound is the ELBO itself; identical samples: the bound equals each of them.
    np.testing.assert_allclose(losses.iwae_bound(jnp.asarray(lw[:1])), lw[0], rtol=1e-15)
    np.testing.assert_allclose(losses.iwae_bound(jnp.full((7, 2), -3.5)), [-3.5, -3.5], rtol=1e-14)


# --------------------------------------------------------------------------- gradients


def test_gradients_of_bce_mse_gaussian_kl_kl_sparsity():
    logits, targets = jnp.asarray(rand(18, (3, 4), -3, 3)), jnp.asarray(rand(19, (3, 4), 0, 1))
    # Order 2: the custom JVP of the BCE must itself be differentiable (Hessians, CAE+H).
    check_grads(jax.jit(losses.bce_with_logits), (logits, targets), order=2, modes=("fwd", "rev"))
    check_grads(jax.jit(losses.mse), (logits, targets), order=1, modes=("fwd", "rev"))
    check_grads(jax.jit(losses.gaussian_kl), (logits[:, :3], targets[:, :3]), order=1,
                modes=("fwd", "rev"))
    acts = jnp.asarray(rand(20, (5, 3), 0.1, 0.9))
    mask = jnp.asarray([1.0, 1.0, 0.0, 1.0, 0.0])
    check_grads(jax.jit(lambda a: losses.kl_sparsity(a, rho=0.1)), (acts,), order=1,
                modes=("fwd", "rev"))
    check_grads(jax.jit(lambda a: losses.kl_sparsity(a, rho=0.3, mask=mask)), (acts,), order=1,
                modes=("fwd", "rev"))


# --------------------------------------------------------------------------- contractive

D, K, H, B = 12, 7, 5, 8


def mlp_params(seed=0):
    r = np.random.default_rng(seed)
    return {"w1": r.normal(size=(D, K)) / math.sqrt(D), "b1": 0.3 * r.normal(size=K),
            "w2": r.normal(size=(K, H)) / math.sqrt(K), "b2": 0.3 * r.normal(size=H)}


ACTS = {"relu": jax.nn.relu, "tanh": jnp.tanh}


def mlp_encoder(act="tanh", params=None):
    p = jax.tree.map(jnp.asarray, mlp_params() if params is None else params)
    head = lambda pre: jnp.tanh(ACTS[act](pre) @ p["w2"] + p["b2"])
    return (lambda x: head(x @ p["w1"] + p["b1"])), head, p


class TinyConv(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Conv(3, (3, 3), strides=(2, 2), padding="SAME")(x))  # (B, 3, 3, 3)
        return h.reshape(h.shape[0], -1)


def conv_encoder():
    module = TinyConv()
    r = np.random.default_rng(1)
    params = {"Conv_0": {"kernel": jnp.asarray(r.normal(size=(3, 3, 1, 3)) / 2),
                         "bias": jnp.asarray(0.2 * r.normal(size=3))}}
    return lambda x: module.apply({"params": params}, x)


def fd_jacobians(encode_fn, x, eps=1e-5):
    """Central finite-difference Jacobians ``(B, H, D)`` in float64 (one batched call per side)."""
    x = np.asarray(x, np.float64)
    b, d = x.shape[0], x[0].size
    basis = eps * np.eye(d).reshape((d, 1) + x.shape[1:])
    stack = lambda s: jnp.asarray((x[None] + s * basis).reshape((d * b,) + x.shape[1:]))
    fp = np.asarray(encode_fn(stack(1.0))).reshape(d, b, -1)
    fm = np.asarray(encode_fn(stack(-1.0))).reshape(d, b, -1)
    return ((fp - fm) / (2 * eps)).transpose(1, 2, 0)


def encoders():
    mlp_relu = mlp_encoder("relu")[0]
    mlp_tanh = mlp_encoder("tanh")[0]
    x_mlp = rand(21, (B, D))
    x_conv = rand(22, (B, 6, 6, 1), 0, 1)
    return {"mlp_relu": (mlp_relu, x_mlp), "mlp_tanh": (mlp_tanh, x_mlp),
            "conv": (conv_encoder(), x_conv)}


@pytest.mark.parametrize("name", ["mlp_relu", "mlp_tanh", "conv"])
def test_contractive_exact_modes_match_finite_differences(name):
    encode_fn, x = encoders()[name]
    x = jnp.asarray(x)
    expected = (fd_jacobians(encode_fn, x) ** 2).sum(axis=(1, 2))
    assert np.all(expected > 1e-3)
    results = {}
    for mode in ("fwd", "rev", "auto"):
        results[mode] = jax.jit(lambda x, mode=mode: losses.contractive(encode_fn, x, mode=mode))(x)
        assert results[mode].shape == (B,)
        np.testing.assert_allclose(results[mode], expected, rtol=1e-4, err_msg=mode)
    np.testing.assert_allclose(results["fwd"], results["rev"], rtol=1e-12)
    np.testing.assert_allclose(results["auto"], results["rev"], rtol=1e-12)


def test_contractive_docstring_value_and_linear_closed_form():
    w = jnp.asarray(rand(23, (D, H)))
    x = jnp.asarray(rand(24, (3, D)))
    expected = np.full(3, np.sum(np.asarray(w) ** 2))
    for mode in ("fwd", "rev", "auto"):
        np.testing.assert_allclose(losses.contractive(lambda x: x @ w, x, mode=mode), expected,
                                   rtol=1e-12)
    w2 = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    assert float(losses.contractive(lambda x: x @ w2, jnp.ones((1, 2)))[0]) == 30.0


@pytest.mark.parametrize("mode", ["fwd", "rev"])
@pytest.mark.parametrize("name", ["mlp_tanh", "conv"])
def test_contractive_chunked_equals_unchunked(name, mode):
    encode_fn, x = encoders()[name]
    x = jnp.asarray(x)
    full = losses.contractive(encode_fn, x, mode=mode)
    chunked = jax.jit(lambda x: losses.contractive(encode_fn, x, mode=mode, chunk_size=3))(x)
    np.testing.assert_allclose(chunked, full, rtol=1e-12)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        losses.contractive(encode_fn, x, mode=mode, chunk_size=0)


@pytest.mark.parametrize("name", ["mlp_tanh", "conv"])
def test_contractive_rev_in_groups_of_code_units_equals_one_group(name):
    """The rows formed a group of code units at a time: the same penalty and gradient."""
    encode_fn, x = encoders()[name]
    x = jnp.asarray(x)
    num_out = encode_fn(x).shape[1]
    one = losses.contractive(encode_fn, x, mode="rev", unit_groups=1)
    grad_in = lambda groups: jax.grad(
        lambda x: losses.contractive(encode_fn, x, mode="rev", unit_groups=groups).sum())(x)
    for groups in (2, num_out, None):
        got = jax.jit(lambda x: losses.contractive(encode_fn, x, mode="rev", unit_groups=groups,
                                                   chunk_size=3))(x)
        np.testing.assert_allclose(got, one, rtol=1e-12, err_msg=str(groups))
    np.testing.assert_allclose(grad_in(2), grad_in(1), rtol=1e-10, atol=1e-12)
    for bad in (num_out + 1, 0, 1.5):
        with pytest.raises(ValueError, match=f"unit_groups must be an integer between 1 and the "
                                             f"code size {num_out}, got {bad}"):
            losses.contractive(encode_fn, x, mode="rev", unit_groups=bad)


def test_unit_slices_split_the_rows_by_size_on_a_cpu_and_not_elsewhere(monkeypatch):
    def covers(slices, n):
        return [i for s in slices for i in range(s.start, s.stop)] == list(range(n))

    rows = 32 * 256 * 784 * 4  # a 784-128-32 encoder's rows at batch 256, float32: 25.7 MB
    cpu = losses.unit_slices(32, rows)
    assert len(cpu) == math.ceil(rows / losses.CPU_ROWS_BYTES) == 7 and covers(cpu, 32)
    assert {s.stop - s.start for s in cpu} == {4, 5}
    assert len(losses.unit_slices(128, 100 * rows)) == losses.MAX_UNIT_GROUPS
    assert losses.unit_slices(3, 100 * rows) == [slice(0, 1), slice(1, 2), slice(2, 3)]
    assert losses.unit_slices(32, 1000) == [slice(0, 32)]
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert losses.unit_slices(32, rows) == [slice(0, 32)]
    assert covers(losses.unit_slices(32, rows, groups=5), 32)


def estimate_samples(encode_fn, x, num, num_probes=1, chunk_size=None):
    keys = jax.random.split(key(123), num)
    fn = lambda k: losses.contractive(encode_fn, x, mode="estimate", rng=k, num_probes=num_probes,
                                      chunk_size=chunk_size)
    return np.asarray(jax.jit(jax.vmap(fn))(keys))  # (num, B)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_contractive_estimate_is_unbiased_per_example(chunk_size):
    encode_fn, x = encoders()["mlp_tanh"]
    x = jnp.asarray(x)
    jac = fd_jacobians(encode_fn, x)
    exact = (jac ** 2).sum(axis=(1, 2))
    n = 4000
    samples = estimate_samples(encode_fn, x, n, chunk_size=chunk_size)
    assert samples.shape == (n, B)
    sem = samples.std(axis=0, ddof=1) / math.sqrt(n)
    assert np.all(np.abs(samples.mean(axis=0) - exact) < 3.5 * sem), (samples.mean(0), exact, sem)
    # Gaussian probes: Var ||J v||^2 = 2 ||J J^T||_F^2, per example and per draw.
    jjt = np.einsum("bhd,bkd->bhk", jac, jac)
    var_exact = 2 * (jjt ** 2).sum(axis=(1, 2))
    np.testing.assert_allclose(samples.var(axis=0), var_exact, rtol=0.25)


def test_contractive_estimate_averages_independent_probes():
    encode_fn, x = encoders()["mlp_tanh"]
    x = jnp.asarray(x)
    jac = fd_jacobians(encode_fn, x)
    exact = (jac ** 2).sum(axis=(1, 2))
    var_one = 2 * (np.einsum("bhd,bkd->bhk", jac, jac) ** 2).sum(axis=(1, 2))
    n = 2000
    samples = estimate_samples(encode_fn, x, n, num_probes=4)
    sem = samples.std(axis=0, ddof=1) / math.sqrt(n)
    assert np.all(np.abs(samples.mean(axis=0) - exact) < 3.5 * sem)
    np.testing.assert_allclose(samples.var(axis=0), var_one / 4, rtol=0.25)


def test_contractive_estimate_is_deterministic_per_key_and_random_across_keys():
    encode_fn, x = encoders()["mlp_tanh"]
    x = jnp.asarray(x)
    # Raw uint32 keys, as jax.random.PRNGKey makes them, work as well as typed ones.
    fn = jax.jit(lambda k: losses.contractive(encode_fn, x, mode="estimate", rng=k))
    a, b, c = (fn(jax.random.PRNGKey(s)) for s in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert np.all(np.asarray(a) != np.asarray(c))


def test_contractive_errors():
    encode_fn, x = encoders()["mlp_tanh"]
    x = jnp.asarray(x)
    with pytest.raises(ValueError, match=r"unknown mode 'jacobian'; choose one of \('fwd', 'rev'"):
        losses.contractive(encode_fn, x, mode="jacobian")
    with pytest.raises(ValueError, match="mode='estimate' needs rng"):
        losses.contractive(encode_fn, x, mode="estimate")
    with pytest.raises(ValueError, match="num_probes must be >= 1, got 0"):
        losses.contractive(encode_fn, x, mode="estimate", rng=key(0), num_probes=0)
    with pytest.raises(ValueError, match=r"codes \(B, H\); for input of shape \(8, 12\) it returned "
                                         r"\(8, 5, 1\)"):
        losses.contractive(lambda x: encode_fn(x)[..., None], x)
    with pytest.raises(ValueError, match=r"codes \(B, H\); for input of shape \(8, 12\) it returned "
                                         r"\(7, 5\)"):
        losses.contractive(lambda x: encode_fn(x)[1:], x)
    with pytest.raises(ValueError, match=r"codes \(B, H\).*returned \(8,\)"):
        losses.contractive(lambda x: encode_fn(x).sum(axis=1), x)
    with pytest.raises(ValueError, match=r"x must be a batch of shape \(B, \.\.\.\)"):
        losses.contractive(lambda x: x[None], x[0])
    with pytest.raises(TypeError, match="x has dtype int32; the Jacobian needs a floating input"):
        losses.contractive(lambda x: x, jnp.zeros((2, 3), jnp.int32))


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_contractive_dense_input_equals_full_encoder(act):
    encode_fn, head, p = mlp_encoder(act)
    x = jnp.asarray(rand(25, (B, D)))
    pre = x @ p["w1"] + p["b1"]
    full = losses.contractive(encode_fn, x, mode="rev")
    np.testing.assert_allclose(full, (fd_jacobians(encode_fn, x) ** 2).sum(axis=(1, 2)), rtol=1e-4)
    for mode in ("fwd", "rev", "auto"):
        got = jax.jit(lambda pre, w, mode=mode: losses.contractive_dense_input(head, w, pre,
                                                                             mode=mode))(pre, p["w1"])
        np.testing.assert_allclose(got, full, rtol=1e-12, err_msg=mode)
    chunked = losses.contractive_dense_input(head, p["w1"], pre, mode="auto", chunk_size=3)
    np.testing.assert_allclose(chunked, full, rtol=1e-12)


def test_contractive_dense_input_wide_code_auto_uses_fwd_correctly():
    # H > K: "auto" picks the forward path; it must still equal the full Jacobian.
    r = np.random.default_rng(26)
    w1, w2 = jnp.asarray(r.normal(size=(D, 3))), jnp.asarray(r.normal(size=(3, 9)))
    head = lambda pre: jax.nn.sigmoid(jnp.tanh(pre) @ w2)
    x = jnp.asarray(rand(27, (4, D)))
    full = losses.contractive(lambda x: head(x @ w1), x, mode="fwd")
    for mode in ("auto", "fwd", "rev"):
        np.testing.assert_allclose(losses.contractive_dense_input(head, w1, x @ w1, mode=mode), full,
                                   rtol=1e-12, err_msg=mode)


def test_contractive_dense_input_errors():
    head = lambda p: jnp.tanh(p)
    with pytest.raises(ValueError, match="unknown mode 'estimate'"):
        losses.contractive_dense_input(head, jnp.zeros((4, 3)), jnp.zeros((2, 3)), mode="estimate")
    with pytest.raises(ValueError, match=r"kernel must be \(D, K\) and pre \(B, K\); got \(4, 3\) "
                                         r"and \(2, 5\)"):
        losses.contractive_dense_input(head, jnp.zeros((4, 3)), jnp.zeros((2, 5)))


def test_contractive_sigmoid_equals_exact_modes():
    r = np.random.default_rng(28)
    w, b = jnp.asarray(r.normal(size=(D, H))), jnp.asarray(r.normal(size=H))
    x = jnp.asarray(rand(29, (B, D), 0, 1))
    encode_fn = lambda x: jax.nn.sigmoid(x @ w + b)
    closed = jax.jit(losses.contractive_sigmoid)(encode_fn(x), w)
    np.testing.assert_allclose(closed, (fd_jacobians(encode_fn, x) ** 2).sum(axis=(1, 2)), rtol=1e-4)
    for mode in ("fwd", "rev", "auto"):
        np.testing.assert_allclose(closed, losses.contractive(encode_fn, x, mode=mode), rtol=1e-12)
    with pytest.raises(ValueError, match=r"code must be \(B, H\) and kernel \(D, H\)"):
        losses.contractive_sigmoid(jnp.zeros((2, 5)), jnp.zeros((12, 4)))


@pytest.mark.parametrize("act", ["relu", "tanh", "sigmoid"])
def test_contractive_one_hidden_equals_full_encoder(act):
    r = np.random.default_rng(38)
    w1, b1 = jnp.asarray(r.normal(size=(D, K)) / 2), jnp.asarray(r.normal(size=K))
    w2, b2 = jnp.asarray(r.normal(size=(K, H))), jnp.asarray(r.normal(size=H))
    act_fn = {"relu": jax.nn.relu, "tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid}[act]
    encode_fn = lambda x: act_fn(x @ w1 + b1) @ w2 + b2
    x = jnp.asarray(rand(39, (B, D)))
    got = jax.jit(lambda x: losses.contractive_one_hidden(act_fn, x @ w1 + b1, w1, w2))(x)
    np.testing.assert_allclose(got, (fd_jacobians(encode_fn, x) ** 2).sum(axis=(1, 2)), rtol=1e-4)
    np.testing.assert_allclose(got, losses.contractive(encode_fn, x, mode="fwd"), rtol=1e-12)
    with pytest.raises(ValueError, match=r"need pre \(B, K\), kernel_in \(D, K\), kernel_out "
                                         r"\(K, H\); got \(8, 7\), \(12, 7\), \(5, 5\)"):
        losses.contractive_one_hidden(act_fn, jnp.zeros((B, K)), w1, jnp.zeros((5, 5)))


@pytest.mark.parametrize("mode", ["fwd", "rev", "estimate"])
def test_contractive_gradient_wrt_parameters(mode):
    params = jax.tree.map(jnp.asarray, mlp_params(30))
    x = jnp.asarray(rand(31, (3, D)))
    rng = key(4)

    def penalty(params):
        encode_fn = mlp_encoder("tanh", params)[0]
        return losses.contractive(encode_fn, x, mode=mode, rng=rng, num_probes=2).sum()

    check_grads(jax.jit(penalty), (params,), order=1, modes=("fwd", "rev"))


def test_contractive_dense_input_gradient_wrt_parameters():
    params = jax.tree.map(jnp.asarray, mlp_params(32))
    x = jnp.asarray(rand(33, (3, D)))

    def penalty(params):
        _, head, p = mlp_encoder("tanh", params)
        return losses.contractive_dense_input(head, p["w1"], x @ p["w1"] + p["b1"]).sum()

    check_grads(jax.jit(penalty), (params,), order=1, modes=("fwd", "rev"))


def test_contractive_higher_order_zero_for_linear_encoder():
    w, b = jnp.asarray(rand(34, (D, H))), jnp.asarray(rand(35, (H,)))
    x = jnp.asarray(rand(36, (4, D)))
    for mode in ("fwd", "rev"):
        got = losses.contractive_higher_order(lambda x: x @ w + b, x, key(0),
                                              sigma=0.5, mode=mode)
        np.testing.assert_allclose(got, 0.0, atol=1e-24)


@pytest.mark.parametrize("num_corrupted", [1, 3])
@pytest.mark.parametrize("mode", ["fwd", "rev"])
def test_contractive_higher_order_matches_finite_differences(mode, num_corrupted):
    encode_fn = mlp_encoder("tanh")[0]
    x = jnp.asarray(rand(37, (4, D)))
    rng, sigma = key(7), 0.3
    got = jax.jit(lambda x: losses.contractive_higher_order(
        encode_fn, x, rng, sigma=sigma, num_corrupted=num_corrupted, mode=mode))(x)
    noise = np.asarray(sigma * jax.random.normal(rng, (num_corrupted,) + x.shape, x.dtype))
    j0 = fd_jacobians(encode_fn, x)
    expected = np.mean([((fd_jacobians(encode_fn, np.asarray(x) + e) - j0) ** 2).sum(axis=(1, 2))
                        for e in noise], axis=0)
    assert np.all(expected > 1e-4)
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_contractive_higher_order_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode must be 'fwd' or 'rev', got 'auto'"):
        losses.contractive_higher_order(jnp.tanh, jnp.zeros((2, 3)), key(0),
                                        mode="auto")


def test_bce_rejects_concrete_targets_outside_unit_interval():
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 1\].*1/255"):
        losses.bce_with_logits(jnp.zeros((2, 3)), jnp.full((2, 3), 255.0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        losses.bce_with_logits(jnp.zeros((1, 2)), jnp.array([[0.5, jnp.nan]]))
