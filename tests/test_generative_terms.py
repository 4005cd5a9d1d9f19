"""Tests of the generative members' terms: WAE-MMD, beta-TCVAE, RAE, VQ-VAE and the IWAE objective.

Each against a NumPy reference written here with loops, a closed form, or finite differences.
Every test compiles one program where it can: compilation is most of the time on 2 CPU cores.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy import special

from conftest import rbg_key as key

from aejax import losses, models, objectives, quantize, vae


pytestmark = pytest.mark.usefixtures("x64")  # every test computes in float64


def rng(seed):
    return np.random.default_rng(seed)


def params64(model, x, seed=0):
    """float64 parameters drawn in NumPy, in the shapes of ``model``'s (nothing is compiled)."""
    shapes = jax.eval_shape(lambda: model.init({"params": key(0), models.SAMPLE_RNG: key(0)}, x))
    r = rng(seed + 100)
    return jax.tree.map(lambda s: jnp.asarray(0.5 * r.normal(size=s.shape)), shapes["params"])


def run(model, params, x, fn=None, *, seed=1, mask=None):
    """``objectives.forward`` and ``fn(forward)`` in one jitted program: ``(forward, fn(forward))``."""

    def go(p, x, r, m):
        f = objectives.forward(model, p, x, x, rng=r, step=0, mask=m)
        return f._replace(model=None), (None if fn is None else fn(f))

    f, out = jax.jit(go)(params, x, key(seed), mask)
    return f._replace(model=model), out


def mlp(**kwargs):
    return models.MLPAutoencoder(**{**dict(input_shape=(10,), hidden=(6,), code_size=4,
                                           activation="tanh"), **kwargs})


def small_vae():
    return models.VAE(input_shape=(10,), hidden=(6,), latent_size=3)


def binary(seed, shape):
    return jnp.asarray((rng(seed).uniform(size=shape) > 0.5).astype(float))


# --------------------------------------------------------------------------- WAE-MMD


def np_mmd(x, y, kernel, scales):
    """The unbiased estimator by double loops."""
    def k(a, b):
        d = float(np.sum((a - b) ** 2))
        return sum(c / (c + d) if kernel == "imq" else math.exp(-d / c) for c in scales)

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_mmd_matches_the_double_loop_and_ignores_padded_rows():
    x, y = rng(0).normal(size=(7, 3)), rng(1).normal(1.0, 2.0, size=(5, 3))
    scales = (2 * 3 * 1.0, 0.5 * 2 * 3)
    # Padded rows (garbage values, mask 0) must leave the estimate of the real rows unchanged.
    xp = np.concatenate([x, 50 * np.ones((3, 3))])
    yp = np.concatenate([y, -9 * np.ones((2, 3))])
    mx, my = np.r_[np.ones(7), np.zeros(3)], np.r_[np.ones(5), np.zeros(2)]

    @jax.jit
    def values(x, y, xp, yp):
        return {kernel: (losses.mmd(x, y, kernel=kernel, scales=scales),
                         losses.mmd(xp, yp, kernel=kernel, scales=scales, mask_x=mx, mask_y=my))
                for kernel in ("imq", "rbf")}

    for kernel, (got, padded) in values(x, y, xp, yp).items():
        np.testing.assert_allclose(got, np_mmd(x, y, kernel, scales), rtol=1e-12)
        np.testing.assert_allclose(padded, got, rtol=1e-12)
    check_grads(jax.jit(lambda a, b: losses.mmd(a, b, kernel="imq", scales=scales)), (x, y),
                order=1, modes=("rev",))


