"""Tests of the reproduction scripts' computations (semi-supervised, VAE, generation) on tiny inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import multivariate_normal

from aejax import models
from experiments import probes, repro_generation, repro_semisupervised, repro_vae


# --------------------------------------------------------------------------- semi-supervised


def _labels(per_class=(30, 25, 40, 31, 50, 22, 35, 28, 33, 60), seed=0):
    labels = np.concatenate([np.full(k, c) for c, k in enumerate(per_class)])
    return np.random.default_rng(seed).permutation(labels)


@pytest.mark.parametrize("n", [10, 100, 200])
def test_balanced_subset_has_n_over_10_of_each_class(n):
    labels = _labels()
    idx = repro_semisupervised.balanced_subset(labels, n, seed=3)
    assert len(idx) == n and len(np.unique(idx)) == n
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=10), np.full(10, n // 10))


def test_balanced_subset_differs_across_seeds_and_is_nested_within_one():
    labels = _labels()
    a = repro_semisupervised.balanced_subset(labels, 100, seed=0)
    b = repro_semisupervised.balanced_subset(labels, 100, seed=1)
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, repro_semisupervised.balanced_subset(labels, 100, seed=0))
    bigger = repro_semisupervised.balanced_subset(labels, 200, seed=0)
    assert set(a) <= set(bigger)


def test_balanced_subset_rejects_bad_sizes():
    labels = _labels()
    with pytest.raises(ValueError, match="multiple"):
        repro_semisupervised.balanced_subset(labels, 105, seed=0)
    with pytest.raises(ValueError, match="class 5"):
        repro_semisupervised.balanced_subset(labels, 230, seed=0)  # class 5 has only 22


def test_classifier_epochs_give_the_same_number_of_steps():
    for n in (100, 200, 500, 1000):
        e = repro_semisupervised.classifier_epochs(n, steps=500, batch_size=128)
        steps_per_epoch = n // min(128, n)
        assert e * steps_per_epoch >= 500 > (e - 1) * steps_per_epoch


def test_label_efficiency_separates_easy_from_impossible_features():
    rng = np.random.default_rng(0)
    y = rng.permutation(np.repeat(np.arange(10), 40))
    # The class one-hot repeated 10 times: the learned evidence adds up coherently, the random
    # initial logits do not, so a few hundred small Adam steps suffice.
    easy = np.tile(np.eye(10, dtype=np.float32)[y], 10)
    easy += 0.1 * rng.normal(size=easy.shape).astype(np.float32)
    noise = rng.normal(size=(400, 100)).astype(np.float32)
    methods = {"easy": (probes.MLPClassifier(), easy[:300], easy[300:]),
               "noise": (probes.MLPClassifier(), noise[:300], noise[300:])}
    errors = repro_semisupervised.label_efficiency(methods, y[:300], y[300:], (50,), (0, 1), steps=300)
    assert set(errors) == {"easy", "noise"} and len(errors["easy"]["50"]) == 2
    assert max(errors["easy"]["50"]) < 0.05
    assert min(errors["noise"]["50"]) > 0.6  # chance is 0.9
    summary = repro_semisupervised.summarize(errors)
    np.testing.assert_allclose(summary["noise"]["50"]["mean"], np.mean(errors["noise"]["50"]))
    np.testing.assert_allclose(summary["noise"]["50"]["std"], np.std(errors["noise"]["50"], ddof=1))


def test_standardizer_keeps_dead_units_finite():
    f = np.array([[1.0, 0.0], [3.0, 0.0]])
    mean, std = repro_semisupervised.standardizer(f)
    z = (f - mean) / std
    np.testing.assert_allclose(z, [[-1.0, 0.0], [1.0, 0.0]])


# --------------------------------------------------------------------------- VAE


@pytest.fixture(scope="module")
def tiny_vae():
    model = models.VAE(input_shape=(6,), hidden=(5,), latent_size=2)
    params = models.init(model, jax.random.PRNGKey(0), jnp.zeros((1, 6)))
    return model, params


def test_interpolation_endpoints_are_the_reconstructions(tiny_vae):
    model, params = tiny_vae
    encode, decode = repro_vae.bind(model, params)
    x = np.random.default_rng(0).uniform(size=(2, 6)).astype(np.float32)
    alphas = np.array([0.0, 0.5, 1.0])
    out = repro_vae.interpolate_latent(encode, decode, x[0], x[1], alphas)
    assert out.shape == (3, 6)
    recon = np.asarray(decode(encode(jnp.asarray(x))))
    np.testing.assert_allclose(out[0], recon[0], atol=1e-6)
    np.testing.assert_allclose(out[2], recon[1], atol=1e-6)
    mid = np.asarray(decode(encode(jnp.asarray(x)).mean(axis=0, keepdims=True)))[0]
    np.testing.assert_allclose(out[1], mid, atol=1e-6)
    # The latent path is not the pixel path: a nonlinear decoder bends it.
    pixels = repro_vae.interpolate_pixels(x[0], x[1], alphas)
    np.testing.assert_allclose(pixels[[0, 2]], x, atol=1e-7)
    np.testing.assert_allclose(pixels[1], x.mean(axis=0), atol=1e-7)


def test_latent_grid_decodes_every_point_in_scatter_orientation():
    decode = lambda z: jnp.stack([z[:, 0], z[:, 1], z[:, 0] * z[:, 1]], axis=1)  # (B, 3) "images"
    values = repro_vae.latent_values(4)
    np.testing.assert_allclose(values, -values[::-1], atol=1e-12)  # symmetric quantiles
    np.testing.assert_allclose(values[[0, -1]], [-1.6448536, 1.6448536], atol=1e-6)
    grid = repro_vae.latent_grid(decode, values)
    assert grid.shape == (4, 4, 3)
    for i in range(4):
        for j in range(4):
            np.testing.assert_allclose(grid[i, j, :2], [values[j], values[3 - i]], rtol=1e-6)
    assert grid[0, 0, 1] > grid[-1, 0, 1]  # top row has the largest z2


def test_latent_grid_with_a_vae_decoder_has_image_shape(tiny_vae):
    model, params = tiny_vae
    _, decode = repro_vae.bind(model, params)
    grid = repro_vae.latent_grid(decode, repro_vae.latent_values(3))
    assert grid.shape == (3, 3, 6) and np.all((grid >= 0) & (grid <= 1))


def test_first_per_class_is_balanced_fixed_and_takes_the_earliest():
    labels = _labels()
    idx = repro_vae.first_per_class(labels, 50)
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=10), np.full(10, 5))
    for c in range(10):
        np.testing.assert_array_equal(idx[labels[idx] == c], np.flatnonzero(labels == c)[:5])
    with pytest.raises(ValueError):
        repro_vae.first_per_class(labels, 55)


def test_active_units_counts_dimensions_that_vary():
    rng = np.random.default_rng(0)
    means = np.concatenate([rng.normal(size=(500, 3)), 1e-3 * rng.normal(size=(500, 4)),
                            np.full((500, 1), 7.0)], axis=1)
    assert repro_vae.active_units(means) == 3


def test_fixed_binarization_is_binary_and_repeatable():
    x = np.random.default_rng(0).uniform(size=(200, 6)).astype(np.float32)
    a, b = repro_vae.fixed_binarization(x, 1), repro_vae.fixed_binarization(x, 1)
    np.testing.assert_array_equal(a, b)
    assert set(np.unique(a)) <= {0.0, 1.0}
    assert not np.array_equal(a, repro_vae.fixed_binarization(x, 2))
    assert abs(a.mean() - x.mean()) < 0.05


def test_mean_elbo_matches_the_per_example_elbo(tiny_vae):
    from aejax import vae

    model, params = tiny_vae
    x = (np.random.default_rng(1).uniform(size=(20, 6)) > 0.5).astype(np.float32)
    rng = jax.random.PRNGKey(3)
    got = repro_vae.mean_elbo(model, params, x, rng, num_samples=2, batch_size=10)
    elbo = jax.jit(lambda xb, key: vae.elbo(model, params, xb, key, num_samples=2))
    want = np.concatenate([np.asarray(elbo(jnp.asarray(x[i:i + 10]), jax.random.fold_in(rng, b)))
                           for b, i in enumerate(range(0, 20, 10))]).mean()
    np.testing.assert_allclose(got, want, rtol=1e-5)


# --------------------------------------------------------------------------- generation


def test_fit_gaussian_recovers_mean_and_covariance():
    rng = np.random.default_rng(0)
    mean = np.array([1.0, -2.0, 0.5])
    a = rng.normal(size=(3, 3))
    cov = a @ a.T + 0.5 * np.eye(3)
    codes = rng.multivariate_normal(mean, cov, size=200_000)
    m, c = repro_generation.fit_gaussian(codes)
    np.testing.assert_allclose(m, mean, atol=0.02)
    np.testing.assert_allclose(c, cov, atol=0.05 * np.abs(cov).max())


def test_gaussian_log_prob_matches_scipy_and_sampling_matches_the_fit():
    rng = np.random.default_rng(1)
    mean = np.array([0.3, -1.0])
    cov = np.array([[2.0, 0.6], [0.6, 0.5]])
    x = rng.normal(size=(5, 2))
    np.testing.assert_allclose(repro_generation.gaussian_log_prob(x, mean, cov),
                               multivariate_normal(mean, cov).logpdf(x), rtol=1e-10)
    draws = repro_generation.sample_gaussian(rng, mean, cov, 100_000)
    m, c = repro_generation.fit_gaussian(draws)
    np.testing.assert_allclose(m, mean, atol=0.02)
    np.testing.assert_allclose(c, cov, atol=0.03)


def test_fit_gaussian_survives_a_dead_unit_and_rejects_bad_shapes():
    codes = np.random.default_rng(0).normal(size=(100, 3))
    codes[:, 1] = 0.0
    mean, cov = repro_generation.fit_gaussian(codes)
    assert np.all(np.isfinite(repro_generation.gaussian_log_prob(codes, mean, cov)))
    with pytest.raises(ValueError):
        repro_generation.fit_gaussian(np.zeros(10))


def test_mixture_beats_one_gaussian_on_two_clusters():
    rng = np.random.default_rng(0)
    centers = np.array([[-4.0, 0.0], [4.0, 0.0]])
    codes = centers[rng.integers(0, 2, 2000)] + 0.3 * rng.normal(size=(2000, 2))
    val = centers[rng.integers(0, 2, 500)] + 0.3 * rng.normal(size=(500, 2))
    gmm, scores = repro_generation.fit_mixtures(codes, val, (1, 2, 4), seed=0)
    assert set(scores) == {1, 2, 4} and gmm.n_components in (2, 4)
    mean, cov = repro_generation.fit_gaussian(codes)
    gauss = repro_generation.gaussian_log_prob(val, mean, cov).mean()
    np.testing.assert_allclose(scores[1], gauss, rtol=1e-3)  # one component is the Gaussian fit
    assert scores[gmm.n_components] > gauss + 1.0


def test_decode_codes_gives_images_in_the_unit_interval():
    model = models.MLPAutoencoder(input_shape=(6,), hidden=(4,), code_size=2)
    params = models.init(model, jax.random.PRNGKey(0), jnp.zeros((1, 6)))
    out = repro_generation.decode_codes(model, params, np.zeros((3, 2)))
    assert out.shape == (3, 6) and np.all((out > 0) & (out < 1))


# --------------------------------------------------------------------------- repro_iwae


def test_burda_configs_differ_only_in_the_objective():
    from experiments import repro_iwae

    assert [repro_iwae.epochs_of(i) for i in range(5)] == [1, 4, 13, 40, 121]
    a = repro_iwae.burda_config("vae", 2, stages=4, batch_size=20)
    b = repro_iwae.burda_config("iwae5", 2, stages=4, batch_size=20)
    assert (a.num_epochs, a.batch_size, a.seed, a.optimizer.eps, a.optimizer.schedule) == (
        121, 20, 2, 1e-4, "burda")
    assert a.model == b.model and a.optimizer == b.optimizer and a.data == b.data
    assert a.loss.terms.to_dict() == {"kl": {"weight": 1.0}}
    assert b.loss.reconstruction_weight == 0.0 and b.loss.terms.iwae.num_samples == 5
    with pytest.raises(ValueError, match="Unknown arm"):
        repro_iwae.burda_config("wae", 0, stages=1, batch_size=20)


def test_an_evaluation_is_kept_and_read_back_and_the_record_validates(tiny_vae, tmp_path):
    from experiments import repro_iwae
    from experiments import results as records

    model, params = tiny_vae
    x_bin = (np.random.default_rng(1).uniform(size=(30, 6)) > 0.5).astype(np.float32)
    first = repro_iwae.evaluate(model, params, x_bin, 10, str(tmp_path), 40)
    again = repro_iwae.evaluate(model, params, x_bin, 10, str(tmp_path), 40)
    assert "seconds" in first and "seconds" not in again  # read back, not recomputed
    longer = repro_iwae.evaluate(model, params, x_bin, 10, str(tmp_path), 121)
    assert "seconds" in longer  # a longer schedule is evaluated afresh, not read back
    assert first["mean"] == again["mean"] and first["images"] == len(x_bin) and first["se"] > 0
    runs = [{"arm": arm, "seed": s, "train_seconds": 1.0, "active_units": 3 + s,
             "nll": {str(k): {"mean": 100.0 - k / 1000 + s, "se": 0.1} for k in repro_iwae.KS}}
            for s in (0, 1, 2) for arm in repro_iwae.ARMS]
    rec = records.validate(repro_iwae.make_record(
        {"runs": runs, "stages": 3, "epochs": 40, "batch_size": 100}), "iwae.json")
    assert len(rec["arms"]) == 2 * (len(repro_iwae.KS) + 1) and len(rec["comparisons"]) == 4
    assert rec["arms"]["VAE: NLL, k = 5000"]["values"] == [95.0, 96.0, 97.0]
