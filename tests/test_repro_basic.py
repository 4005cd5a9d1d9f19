"""Tests of the reproduction scripts' computations (linear AE vs PCA, denoising, sparse, upscaling).

Small synthetic data only; the full runs are the scripts' own (`python -m experiments.repro_*`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aejax import corruptions, models, objectives, pca, step
from experiments import repro_denoising, repro_linear_pca, repro_sparse, repro_upscaling

from conftest import low_rank_images


def low_rank_gaussian(n: int = 1024, dim: int = 20, rank: int = 3, seed: int = 0) -> np.ndarray:
    """Rank-3 data with well separated variances (9, 4, 2.25) plus isotropic noise (std 0.2)."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(dim, rank)))
    z = rng.normal(size=(n, rank)) * np.array([3.0, 2.0, 1.5])
    return (z @ basis.T + 0.5 + 0.2 * rng.normal(size=(n, dim))).astype(np.float32)


# --------------------------------------------------------------------------- linear AE vs PCA


def test_principal_angles_known_geometry_and_basis_invariance():
    t = np.deg2rad(30.0)
    e = np.eye(5)
    a = e[:, :2]
    b = np.stack([e[:, 0], np.cos(t) * e[:, 1] + np.sin(t) * e[:, 2]], axis=1)
    np.testing.assert_allclose(repro_linear_pca.principal_angles(a, b), [0.0, 30.0], atol=1e-6)
    # Any basis of the same subspaces gives the same angles.
    mix = np.array([[2.0, 1.0], [0.5, -3.0]])
    np.testing.assert_allclose(repro_linear_pca.principal_angles(a @ mix, b @ mix.T), [0.0, 30.0],
                               atol=1e-6)
    with pytest.raises(ValueError, match="expected"):
        repro_linear_pca.principal_angles(a, np.ones((4, 2)))


def test_linear_autoencoder_reaches_pca_error_and_subspace():
    x = low_rank_gaussian()
    k = 3
    fitted, wider = pca.fit(x, k), pca.fit(x, k + 1)
    # 1600 Adam steps: gaps of 0.02-0.13% and angles under 0.1 degree on data seeds 0-3.
    model, params, _ = repro_linear_pca.train_linear_autoencoder(
        x, k, epochs=200, learning_rate=3e-2, batch_size=128)
    out = repro_linear_pca.compare_with_pca(model, params, fitted, x, x_train=x, wider=wider)
    assert out["relative_gap"] < 0.01, out
    assert out["max_angle_deg"]["decoder_rows"] < 2.0, out["principal_angles_deg"]
    assert out["max_angle_deg"]["covariance_times_encoder"] < 2.0, out["principal_angles_deg"]
    # The units themselves are not the components: the angles are of subspaces, not of vectors.
    assert len(out["unit_to_nearest_component_angle_deg"]) == k


def test_linear_autoencoder_subspaces_orientation():
    model = repro_linear_pca.make_model(6, 2)
    params = models.init(model, jax.random.PRNGKey(0), jnp.zeros((1, 6)))
    spaces = repro_linear_pca.subspaces(model, params, covariance=np.eye(6))
    assert spaces["decoder_rows"].shape == (6, 2)
    np.testing.assert_allclose(spaces["decoder_rows"], np.asarray(params["decoder_0"]["kernel"]).T,
                               rtol=1e-6)
    np.testing.assert_allclose(spaces["encoder_columns"], np.asarray(params["encoder_0"]["kernel"]),
                               rtol=1e-6)
    np.testing.assert_allclose(spaces["covariance_times_encoder"], spaces["encoder_columns"])


# --------------------------------------------------------------------------- denoising


def _tiny_denoiser(dim=64, seed=0):
    model = repro_denoising.make_model(dim, hidden=(16,), code_size=4)
    params = models.init(model, jax.random.PRNGKey(seed), jnp.zeros((1, dim)))
    return model, params