def test_unbiased_mmd_averages_to_zero_when_both_samples_come_from_the_prior():
    trials, n, d = 2000, 16, 4
    x, y = rng(2).normal(size=(2, trials, n, d))
    scale = (2.0 * d,)
    values = np.asarray(jax.jit(jax.vmap(lambda a, b: losses.mmd(a, b, scales=scale)))(x, y))
    stderr = values.std() / math.sqrt(trials)
    assert abs(values.mean()) < 4 * stderr
    # The biased (V-statistic) estimate, with the diagonals, sits well above 0: the test can tell.
    k = lambda a, b: (scale[0] / (scale[0] + ((a[:, :, None] - b[:, None]) ** 2).sum(-1))).mean((1, 2))
    biased = k(x, x) + k(y, y) - 2 * k(x, y)
    assert biased.mean() > 10 * stderr


def test_mmd_term_scores_the_codes_against_prior_samples_of_the_term_key():
    model = mlp()
    x = jnp.asarray(rng(3).uniform(size=(6, 10)))
    terms = {k: objectives.mmd(kernel=k, sigma=0.5, scales=(1.0, 2.0)) for k in ("imq", "rbf")}
    f, (values, prior) = run(model, params64(model, x), x, lambda f: (
        {k: t(f) for k, t in terms.items()}, jax.random.normal(f.rng, f.code.shape, f.code.dtype)))
    c = 2 * 4 * 0.5 ** 2
    for kernel, value in values.items():
        want = np_mmd(np.asarray(f.code), np.asarray(prior), kernel, (c, 2 * c))
        np.testing.assert_allclose(value, np.full(6, want), rtol=1e-10)
    with pytest.raises(ValueError, match="unknown kernel 'laplace'"):
        objectives.mmd(kernel="laplace")
    with pytest.raises(ValueError, match="sigma and scales must be positive"):
        objectives.mmd(sigma=0.0)


def test_mmd_shape_and_kernel_errors():
    with pytest.raises(ValueError, match=r"x must be \(N, D\) and y \(M, D\)"):
        losses.mmd(np.zeros((3, 2)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="scales must be positive"):
        losses.mmd(np.zeros((3, 2)), np.zeros((3, 2)), scales=(-1.0,))
    with pytest.raises(ValueError, match="unknown kernel 'cosine'"):
        losses.mmd(np.zeros((3, 2)), np.zeros((3, 2)), kernel="cosine")
    with pytest.raises(ValueError, match=r"masks must be \(N,\) and \(M,\)"):
        losses.mmd(np.zeros((3, 2)), np.zeros((3, 2)), mask_x=np.ones(2))


# --------------------------------------------------------------------------- beta-TCVAE


def np_tc(z, mean, logvar, n_data):
    """Minibatch-weighted sampling with loops: (mi, tc, dimwise_kl) per example."""
    m, dims = z.shape
    log_n = lambda v, mu, lv: -0.5 * ((v - mu) ** 2 / math.exp(lv) + lv + math.log(2 * math.pi))
    out = []
    for i in range(m):
        log_qzx = sum(log_n(z[i, d], mean[i, d], logvar[i, d]) for d in range(dims))
        joint = [sum(log_n(z[i, d], mean[j, d], logvar[j, d]) for d in range(dims)) for j in range(m)]
        log_qz = special.logsumexp(joint) - math.log(n_data * m)
        log_prod = sum(special.logsumexp([log_n(z[i, d], mean[j, d], logvar[j, d]) for j in range(m)])
                       - math.log(n_data * m) for d in range(dims))
        log_pz = sum(log_n(z[i, d], 0.0, 0.0) for d in range(dims))
        out.append((log_qzx - log_qz, log_qz - log_prod, log_prod - log_pz))
    return np.array(out).T


def test_tc_decomposition_matches_the_loops_and_ignores_padded_rows():
    r = rng(4)
    mean, logvar = r.normal(size=(6, 3)), r.normal(-0.5, 0.4, size=(6, 3))
    z = mean + np.exp(0.5 * logvar) * r.normal(size=(6, 3))
    pad = lambda a: jnp.concatenate([a, jnp.zeros((2, 3))])
    mask = np.r_[np.ones(6), np.zeros(2)]

    @jax.jit
    def parts(z, mean, logvar):
        plain = losses.tc_decomposition(z, mean, logvar, dataset_size=1000)
        padded = losses.tc_decomposition(pad(z), pad(mean), pad(logvar), dataset_size=1000,
                                         mask=mask)
        kl = losses.gaussian_log_prob(z, mean, logvar) - losses.gaussian_log_prob(z)
        return plain, padded, kl

    plain, padded, kl = parts(z, mean, logvar)
    want = np_tc(z, mean, logvar, 1000)
    for got, pad_got, w in zip(plain, padded, want):
        np.testing.assert_allclose(got, w, rtol=1e-10, atol=1e-10)
        # Padded rows are not in the batch: M counts the real rows only.
        np.testing.assert_allclose(pad_got[:6], w, rtol=1e-10, atol=1e-10)
    # The parts sum to the sampled KL log q(z|x) - log p(z).
    np.testing.assert_allclose(sum(plain), kl, rtol=1e-10)
    check_grads(jax.jit(lambda m, lv: sum(p.sum() for p in losses.tc_decomposition(
        z, m, lv, dataset_size=1000))), (mean, logvar), order=1, modes=("rev",))


def test_tc_terms_read_the_vae_posterior_and_need_the_dataset_size():
    model = small_vae()
    x = jnp.asarray(rng(5).uniform(size=(5, 10)))
    terms = (objectives.index_code_mi, objectives.total_correlation, objectives.dimwise_kl)
    f, got = run(model, params64(model, x), x,
                 lambda f: [t(dataset_size=500)(f) for t in terms])
    want = np_tc(*(np.asarray(a) for a in (f.code, f.extras["mean"], f.extras["logvar"])), 500)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="total_correlation needs dataset_size=N >= 1"):
        objectives.total_correlation()
    with pytest.raises(ValueError, match=r"z, mean and logvar must all be \(B, Z\)"):
        losses.tc_decomposition(np.zeros((3, 2)), np.zeros((3, 2)), np.zeros((3, 3)),
                                dataset_size=10)


