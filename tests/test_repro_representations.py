"""Tests of the reproduction scripts' computations: Jacobian spectra and contraction
(repro_representations), precision at k and Hamming retrieval (repro_retrieval), filter tiling
and per-epoch checkpoints (repro_filters), each in a tiny setting."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from aejax import losses, models
from aejax.runtime import config as run_config
from experiments import repro_filters, repro_representations as rep, repro_retrieval as ret


def _tiny_sigmoid_encoder(d=12, h=5, seed=0):
    model = models.MLPAutoencoder(input_shape=(d,), hidden=(), code_size=h,
                                  activation="sigmoid", code_activation="sigmoid")
    x = jax.random.uniform(jax.random.PRNGKey(seed), (7, d))
    params = models.init(model, jax.random.PRNGKey(seed + 1), x)
    return model, params, x


@pytest.mark.parametrize("d,h", [(12, 5), (6, 9)])  # reverse mode (h <= d) and forward mode
def test_jacobian_spectra_match_jacfwd_and_numpy_svd(d, h):
    model, params, x = _tiny_sigmoid_encoder(d, h)
    encode = rep.batch_encoder(model, params)
    s = rep.jacobian_spectra(encode, np.asarray(x), chunk_size=3)  # chunks of 3, 3, 1
    single = lambda v: encode(v[None])[0]
    jac = np.asarray(jax.vmap(jax.jacfwd(single))(x), np.float64)  # (N, H, D), one trace
    expected = np.linalg.svd(jac, compute_uv=False)
    assert s.shape == (len(x), min(d, h))
    np.testing.assert_allclose(s, expected, rtol=1e-4, atol=1e-6)
    assert np.all(np.diff(s, axis=1) <= 1e-9)  # largest first


def test_squared_singular_values_sum_to_contractive_penalty():
    model, params, x = _tiny_sigmoid_encoder(20, 8)
    encode = rep.batch_encoder(model, params)
    s = rep.jacobian_spectra(encode, np.asarray(x))
    code = encode(x)
    closed = losses.contractive_sigmoid(code, params["encoder_0"]["kernel"])
    generic = losses.contractive(encode, x, mode="fwd")
    np.testing.assert_allclose((s ** 2).sum(1), np.asarray(closed), rtol=1e-4)
    np.testing.assert_allclose((s ** 2).sum(1), np.asarray(generic), rtol=1e-4)


def test_contraction_curve_linear_encoder_and_small_radius_limit():
    # A linear encoder scaled by 3 has ratio exactly 3 at every radius.
    x = np.random.default_rng(0).uniform(size=(50, 10)).astype(np.float32)
    ratios = rep.contraction_curve(lambda v: 3.0 * v, x, np.array([0.01, 1.0, 10.0]))
    np.testing.assert_allclose(ratios, 3.0, rtol=1e-5)
    # For a nonlinear encoder at small r, E ||J u||^2 over random unit u is ||J||_F^2 / D.
    model, params, xs = _tiny_sigmoid_encoder(12, 5)
    encode = rep.batch_encoder(model, params)
    xs = np.tile(np.asarray(xs[:1]), (3000, 1))
    u = jax.random.normal(jax.random.PRNGKey(0), xs.shape)
    u = u / jnp.linalg.norm(u, axis=1, keepdims=True)
    r = 1e-3
    sq_ratio = float(jnp.mean(jnp.sum((encode(xs + r * u) - encode(xs)) ** 2, 1)) / r ** 2)
    frob2 = float(losses.contractive(encode, jnp.asarray(xs[:1]))[0])
    assert abs(sq_ratio - frob2 / 12) < 0.08 * frob2 / 12
    # and the curve is finite and positive
    c = rep.contraction_curve(encode, np.asarray(xs[:20]), np.logspace(-2, 1, 4))
    assert np.all(np.isfinite(c)) and np.all(c > 0)


def test_pair_contraction_of_a_scaled_copy_is_the_scale():
    x = np.random.default_rng(1).normal(size=(40, 6))
    centres, ratios = rep.pair_contraction(0.5 * x, x, num_bins=4)
    assert centres.shape == ratios.shape == (4,)
    assert np.all(np.diff(centres) > 0)
    np.testing.assert_allclose(ratios, 0.5, rtol=1e-6)


def test_representation_configs_build():
    from aejax import objectives

    for kind in rep.REPRESENTATIONS:
        c = rep.representation_config(kind, hidden_size=8, epochs=1)
        run_config.check_config(c)
        model = models.from_config(c.model)
        x = jnp.asarray(np.random.default_rng(0).random((16, 784)), jnp.float32)
        objectives.check_compatible(model, models.init(model, jax.random.PRNGKey(0), x), x,
                                    {k: dict(v) for k, v in c.loss.terms.items()})
    assert rep.representation_config("ae_wd", hidden_size=8, epochs=1).optimizer.weight_decay > 0
    with pytest.raises(ValueError, match="Unknown representation"):
        rep.representation_config("rbm", hidden_size=8, epochs=1)


# --------------------------------------------------------------------------- retrieval


def test_precision_at_k_on_a_hand_built_database():
    # Database on a line: labels 0 at 0, 1, 2 and label 1 at 10, 11, 12.
    db = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]])
    db_y = np.array([0, 0, 0, 1, 1, 1])
    q = np.array([[0.4], [10.6], [5.0]])
    q_y = np.array([0, 1, 1])
    p = ret.precision_at_k(q, q_y, db, db_y, ks=(1, 3, 4, 6))
    # query 0: neighbours 0,1,2 (rel), 10 (not); query 1: 11,10,12 (rel), 2 (not);
    # query 2 (label 1) at 5: 2 (d3), 1 (d4), then 0 and 10 tied at d5 (one relevant).
    # k=1: [1, 1, 0]; k=3: [1, 1, 0.5/3] (one slot, two tied); k=4: [3/4, 3/4, 1/4]; k=6: 1/2.
    assert p[1] == pytest.approx(2 / 3)
    assert p[3] == pytest.approx((1 + 1 + 0.5 / 3) / 3)
    assert p[4] == pytest.approx((0.75 + 0.75 + 0.25) / 3)
    assert p[6] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="every k"):
        ret.precision_at_k(q, q_y, db, db_y, ks=(7,))
    with pytest.raises(ValueError, match="share D"):
        ret.precision_at_k(q, q_y, np.zeros((6, 2)), db_y)


def test_hamming_retrieval_matches_brute_force_numpy():
    rng = np.random.default_rng(0)
    bits = 6  # few bits: many ties, the hard case
    db = rng.integers(0, 2, (300, bits)).astype(np.uint8)
    q = rng.integers(0, 2, (40, bits)).astype(np.uint8)
    db_y, q_y = rng.integers(0, 3, 300), rng.integers(0, 3, 40)
    brute = (q[:, None, :] != db[None, :, :]).sum(-1)
    np.testing.assert_array_equal(np.asarray(ret.hamming(jnp.asarray(q), jnp.asarray(db))), brute)
    ks = (1, 5, 20)
    got = ret.precision_at_k(q, q_y, db, db_y, ks, distance="hamming", chunk_size=16)
    # Brute force: average precision over many uniformly random tie-breaks of a numpy sort.
    trials = 400
    est = np.zeros(len(ks))
    for _ in range(trials):
        order = np.lexsort((rng.random(brute.shape), brute), axis=1)
        rel = db_y[order] == q_y[:, None]
        est += [rel[:, :k].mean() for k in ks]
    est /= trials
    np.testing.assert_allclose([got[k] for k in ks], est, atol=0.01)


def test_euclidean_retrieval_without_ties_equals_plain_top_k():
    rng = np.random.default_rng(2)
    db, q = rng.normal(size=(200, 5)), rng.normal(size=(30, 5))
    db_y, q_y = rng.integers(0, 4, 200), rng.integers(0, 4, 30)
    d = ((q[:, None] - db[None]) ** 2).sum(-1)
    order = np.argsort(d, axis=1)
    got = ret.precision_at_k(q, q_y, db, db_y, (1, 10), chunk_size=7)
    for k in (1, 10):
        assert got[k] == pytest.approx((db_y[order[:, :k]] == q_y[:, None]).mean(), abs=1e-6)
    np.testing.assert_array_equal(ret.nearest(q, db, 3, chunk_size=7), order[:, :3])


def test_binary_codes_thresholds():
    z = np.array([[0.2, 0.9], [0.6, 0.1], [0.4, 0.5]])
    np.testing.assert_array_equal(ret.binary_codes(z, 0.5), [[0, 1], [1, 0], [0, 0]])
    np.testing.assert_array_equal(ret.binary_codes(z, "median"), [[0, 1], [1, 0], [0, 0]])
    np.testing.assert_array_equal(ret.binary_codes(np.array([[0.3, 0.3]]), "median", reference=z),
                                  [[0, 0]])


# --------------------------------------------------------------------------- filters


def test_tile_images_shape_and_placement():
    tiles = np.arange(5 * 2 * 3, dtype=float).reshape(5, 2, 3) + 1.0
    grid = repro_filters.tile_images(tiles, cols=2, pad=1, normalize=False, fill=-1.0)
    assert grid.shape == (3 * (2 + 1) + 1, 2 * (3 + 1) + 1)
    for i in range(5):
        r, c = divmod(i, 2)
        top, left = 1 + r * 3, 1 + c * 4
        np.testing.assert_array_equal(grid[top:top + 2, left:left + 3], tiles[i])
    np.testing.assert_array_equal(grid[7:9, 5:8], -1.0)  # the empty sixth cell
    assert np.all(grid[0] == -1.0) and np.all(grid[:, 0] == -1.0)
    norm = repro_filters.tile_images(np.array([[[-2.0, 0.0], [1.0, 2.0]]]), cols=1, pad=0)
    np.testing.assert_allclose(norm, [[0.0, 0.5], [0.75, 1.0]])


def test_first_layer_filters_dense_and_conv():
    mlp = models.MLPAutoencoder(hidden=(), code_size=3)
    dense = models.init(mlp, jax.random.PRNGKey(0), jnp.zeros((1, 784)))
    f = repro_filters.first_layer_filters(mlp, dense)
    assert f.shape == (3, 28, 28)
    np.testing.assert_array_equal(f[1].ravel(), dense["encoder_0"]["kernel"][:, 1])
    conv_model = models.ConvAutoencoder()
    conv = models.init(conv_model, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    g = repro_filters.first_layer_filters(conv_model, conv)
    assert g.shape == (16, 3, 3)
    np.testing.assert_array_equal(g[5], conv["encoder_0"]["kernel"][:, :, 0, 5])


def test_per_epoch_checkpoints_and_the_runs_initial_params(small_splits, tmp_path):
    # With a vanishing learning rate the kernels stay bit-identical to the initial draw, so
    # every kept epoch must equal what initial_params reproduces.
    c = repro_filters.filters_config("multilayer", epochs=2)
    c.model.update(input_shape=(64,), hidden=(8,), code_size=3)
    c.optimizer.learning_rate = 1e-30
    model, _, _ = repro_filters.probes.train_model(c, str(tmp_path), small_splits)
    snaps = repro_filters.per_epoch_params(str(tmp_path))
    assert [s for s, _ in snaps] == [4, 8]  # 1024 examples / 256 per step, both epochs kept
    init = repro_filters.initial_params(c, model, small_splits.train[0])
    for _, params in snaps:
        for layer in ("encoder_0", "encoder_1", "decoder_0", "decoder_1"):
            np.testing.assert_array_equal(init[layer]["kernel"], params[layer]["kernel"])
    x = small_splits.test[0]
    logits, _ = model.apply({"params": init}, jnp.asarray(x))
    expected = (np.square(1 / (1 + np.exp(-np.asarray(logits, np.float64))) - x)).sum(1).mean()
    got = repro_filters.squared_error_per_image(model, init, x, batch=100)  # 3 batches, 1 partial
    assert got == pytest.approx(expected, rel=1e-5)


def test_cosine_to_init():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0], [1.0, 0.0]])
    np.testing.assert_allclose(repro_filters.cosine_to_init(a, b), [1.0, -1.0, 0.0], atol=1e-12)