def test_denoising_evaluation_feeds_corrupted_input_and_scores_clean_target():
    x = low_rank_images(300)
    model, params = _tiny_denoiser()
    corrupt = corruptions.masking(0.5)
    got = repro_denoising.noisy_test_error(model, params, x, corrupt)
    noisy = repro_denoising.corrupted(x, corrupt)  # the draws of the first (here: only) batch
    assert not np.allclose(noisy, x)
    reconstruct = jax.jit(lambda v: jax.nn.sigmoid(model.apply({"params": params}, v)[0]))
    recon = np.asarray(reconstruct(jnp.asarray(noisy)))
    np.testing.assert_allclose(got, np.square(recon - x).sum(1).mean(), rtol=1e-5)
    # Neither the clean input nor the noisy target.
    clean_recon = np.asarray(reconstruct(jnp.asarray(x)))
    assert not np.isclose(got, np.square(clean_recon - x).sum(1).mean(), rtol=1e-3)
    assert not np.isclose(got, np.square(recon - noisy).sum(1).mean(), rtol=1e-3)
    # Doing nothing: the error of the noisy input itself, same draws.
    np.testing.assert_allclose(repro_denoising.input_error(x, corrupt),
                               np.square(noisy - x).sum(1).mean(), rtol=1e-5)


# --------------------------------------------------------------------------- sparse


def test_code_statistics_against_numpy():
    codes = np.array([[0.0, 2.0, 0.0], [0.0, 4.0, 1.0]])
    s = repro_sparse.code_statistics(codes)
    assert s["mean_activation"] == pytest.approx(7.0 / 6.0)
    assert s["fraction_zero"] == pytest.approx(3.0 / 6.0)
    assert s["dead_units"] == 1
    assert s["mean_unit_activation_max"] == pytest.approx(3.0)


def test_ngs_objective_is_half_the_summed_squared_error_plus_beta_kl_scaled_by_2_over_d():
    d, beta = 64, 3.0
    model, terms = repro_sparse.make_setting("ng", beta, input_dim=d)
    x = jnp.asarray(low_rank_images(32))
    params = models.init(model, jax.random.PRNGKey(0), x)
    per_example = step.make_per_example_fn(
        model, objectives.build(repro_sparse.RECONSTRUCTION["ng"], terms))
    loss = float(np.mean(np.asarray(per_example(params, {"x": x}, jax.random.PRNGKey(1), 0)[0])))
    code = np.asarray(model.apply({"params": params}, x, method="encode"), np.float64)
    out = 1 / (1 + np.exp(-np.asarray(model.apply({"params": params}, x)[0], np.float64)))
    rho_hat, rho = code.mean(0), repro_sparse.RHO
    kl = np.sum(rho * np.log(rho / rho_hat) + (1 - rho) * np.log((1 - rho) / (1 - rho_hat)))
    ng = 0.5 * np.sum((out - np.asarray(x)) ** 2, axis=1).mean() + beta * kl
    assert loss == pytest.approx(2 / d * ng, rel=1e-4)


def test_sparse_settings_and_the_l1_penalty_lowers_mean_activation():
    for kind in ("l1", "kl", "ng"):
        model, terms = repro_sparse.make_setting(kind, 1.0, input_dim=64)
        x = jnp.asarray(low_rank_images(32))
        params = models.init(model, jax.random.PRNGKey(0), x)
        objectives.check_compatible(model, params, x, terms)  # KL needs sigmoid units
    with pytest.raises(ValueError, match="Unknown sparsity"):
        repro_sparse.make_setting("l2", 1.0)
    x = low_rank_images(512)
    means = []
    for weight in (0.0, 1.0):
        model, params, _ = repro_sparse.train_sparse("l1", weight, x, epochs=3, learning_rate=3e-3)
        codes = model.apply({"params": params}, jnp.asarray(x), method=model.encode)
        means.append(repro_sparse.code_statistics(codes)["mean_activation"])
    assert means[1] < 0.7 * means[0], means


# --------------------------------------------------------------------------- upscaling