# --------------------------------------------------------------------------- RAE


def np_decoder(params, z):
    """NumPy decoder of ``mlp()``: tanh hidden layer, linear logits."""
    p = jax.tree.map(np.asarray, params)
    h = np.tanh(z @ p["decoder_0"]["kernel"] + p["decoder_0"]["bias"])
    return h @ p["decoder_1"]["kernel"] + p["decoder_1"]["bias"]


def test_rae_terms_equal_the_half_squared_norm_and_finite_differences():
    model = mlp()
    x = jnp.asarray(rng(8).uniform(size=(3, 10)))
    params = params64(model, x)
    modes = ("auto", "rev", "fwd")
    f, (l2, jac) = run(model, params, x, lambda f: (
        objectives.l2_activity()(f), [objectives.decoder_jacobian(mode=m)(f) for m in modes]))
    z, eps = np.asarray(f.code), 1e-6
    np.testing.assert_allclose(l2, 0.5 * (z ** 2).sum(1), rtol=1e-12)
    want = np.zeros(3)
    for h in range(4):
        e = np.zeros_like(z)
        e[:, h] = eps
        want += (((np_decoder(params, z + e) - np_decoder(params, z - e)) / (2 * eps)) ** 2).sum(1)
    for got in jac:
        np.testing.assert_allclose(got, want, rtol=1e-7)
    a = rng(6).normal(size=(4, 2, 3))
    np.testing.assert_allclose(losses.l2_activity(a), 0.5 * (a ** 2).sum((1, 2)), rtol=1e-12)
    with pytest.raises(ValueError, match="Unknown decoder_jacobian mode 'best'"):
        objectives.decoder_jacobian(mode="best")


