"""Tests of aejax.jacobians: estimators against exact values and closed-form variances, the
Hessian term against float64 finite differences, diagnostics against NumPy."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from conftest import rbg_key as key

from aejax import jacobians, losses
from aejax.jacobians import ESTIMATORS


pytestmark = pytest.mark.usefixtures("x64")  # every test computes in float64


def rand(seed, shape, low=-1.0, high=1.0):
    return np.random.default_rng(seed).uniform(low, high, size=shape)


D, K, H, B = 12, 7, 5, 8


def mlp_params(seed=0):
    r = np.random.default_rng(seed)
    return {"w1": jnp.asarray(r.normal(size=(D, K)) / math.sqrt(D)),
            "b1": jnp.asarray(0.3 * r.normal(size=K)),
            "w2": jnp.asarray(r.normal(size=(K, H)) / math.sqrt(K)),
            "b2": jnp.asarray(0.3 * r.normal(size=H))}


def mlp_apply(p, x):
    return jnp.tanh(jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"])


def mlp_encoder(seed=0):
    return functools.partial(mlp_apply, mlp_params(seed))


def fd_jacobians(encode_fn, x, eps=1e-5):
    """Central finite-difference Jacobians ``(B, H, D)`` in float64."""
    x = np.asarray(x, np.float64)
    b, d = x.shape
    basis = eps * np.eye(d)[:, None, :]
    fp = np.asarray(encode_fn(jnp.asarray((x[None] + basis).reshape(d * b, d)))).reshape(d, b, -1)
    fm = np.asarray(encode_fn(jnp.asarray((x[None] - basis).reshape(d * b, d)))).reshape(d, b, -1)
    return ((fp - fm) / (2 * eps)).transpose(1, 2, 0)


def samples(encode_fn, x, num, num_probes, estimators=ESTIMATORS, seed=123):
    """``num`` independent estimates ``(num, B)`` of each estimator, one key each; one compile."""
    fn = lambda k: {e: jacobians.contractive_estimate(encode_fn, x, k, estimator=e,
                                                      num_probes=num_probes) for e in estimators}
    return jax.tree.map(np.asarray, jax.jit(jax.vmap(fn))(jax.random.split(key(seed), num)))


def decaying_encoder(rate=0.5, d=16, h=12, seed=3):
    """``tanh(x W)`` with the singular values of ``W`` falling geometrically: ``rate**i``."""
    r = np.random.default_rng(seed)
    u, _ = np.linalg.qr(r.normal(size=(d, h)))
    v, _ = np.linalg.qr(r.normal(size=(h, h)))
    w = jnp.asarray(u @ np.diag(rate ** np.arange(h)) @ v.T)
    return (lambda x: jnp.tanh(x @ w)), jnp.asarray(rand(4, (3, d), -0.5, 0.5))


def assert_unbiased(s, exact):
    sem = s.std(axis=0, ddof=1) / math.sqrt(len(s))
    assert np.all(np.abs(s.mean(axis=0) - exact) < 4 * sem + 1e-12 * exact), (s.mean(0), exact, sem)


# --------------------------------------------------------------------------- estimators


def test_gaussian_hutchinson_is_the_contractive_estimate_draw_for_draw():
    encode_fn, x, rng = mlp_encoder(), jnp.asarray(rand(1, (B, D))), key(5)
    got, old = jax.jit(lambda x: (
        jacobians.hutchinson(encode_fn, x, rng, num_probes=3),
        losses.contractive(encode_fn, x, mode="estimate", rng=rng, num_probes=3)))(x)
    np.testing.assert_array_equal(got, old)
    # The estimate as it has always been drawn: N(0, I) probes, one JVP each.
    v = jax.random.normal(rng, (3,) + x.shape, x.dtype)
    jv = np.stack([np.einsum("bhd,bd->bh", fd_jacobians(encode_fn, x), vi) for vi in v])
    np.testing.assert_allclose(got, (jv ** 2).sum(axis=2).mean(axis=0), rtol=1e-8)


def test_estimators_are_unbiased_and_hutch_plus_plus_has_the_least_variance():
    # A decaying spectrum: singular values of W fall as 0.5**i, so J's do too.
    encode_fn, x = decaying_encoder()
    jac = fd_jacobians(encode_fn, x)
    exact = (jac ** 2).sum(axis=(1, 2))
    n, m = 2000, 12  # 12 Jacobian products each; Hutch++: 4 sketch JVPs, 4 VJPs, 4 JVPs
    s = samples(encode_fn, x, n, m)
    var = {}
    for estimator, values in s.items():
        assert values.shape == (n, len(x))
        assert_unbiased(values, exact)
        var[estimator] = values.var(axis=0, ddof=1)
    # Hutchinson's variances in closed form, per probe: Gaussian 2 ||A||_F^2, Rademacher
    # 2 (||A||_F^2 - sum_d A_dd^2), with A = J^T J.
    a = np.einsum("bhd,bhe->bde", jac, jac)
    np.testing.assert_allclose(var["gaussian"], 2 * (a ** 2).sum(axis=(1, 2)) / m, rtol=0.25)
    np.testing.assert_allclose(var["rademacher"], 2 * ((a ** 2).sum(axis=(1, 2)) - (
        np.diagonal(a, axis1=1, axis2=2) ** 2).sum(axis=1)) / m, rtol=0.25)
    # Measured: 0.7-1.2% of the variance with Gaussian probes, 0.9-1.6% with Rademacher ones.
    assert np.all(var["hutch++"] < 0.03 * var["gaussian"]), var
    assert np.all(var["hutch++"] < 0.04 * var["rademacher"]), var


def test_hutch_plus_plus_is_exact_once_the_sketch_spans_the_range():
    # Rank 2, so 2 sketch probes capture J entirely: every draw gives the exact value.
    r = np.random.default_rng(6)
    w = jnp.asarray(r.normal(size=(D, 2)) @ r.normal(size=(2, H)))
    x = jnp.asarray(rand(7, (4, D)))
    fn = lambda k: jacobians.hutch_plus_plus(lambda x: x @ w, x, k, num_probes=6, chunk_size=3)
    s = jax.jit(jax.vmap(fn))(jax.random.split(key(6), 5))  # chunks of 3, the second one padded
    assert s.shape == (5, 4)
    np.testing.assert_allclose(s, np.sum(np.asarray(w) ** 2), rtol=1e-10)


def tanh_layer(seed, h=5):
    """``(apply, params)`` of one tanh layer: ``||J||_F^2 = sum_j (1 - t_j^2)^2 ||w_j||^2``."""
    r = np.random.default_rng(seed)
    params = {"w": jnp.asarray(r.normal(size=(D, h))), "b": jnp.asarray(r.normal(size=h))}
    return (lambda p, x: jnp.tanh(x @ p["w"] + p["b"])), params


def test_hutch_plus_plus_and_its_parameter_gradient_are_unbiased():
    # 2 sketch probes for 5 code units: not exact.
    (apply, params), x, n = tanh_layer(8), jnp.asarray(rand(9, (3, D), -0.3, 0.3)), 2000

    def estimate(p, k):
        return jacobians.hutch_plus_plus(functools.partial(apply, p), x, k, num_probes=6).sum()

    exact, exact_grad = jax.jit(jax.value_and_grad(
        lambda p: losses.contractive(functools.partial(apply, p), x).sum()))(params)
    values, grads = jax.jit(jax.vmap(jax.value_and_grad(estimate), in_axes=(None, 0)))(
        params, jax.random.split(key(10), n))
    values = np.asarray(values)
    assert values.std() > 1e-3 * float(exact)
    assert_unbiased(values, float(exact))
    for name in params:
        assert_unbiased(np.asarray(grads[name]).reshape(n, -1),
                        np.asarray(exact_grad[name]).ravel())


def test_contractive_audit_metrics():
    (apply, params), x, rng = tanh_layer(11, h=3), jnp.asarray(rand(12, (B, D))), key(13)
    audit = jax.jit(functools.partial(jacobians.contractive_audit, apply, estimator="rademacher",
                                      num_probes=2))(params, x, rng)
    assert sorted(audit) == ["audit_estimate", "audit_exact", "audit_grad_cosine",
                             "audit_grad_rel_error", "audit_rel_error"]
    assert all(v.shape == () for v in audit.values())

    @jax.jit
    def reference(p):
        closed = ((1 - apply(p, x) ** 2) ** 2 * (p["w"] ** 2).sum(axis=0)).sum(axis=1).mean()
        return closed, jacobians.hutchinson(functools.partial(apply, p), x, rng, num_probes=2,
                                            probes="rademacher").mean()

    (exact, est), (g, g_est) = reference(params), jax.jit(jax.jacrev(reference))(params)
    exact, est = float(exact), float(est)
    flat = lambda g: np.concatenate([np.ravel(g[k]) for k in sorted(g)])
    g, g_est = flat(g), flat(g_est)
    expected = {"audit_exact": exact, "audit_estimate": est,
                "audit_rel_error": abs(est - exact) / exact,
                "audit_grad_cosine": g @ g_est / np.linalg.norm(g) / np.linalg.norm(g_est),
                "audit_grad_rel_error": np.linalg.norm(g_est - g) / np.linalg.norm(g)}
    for name, value in expected.items():
        np.testing.assert_allclose(audit[name], value, rtol=1e-10, err_msg=name)
    assert 0.0 < float(audit["audit_grad_cosine"]) < 1.0
    # With 3 sketch probes per code unit Hutch++ captures all of J: the estimate is exact.
    exact_audit = jax.jit(functools.partial(jacobians.contractive_audit, apply,
                                            estimator="hutch++", num_probes=9, mode="rev"))(
        params, x, rng)
    assert float(exact_audit["audit_rel_error"]) < 1e-12
    assert float(exact_audit["audit_grad_rel_error"]) < 1e-10
    np.testing.assert_allclose(exact_audit["audit_grad_cosine"], 1.0, rtol=1e-12)
    np.testing.assert_allclose(exact_audit["audit_exact"], exact, rtol=1e-12)


def test_estimator_errors():
    encode_fn, x = mlp_encoder(), jnp.zeros((2, D))
    with pytest.raises(ValueError, match=r"unknown estimator 'xtrace'; choose one of "
                                         r"\('gaussian', 'rademacher', 'hutch\+\+'\)"):
        jacobians.contractive_estimate(encode_fn, x, key(0), estimator="xtrace")
    with pytest.raises(ValueError, match="hutchinson: unknown probes 'uniform'"):
        jacobians.hutchinson(encode_fn, x, key(0), probes="uniform")
    with pytest.raises(ValueError, match="hutchinson: num_probes must be >= 1, got 0"):
        jacobians.hutchinson(encode_fn, x, key(0), num_probes=0)
    with pytest.raises(ValueError, match="hutch_plus_plus: num_probes must be >= 3, got 2"):
        jacobians.contractive_estimate(encode_fn, x, key(0), estimator="hutch++", num_probes=2)
    with pytest.raises(ValueError, match=r"codes \(B, H\)"):
        jacobians.hutch_plus_plus(lambda x: x.sum(axis=1), x, key(0))
    with pytest.raises(ValueError, match="contractive_audit: unknown mode 'estimate'"):
        jacobians.contractive_audit(mlp_apply, mlp_params(), x, key(0), mode="estimate")


# --------------------------------------------------------------------------- second order


def fd_hessian_term(encode_fn, x, eps=1e-4):
    """``||dJ/dx||_F^2`` from central differences of the exact float64 Jacobians."""
    x = np.asarray(x)
    b, d = x.shape
    steps = np.array([1.0, -1.0])[:, None, None, None] * eps * np.eye(d)[None, :, None]
    shifted = x[None, None] + steps  # (2, D, B, D): x + eps e_d and x - eps e_d
    jac = np.asarray(jax.jit(lambda z: losses.jacobian(encode_fn, z))(
        jnp.asarray(shifted.reshape(2 * d * b, d)))).reshape((2, d, b) + (-1, d))
    return (((jac[0] - jac[1]) / (2 * eps)) ** 2).sum(axis=(0, 2, 3))


def test_contractive_hessian_closed_form_finite_differences_and_chunks():
    # One tanh layer: d^2 h_j / dx dx = -2 t_j (1 - t_j^2) w_j w_j^T, so the term is
    # sum_j 4 t_j^2 (1 - t_j^2)^2 ||w_j||^4.
    r = np.random.default_rng(14)
    w, b, w_wide = r.normal(size=(D, H)) / 2, r.normal(size=H), jnp.asarray(r.normal(size=(D, 20)))
    x = rand(15, (B, D))
    t = np.tanh(x @ w + b)
    closed = (4 * t ** 2 * (1 - t ** 2) ** 2 * (w ** 2).sum(axis=0) ** 2).sum(axis=1)
    encoders = {"one_layer": lambda z: jnp.tanh(z @ jnp.asarray(w) + jnp.asarray(b)),
                "mlp": mlp_encoder(),
                "wide": lambda z: jnp.tanh(z @ w_wide / 2),  # H > D: the inner Jacobian forward
                "linear": lambda z: z @ jnp.asarray(w)}
    got = jax.jit(lambda z: {name: jacobians.contractive_hessian(f, z, chunk_size=3)
                             for name, f in encoders.items()})(jnp.asarray(x))
    np.testing.assert_allclose(got["one_layer"], closed, rtol=1e-12)
    np.testing.assert_allclose(got["linear"], 0.0, atol=1e-24)
    for name in ("mlp", "wide"):
        np.testing.assert_allclose(got[name], fd_hessian_term(encoders[name], x), rtol=1e-6)
    unchunked = jax.jit(lambda z: jacobians.contractive_hessian(encoders["mlp"], z))(jnp.asarray(x))
    np.testing.assert_allclose(unchunked, got["mlp"], rtol=1e-12)


def test_contractive_hessian_gradient_wrt_parameters():
    (apply, params), x = tanh_layer(16, h=3), jnp.asarray(rand(17, (2, D)))
    penalty = lambda p: jacobians.contractive_hessian(functools.partial(apply, p), x).sum()
    check_grads(jax.jit(penalty), (params,), order=1, modes=("rev",))


def test_stochastic_higher_order_term_over_sigma_squared_tends_to_the_exact_term():
    # E ||J(x + eps) - J(x)||_F^2 = sigma^2 ||dJ/dx||_F^2 + O(sigma^4), eps ~ N(0, sigma^2 I).
    # The same key gives the same standard normal draws z at every sigma, so the finite
    # difference is compared with its own linearization sum_n ||sum_d z_nd dJ/dx_d||^2 / N,
    # whose expectation is the exact term.
    encode_fn, x, rng, n = mlp_encoder(), jnp.asarray(rand(18, (3, D))), key(19), 2000
    single = lambda v: encode_fn(v[None])[0]
    exact, tensor = jax.jit(lambda x: (jacobians.contractive_hessian(encode_fn, x),
                                       jax.vmap(jax.jacfwd(jax.jacrev(single)))(x)))(x)
    exact, tensor = np.asarray(exact), np.asarray(tensor)  # (B,), (B, H, D, D)
    z = np.asarray(jax.random.normal(rng, (n,) + x.shape, x.dtype))
    linear = (np.einsum("bhde,nbe->nbhd", tensor, z) ** 2).sum(axis=(2, 3))  # (N, B)
    sem = linear.std(axis=0, ddof=1) / math.sqrt(n)
    assert np.all(np.abs(linear.mean(axis=0) - exact) < 4 * sem)
    fd = jax.jit(lambda s: losses.contractive_higher_order(encode_fn, x, rng, sigma=s,
                                                           num_corrupted=n))
    gaps = []
    for sigma in (0.2, 0.1, 0.05, 0.025):
        gap = np.abs(np.asarray(fd(sigma)) / sigma ** 2 - linear.mean(axis=0)) / exact
        gaps.append(gap.max())
    # Measured: 0.15, 0.043, 0.010, 0.0029: the relative gap falls like sigma^2.
    assert all(b < 0.4 * a for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < 5e-3, gaps


# --------------------------------------------------------------------------- diagnostics


def test_singular_values_and_tangent_directions_match_numpy():
    d, h = 6, 9  # H > D: "auto" forms the Jacobians forward; "rev" is checked too
    r = np.random.default_rng(20)
    w1, w2 = jnp.asarray(r.normal(size=(d, 7)) / 2), jnp.asarray(r.normal(size=(7, h)) / 2)
    encode_fn = lambda z: jnp.tanh(jnp.tanh(z @ w1) @ w2)
    x = jnp.asarray(rand(21, (B, d)))
    jac = fd_jacobians(encode_fn, x)
    _, s_np, vh = np.linalg.svd(jac, full_matrices=False)
    k = 3
    s, s_rev, t, penalty = jax.jit(lambda z: (
        jacobians.singular_values(encode_fn, z),
        jacobians.singular_values(encode_fn, z, mode="rev", chunk_size=3),
        jacobians.tangent_directions(encode_fn, z, num_directions=k, chunk_size=3),
        losses.contractive(encode_fn, z)))(x)
    assert s.shape == (B, min(d, h))
    np.testing.assert_allclose(s, s_np, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(s_rev, s, rtol=1e-12)
    np.testing.assert_allclose((np.asarray(s) ** 2).sum(1), penalty, rtol=1e-12)
    t = np.asarray(t)
    assert t.shape == (B, k, d)
    np.testing.assert_allclose(np.einsum("bkd,bjd->bkj", t, t),
                               np.broadcast_to(np.eye(k), (B, k, k)), atol=1e-12)
    # The same vectors as NumPy's up to sign; the sign makes the largest component positive.
    np.testing.assert_allclose(np.abs(np.einsum("bkd,bkd->bk", t, vh[:, :k])), 1.0, rtol=1e-6)
    peak = np.take_along_axis(t, np.abs(t).argmax(axis=2)[..., None], axis=2)
    assert np.all(peak > 0)
    np.testing.assert_allclose(np.linalg.norm(np.einsum("bhd,bkd->bkh", jac, t), axis=2),
                               s_np[:, :k], rtol=1e-7)


def test_tangent_directions_errors():
    with pytest.raises(ValueError,
                       match=r"num_directions must lie in \[1, min\(H, D\) = 5\], got 6"):
        jacobians.tangent_directions(mlp_encoder(), jnp.zeros((2, D)), num_directions=6)


def test_contraction_ratios():
    x = jnp.asarray(rand(22, (B, D)))
    radii = jnp.array([1e-2, 1.0, 10.0])
    w, encode_fn, n = jnp.asarray(rand(23, (D, H))), mlp_encoder(), 1000
    xs = jnp.tile(x[:1], (n, 1))

    @jax.jit
    def ratios(x, xs):
        return (jacobians.contraction_ratios(lambda v: 3.0 * v, x, radii, key(0)),
                jacobians.contraction_ratios(lambda v: v @ w, x, radii, key(1)),
                # Small radius, many directions, chunks of 300 (the last one padded).
                jacobians.contraction_ratios(encode_fn, xs, jnp.array([1e-5]), key(2),
                                             chunk_size=300),
                losses.contractive(encode_fn, xs[:1])[0])

    scaled, linear, small, penalty = ratios(x, xs)
    assert scaled.shape == linear.shape == (B, 3)
    np.testing.assert_allclose(scaled, 3.0, rtol=1e-12)
    # A linear map: ||W^T u|| at every radius, with the documented directions.
    u = np.array(jax.random.normal(key(1), x.shape, x.dtype))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    expected = np.linalg.norm(u @ np.asarray(w), axis=1)[:, None]
    np.testing.assert_allclose(linear, np.broadcast_to(expected, (B, 3)), rtol=1e-10)
    # E_u ||J u||^2 = ||J||_F^2 / D, and every chunk draws its own directions.
    sq = np.asarray(small)[:, 0] ** 2
    assert small.shape == (n, 1) and len(np.unique(sq)) == n
    assert abs(sq.mean() - float(penalty) / D) < 4 * sq.std(ddof=1) / math.sqrt(n)
    with pytest.raises(ValueError, match="radii must be positive"):
        jacobians.contraction_ratios(encode_fn, x, jnp.array([0.0, 1.0]), key(0))
    with pytest.raises(ValueError, match=r"radii must be a vector \(R,\)"):
        jacobians.contraction_ratios(encode_fn, x, jnp.ones((2, 2)), key(0))


def test_saturation_matches_numpy():
    a = rand(24, (6, 3, 4), 0.0, 1.0)
    a[0, 0, :2] = [0.05, 0.95]  # exactly at eps: not saturated
    expected = ((a < 0.05) | (a > 1 - 0.05)).reshape(6, -1).mean(axis=1)
    got = jax.jit(jacobians.saturation)(jnp.asarray(a))
    np.testing.assert_allclose(got, expected, rtol=1e-15)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(jacobians.saturation(jnp.asarray(a), eps=0.3),
                               ((a < 0.3) | (a > 1 - 0.3)).reshape(6, -1).mean(axis=1), rtol=1e-15)
    with pytest.raises(ValueError, match=r"eps must lie in \(0, 0.5\), got 0.5"):
        jacobians.saturation(jnp.asarray(a), eps=0.5)
