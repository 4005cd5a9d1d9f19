"""The conditional VAE: its bound against NumPy, and the labels reaching it through the loop."""

import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from aejax import models, objectives, step, vae
from aejax.data import batching
from aejax.data import splits as data_splits
from aejax.runtime import config as run_config
from aejax.runtime import trainer

from conftest import low_rank_images


def small_cvae(dim=6, classes=3):
    return models.create("cvae", input_shape=(dim,), hidden=(5,), latent_size=2,
                         num_classes=classes, activation="tanh")


def numpy_log_weights(params, x, y, eps, classes):
    """``log p(x|z, y) + log p(z) - log q(z|x, y)`` of a one-hidden-layer tanh CVAE, in NumPy."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    dense = lambda h, name: h @ p[name]["kernel"] + p[name]["bias"]
    onehot = np.eye(classes)[y]
    h = np.tanh(dense(np.concatenate([x, onehot], 1), "encoder_0"))
    mean, logvar = dense(h, "encoder_mean"), dense(h, "encoder_logvar")
    out = []
    for e in eps:
        z = mean + np.exp(0.5 * logvar) * e
        logits = dense(np.tanh(dense(np.concatenate([z, onehot], 1), "decoder_0")), "decoder_out")
        log_lik = (x * -np.logaddexp(0, -logits) + (1 - x) * -np.logaddexp(0, logits)).sum(1)
        log_prior = (-0.5 * z ** 2 - 0.5 * math.log(2 * math.pi)).sum(1)
        log_q = (-0.5 * e ** 2 - 0.5 * math.log(2 * math.pi) - 0.5 * logvar).sum(1)
        out.append(log_lik + log_prior - log_q)
    return np.stack(out)


def test_conditional_bound_matches_numpy_and_depends_on_the_label():
    model = small_cvae()
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 6)), jnp.float32)
    y = np.array([0, 1, 2, 1], np.int32)
    params = models.init(model, jax.random.PRNGKey(3), x)
    rng, k = jax.random.PRNGKey(7), 5
    got = vae.log_weights(model, params, x, rng, k, condition=y)
    # sample k is fold_in(rng, k)'s normal draw (aejax.vae's documented noise)
    eps = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(rng, i), (4, 2)), np.float64)
                    for i in range(k)])
    want = numpy_log_weights(params, np.asarray(x, np.float64), y, eps, 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    other = vae.log_weights(model, params, x, rng, k, condition=(y + 1) % 3)
    assert np.abs(np.asarray(other) - want).max() > 1e-3
    # the training objective: reconstruction + KL = -ELBO, with the labels from the batch
    per_example = step.make_per_example_fn(model, objectives.build("bce", {"kl": {"weight": 1.0}}))
    total, metrics = per_example(params, {"x": x, "y": jnp.asarray(y)}, jax.random.PRNGKey(0), 0)
    np.testing.assert_allclose(total, -metrics["elbo"], rtol=1e-6)


def test_a_conditional_model_refuses_to_run_without_labels():
    model = small_cvae()
    x = jnp.full((2, 6), 0.5)
    params = models.init(model, jax.random.PRNGKey(0), x)
    per_example = step.make_per_example_fn(model, objectives.build("bce", {"kl": {"weight": 1.0}}))
    with pytest.raises(ValueError, match=r"conditional model; pass the examples' labels \(condition=y; in a batch, batch\['y'\]\)"):
        per_example(params, {"x": x}, jax.random.PRNGKey(0), 0)
    with pytest.raises(ValueError, match=r"aejax.vae: CVAE is a conditional model; pass the examples' labels"):
        vae.evaluate_nll(model, params, x, jax.random.PRNGKey(0), num_samples=2)
    with pytest.raises(ValueError, match=r"labels must be integers of shape \(2,\)"):
        models.encoder(model, params, jnp.zeros(3, jnp.int32))(x)


def labelled_splits(classes=4):
    """Low-rank images whose label is the sign pattern of two of their latent coordinates."""
    x = low_rank_images(1536)
    y = ((x[:, 0] > np.median(x[:, 0])) * 2 + (x[:, 1] > np.median(x[:, 1]))).astype(np.int32)
    return data_splits.Splits((x[:1024], y[:1024]), (x[1024:1280], y[1024:1280]),
                              (x[1280:], y[1280:]))


def cvae_config(**data):
    c = run_config.default_config()
    c.model = ml_collections.ConfigDict(dict(
        name="cvae", input_shape=(64,), hidden=(16,), latent_size=2, num_classes=4,
        activation="tanh"))
    c.loss.terms = ml_collections.ConfigDict({"kl": {"weight": 1.0}})
    c.num_epochs, c.batch_size, c.eval_batch_size = 1, 64, 100
    c.log_every_steps, c.checkpoint_every_steps = 5, 7
    c.progress, c.figures, c.pca_baseline = False, False, False
    c.iwae_samples = 4
    c.data.update(data)
    return c


@pytest.mark.parametrize("on_device", [True, False])
def test_the_loop_gives_each_batch_its_labels(on_device, tmp_path):
    """A run's parameters = the pure step on the epoch's batches of images *and* labels."""
    splits = labelled_splits()
    config = cvae_config(on_device=on_device)
    summary = trainer.train_and_evaluate(config, str(tmp_path), splits=splits)
    exp = trainer.build_experiment(config, splits)
    init_rng, data_rng, train_rng, _ = jax.random.split(jax.random.PRNGKey(config.seed), 4)
    (x, y), bs = splits.train, config.batch_size
    params = models.init(exp.model, init_rng, jnp.asarray(x[:bs]))
    state = step.TrainState.create(params, exp.tx)
    perm = np.asarray(batching.epoch_permutation(data_rng, len(x), 0))
    train_step = jax.jit(step.make_train_step(exp.per_example, exp.tx))
    for b in range(exp.steps_per_epoch):
        rows = perm[b * bs:(b + 1) * bs]
        state, _ = train_step(state, {"x": x[rows], "y": y[rows]}, train_rng)
    got = trainer.load_best_params(str(tmp_path))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got,
                 state.params)
    # the test NLL is the conditional one: -log p(x|y), given the test labels
    want = vae.evaluate_nll(exp.model, got, splits.test[0], jax.random.PRNGKey(config.seed + 2),
                            num_samples=4, batch_size=100, condition=splits.test[1])
    np.testing.assert_allclose(summary["test"]["iwae_nll"], want, rtol=1e-6)


def test_class_samples_figure_and_generation_of_every_class(fashion_data_dir, tmp_path):
    s = data_splits.load("fashion_mnist", validation_size=200, flat=True)
    splits = data_splits.Splits((s.train[0][:500], s.train[1][:500]), s.validation,
                                (s.test[0][:100], s.test[1][:100]))
    config = cvae_config()
    config.model.update(input_shape=(784,), num_classes=10)
    config.data.binarize, config.figures, config.batch_size = True, True, 50
    summary = trainer.train_and_evaluate(config, str(tmp_path), splits=splits)
    assert "class_samples.png" in summary["figures"]
    assert os.path.getsize(tmp_path / "class_samples.png") > 10_000
    assert np.isfinite(summary["test"]["iwae_nll"])
    labels = trainer.class_labels(models.from_config(config.model), 25)
    np.testing.assert_array_equal(labels, np.arange(25) % 10)