def test_decoder_jacobian_is_differentiable_in_the_parameters():
    model = mlp()
    x = jnp.asarray(rng(9).uniform(size=(3, 10)))
    term = objectives.decoder_jacobian()
    loss = lambda p: term(objectives.forward(model, p, x, x, rng=key(0), step=0)).sum()
    grads = jax.jit(jax.grad(loss))(params64(model, x))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert np.abs(grads["decoder_0"]["kernel"]).sum() > 0
    assert np.abs(grads["encoder_0"]["kernel"]).sum() > 0  # through the code


# --------------------------------------------------------------------------- VQ-VAE


def test_quantizer_nearest_codeword_straight_through_and_loss_gradients():
    r = rng(10)
    z, book, w = r.normal(size=(5, 4, 3)), r.normal(size=(7, 3)), r.normal(size=(5, 4, 3))
    e, c = r.normal(size=(4, 6)), r.normal(size=(4, 6))

    @jax.jit
    def go(z, book, e, c):
        q = quantize.quantize(z, book)
        st = jax.grad(lambda z, b: jnp.sum(w * quantize.quantize(z, b).code), (0, 1))(z, book)
        book_grads = jax.grad(lambda e, c: losses.vq_codebook(e, c).sum(), (0, 1))(e, c)
        commit_grads = jax.grad(lambda e, c: losses.vq_commitment(e, c).sum(), (0, 1))(e, c)
        return q, st, (losses.vq_codebook(e, c), losses.vq_commitment(e, c)), book_grads, commit_grads

    q, (dz, dbook), values, (dbe, dbc), (dce, dcc) = go(z, book, e, c)
    nearest = ((z[..., None, :] - book) ** 2).sum(-1).argmin(-1)
    np.testing.assert_array_equal(q.indices, nearest)
    np.testing.assert_allclose(q.codeword, book[nearest], rtol=0)
    np.testing.assert_allclose(q.code, q.codeword, rtol=0, atol=1e-15)
    # Straight through: the encoder output gets the decoder's gradient unchanged, the codebook
    # nothing (it learns from its own loss).
    np.testing.assert_allclose(dz, w, rtol=0)
    np.testing.assert_array_equal(dbook, 0.0)
    for value in values:
        np.testing.assert_allclose(value, ((e - c) ** 2).sum(1), rtol=1e-12)
    np.testing.assert_array_equal(dbe, 0.0)
    np.testing.assert_allclose(dbc, 2 * (c - e), rtol=1e-12)
    np.testing.assert_allclose(dce, 2 * (e - c), rtol=1e-12)
    np.testing.assert_array_equal(dcc, 0.0)
    with pytest.raises(ValueError, match=r"z must be \(..., D\) and codebook \(K, D\)"):
        quantize.nearest(z, book[:, :2])
    with pytest.raises(ValueError, match="must be batches of the same shape"):
        losses.vq_commitment(e, c[:, :3])


def test_perplexity_and_usage_closed_forms():
    @jax.jit
    def go():
        uniform = quantize.code_counts(jnp.array([[0, 1], [2, 3], [0, 1], [2, 3]]), 8)
        one = quantize.code_counts(jnp.zeros((3, 5), jnp.int32), 8)
        counts = jnp.array([[2.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 9.0]])
        mask = jnp.array([1.0, 0.0])  # the second row is padding
        return (quantize.perplexity(uniform), quantize.usage(uniform), quantize.perplexity(one),
                quantize.perplexity(counts, mask), quantize.usage(counts, mask))

    uniform_pp, uniform_use, one_pp, pp, use = go()
    assert float(uniform_pp) == pytest.approx(4.0)  # uniform over 4 of 8 codes
    assert float(uniform_use) == pytest.approx(0.5)
    assert float(one_pp) == pytest.approx(1.0)
    p = np.array([0.5, 0.25, 0.25])
    assert float(pp) == pytest.approx(math.exp(-(p * np.log(p)).sum()))  # 2^(3/2)
    assert float(use) == pytest.approx(0.75)