def test_downsample_corruption_is_a_numpy_block_average_upsampled():
    x = np.random.default_rng(0).random((3, 784)).astype(np.float32)
    blocks = x.reshape(3, 14, 2, 14, 2).mean(axis=(2, 4))
    expected = np.repeat(np.repeat(blocks, 2, axis=1), 2, axis=2).reshape(3, 784)
    got = jax.jit(repro_upscaling.downsample_nearest)(jax.random.PRNGKey(0), jnp.asarray(x))
    assert got.shape == x.shape and got.dtype == x.dtype
    np.testing.assert_allclose(got, expected, atol=1e-6)
    nhwc = repro_upscaling.downsample_nearest(None, jnp.asarray(x).reshape(3, 28, 28, 1))
    assert nhwc.shape == (3, 28, 28, 1)
    np.testing.assert_allclose(np.asarray(nhwc).reshape(3, 784), expected, atol=1e-6)
    np.testing.assert_allclose(repro_upscaling.downsample(jnp.asarray(x))[..., 0], blocks, atol=1e-6)
    with pytest.raises(ValueError, match="square"):
        repro_upscaling.downsample_nearest(None, jnp.zeros((2, 30)))


def test_psnr_against_numpy():
    rng = np.random.default_rng(1)
    y, t = rng.random((4, 28, 28, 1)), rng.random((4, 28, 28, 1))
    expected = 10 * np.log10(1.0 / ((y - t) ** 2).reshape(4, -1).mean(1))
    got = jax.jit(repro_upscaling.psnr)(jnp.asarray(y, jnp.float32), jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(repro_upscaling.psnr(jnp.asarray(y), jnp.asarray(t), peak=2.0),
                               expected + 20 * np.log10(2.0), rtol=1e-5)
    with pytest.raises(ValueError, match="shapes differ"):
        repro_upscaling.psnr(jnp.zeros((2, 4)), jnp.zeros((2, 5)))


def test_baselines_bicubic_exact_on_smooth_images_and_nearest_matches_corruption():
    # Bicubic interpolation reproduces a constant image; nearest equals the training corruption.
    const = np.full((5, 784), 0.25, np.float32)
    up = repro_upscaling.upscalings(None, None, const)
    np.testing.assert_allclose(up["bicubic"], const, atol=1e-6)
    x = np.random.default_rng(2).random((5, 784)).astype(np.float32)
    up = repro_upscaling.upscalings(None, None, x)
    np.testing.assert_allclose(up["nearest"], repro_upscaling.downsample_nearest(None, jnp.asarray(x)))
    assert up["bicubic"].min() >= 0.0 and up["bicubic"].max() <= 1.0
    table = repro_upscaling.psnr_table(None, None, x, batch=2)  # batches of 2, 2, 1
    np.testing.assert_allclose(table["nearest"]["squared_error_per_image"],
                               np.square(up["nearest"] - x).sum(1).mean(), rtol=1e-5)
    np.testing.assert_allclose(
        table["bicubic"]["psnr_db"],
        np.mean(10 * np.log10(1.0 / np.square(up["bicubic"] - x).mean(1))), rtol=1e-5)


# --------------------------------------------------------------------------- greedy stacking


def test_stacking_control_gets_every_pretraining_epoch_and_the_record_validates():
    from experiments import repro_stacking, results

    stacked, scratch = repro_stacking.configs("relu", 4)
    stages = len(stacked.model.hidden) + 1
    assert scratch.num_epochs == stacked.num_epochs + stages * stacked.stacking.pretrain_epochs
    assert scratch.stacking.pretrain_epochs == 0 and scratch.seed == stacked.seed == 4
    assert scratch.model.to_dict() == stacked.model.to_dict() and scratch.model.activation == "relu"
    runs = [dict(activation=a, seed=s, stacked=10.0 + s / 10, scratch=12.0 + s / 10 + (a == "relu"),
                 scratch_epochs_run=19, seconds=1.0)
            for a in repro_stacking.ACTIVATIONS for s in (0, 1, 2)]
    out = {"pretrain_epochs": 3, "finetune_epochs": 10, "scratch_epochs": 19, "runs": runs}
    record = results.validate(repro_stacking.make_record(out), "stacking.json")
    assert record["arms"]["pretrained stack, sigmoid"]["values"] == [10.0, 10.1, 10.2]
    assert [v.outcome for v in results.verdicts(record)] == ["holds", "holds"]
    text = repro_stacking.section(out, record)
    assert text.count("| relu |") == 3 and "| +0.00 |" not in text and text.count("**holds (p") == 2