def test_ema_update_matches_the_loop_and_reaches_the_cluster_means():
    r = rng(13)
    book, z = r.normal(size=(4, 2)), r.normal(size=(9, 2))
    idx = ((z[:, None] - book) ** 2).sum(-1).argmin(-1)
    mask = np.r_[np.ones(8), 0.0]
    update = jax.jit(quantize.ema_update, static_argnames=("decay", "eps"))
    state, new = update(quantize.ema_init(book), z, idx, decay=0.9, eps=1e-3, mask=mask)
    counts, sums = np.ones(4), book.copy()
    for k in range(4):
        members = [i for i in range(9) if idx[i] == k and mask[i]]
        counts[k] = 0.9 * counts[k] + 0.1 * len(members)
        sums[k] = 0.9 * sums[k] + 0.1 * sum((z[i] for i in members), np.zeros(2))
    smoothed = (counts + 1e-3) / (counts.sum() + 4e-3) * counts.sum()
    np.testing.assert_allclose(state.counts, counts, rtol=1e-12)
    np.testing.assert_allclose(state.sums, sums, rtol=1e-12)
    np.testing.assert_allclose(new, sums / smoothed[:, None], rtol=1e-12)
    # With the same assignments every step, each used codeword goes to the mean of its vectors.
    state = quantize.ema_init(book)
    ones = np.ones(9)
    for _ in range(300):
        state, new = update(state, z, idx, decay=0.9, eps=1e-3, mask=ones)
    for k in set(idx.tolist()):
        np.testing.assert_allclose(new[k], z[idx == k].mean(0), rtol=1e-3, atol=1e-3)


def test_vqvae_follows_the_model_protocol_and_trains_by_the_papers_objective():
    model = models.create("vqvae", input_shape=(10,), hidden=(6,), num_latents=3, code_dim=2,
                          num_codes=5)
    x = jnp.asarray(rng(14).uniform(size=(4, 10)))
    params = params64(model, x)
    # Reconstruction + codebook + 0.25 commitment; the codebook use reported at weight 0.
    obj = objectives.build("bce", {"codebook": {}, "commitment": {"weight": 0.25},
                                   "codebook_perplexity": {"weight": 0.0},
                                   "codebook_usage": {"weight": 0.0}})
    f, (encoded, decoded, (total, parts)) = run(model, params, x, lambda f: (
        f.encode(f.x), f.decode(f.code), obj(f)))
    assert f.code.shape == (4, 6) and f.logits.shape == (4, 10)
    assert sorted(f.extras) == ["code_counts", "codeword", "encoding"]
    book = np.asarray(params["quantizer"]["codebook"])
    enc = np.asarray(f.extras["encoding"]).reshape(4, 3, 2)
    nearest = ((enc[..., None, :] - book) ** 2).sum(-1).argmin(-1)
    np.testing.assert_allclose(f.code, book[nearest].reshape(4, 6), rtol=1e-12)
    np.testing.assert_allclose(f.extras["codeword"], f.code, rtol=1e-12)
    np.testing.assert_allclose(f.extras["code_counts"], np.eye(5)[nearest].sum(1), rtol=0)
    np.testing.assert_allclose(encoded, f.code, rtol=1e-12)
    np.testing.assert_allclose(decoded, f.logits, rtol=1e-12)
    d = models.describe(model, params, x)
    assert d.code_size == 6 and not d.stochastic
    np.testing.assert_allclose(total, parts["reconstruction"] + parts["codebook"]
                               + 0.25 * parts["commitment"], rtol=1e-12)
    np.testing.assert_allclose(parts["codebook"], ((enc - book[nearest]) ** 2).sum((1, 2)),
                               rtol=1e-10)
    np.testing.assert_allclose(parts["codebook_usage"],  # counts are float32
                               len(set(nearest.ravel().tolist())) / 5, rtol=1e-6)


# --------------------------------------------------------------------------- IWAE


def test_iwae_term_is_the_evaluators_bound_for_the_same_key():
    model = small_vae()
    x = binary(15, (4, 10))
    params = params64(model, x)
    f, (terms, bounds, weights) = run(model, params, x, lambda f: (
        {k: objectives.iwae(num_samples=k)(f) for k in (1, 7)},
        {k: vae.iwae(model, f.params, x, f.rng, num_samples=k) for k in (1, 7)},
        vae.log_weights(model, f.params, x, f.rng, 1)))
    for k in (1, 7):
        np.testing.assert_allclose(terms[k], -bounds[k], rtol=1e-12)
    np.testing.assert_allclose(terms[1], -weights[0], rtol=1e-12)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        objectives.iwae(num_samples=0)


def test_iwae_term_with_one_sample_is_minus_the_elbo_in_expectation():
    """With the same noise, k = 1 differs from -ELBO(1 sample) only by a zero-mean term."""
    model = small_vae()
    x = binary(16, (3, 10))
    term = objectives.iwae(num_samples=1)
    keys = jax.vmap(lambda i: jax.random.fold_in(key(3), i))(jnp.arange(4000))

    def gaps(f):  # log q(z|x) - log p(z) - KL, one sample per key
        return jax.vmap(lambda r: term(f._replace(rng=r))
                        + vae.elbo(model, f.params, x, r, num_samples=1))(keys)

    _, g = run(model, params64(model, x), x, gaps)
    g = np.asarray(g)
    np.testing.assert_allclose(g.mean(0), 0.0, atol=4 * g.std(0).max() / math.sqrt(len(g)))
    assert g.std() > 0.01  # the two differ draw by draw: the test can tell


def test_reconstruction_weight_zero_trains_the_iwae_term_alone():
    model = small_vae()
    x = binary(17, (4, 10))
    obj = objectives.build("bce", {"iwae": {"num_samples": 3}, "kl": {"weight": 0.0}},
                           reconstruction_weight=0.0)
    _, (total, parts) = run(model, params64(model, x), x, obj)
    np.testing.assert_allclose(total, parts["iwae"], rtol=1e-12)
    assert set(parts) == {"reconstruction", "iwae", "kl"}
    with pytest.raises(ValueError, match="reconstruction weight is -1"):
        objectives.build("bce", {}, reconstruction_weight=-1.0)


# --------------------------------------------------------------------------- compatibility


class SkipDecoder(nn.Module):
    """A protocol model whose decoder also needs the encoder's hidden layer (a skip connection)."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(3, name="hidden")(x)
        code = nn.Dense(2, name="code")(h)
        return self.decode(code, h), {"code": code}

    def decode(self, z, skip):
        return nn.Dense(10, name="out")(jnp.concatenate([z, skip], axis=1))


def test_check_compatible_names_the_model_each_term_needs():
    x = jnp.asarray(rng(18).uniform(size=(4, 10)))
    model = mlp()
    params = params64(model, x)
    for kind in ("total_correlation", "iwae", "index_code_mi"):
        with pytest.raises(ValueError, match=rf"The '{kind}' term needs a stochastic encoder .* "
                                             "Set model.name='vae'"):
            objectives.check_compatible(model, params, x, {kind: {}})
    for kind in ("codebook", "codebook_perplexity"):
        with pytest.raises(ValueError, match=rf"The '{kind}' term needs a vector-quantized model "
                                             r".*Set model.name='vqvae'"):
            objectives.check_compatible(model, params, x, {kind: {}})
    objectives.check_compatible(model, params, x, {"mmd": {}, "decoder_jacobian": {},
                                                   "l2_activity": {}})
    f, _ = run(model, params, x)
    with pytest.raises(ValueError, match=r"The 'commitment' term needs aux\['encoding'\]"):
        objectives.commitment()(f)
    skip = SkipDecoder()
    with pytest.raises(ValueError, match="The 'decoder_jacobian' term needs model.decode"):
        objectives.check_compatible(skip, params64(skip, x), x, {"decoder_jacobian": {}})
