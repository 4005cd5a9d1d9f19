"""Tests of aejax.runtime.fit: the in-memory loop on the fused step, and evaluation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aejax import corruptions, models, objectives, step
from aejax.data import batching
from aejax.runtime import fit
from aejax.runtime.placement import Placement

from conftest import low_rank_images


def tiny_model(dim=64):
    return models.MLPAutoencoder(input_shape=(dim,), hidden=(16,), code_size=4)


def test_evaluate_masks_padding_across_batches():
    x = low_rank_images(250)
    model = tiny_model()
    params = models.init(model, jax.random.PRNGKey(0), jnp.zeros((1, 64)))
    per_example = step.make_per_example_fn(model, objectives.build("bce", {}))
    got = fit.evaluate(per_example, params, x, batch_size=100)  # 3 batches, 50 padded
    recon = jax.jit(lambda v: jax.nn.sigmoid(model.apply({"params": params}, v)[0]))(x)
    np.testing.assert_allclose(got["squared_error_per_image"], np.square(recon - x).sum(1).mean(),
                               rtol=1e-5)


def test_fit_lowers_the_loss_repeats_exactly_and_stops_on_nan():
    x = low_rank_images(256)
    model = tiny_model()
    params = models.init(model, jax.random.PRNGKey(0), jnp.zeros((1, 64)))
    per_example = step.make_per_example_fn(model, objectives.build("bce", {}),
                                           corrupt=corruptions.gaussian(0.3))
    tx = optax.adam(3e-3)
    runs = [fit.fit(per_example, params, tx, x, epochs=3, batch_size=32) for _ in range(2)]
    (p1, h1), (p2, h2) = runs
    assert h1[-1] < h1[0]
    assert h1 == h2
    jax.tree.map(np.testing.assert_array_equal, p1, p2)
    jax.tree.map(lambda a: a.block_until_ready(), params)  # the caller's params survive donation
    nan_params = jax.tree.map(lambda p: p * jnp.nan, params)
    with pytest.raises(step.NonFiniteLossError, match=r"Non-finite loss at step 0 \(non-finite: "
                                                      r".*reconstruction"):
        fit.fit(per_example, nan_params, tx, x, epochs=1, batch_size=32)


def test_fit_is_the_pure_step_on_the_epochs_batches():
    """One epoch of fit = the pure step, jitted, on batches b of the epoch's permutation."""
    x = low_rank_images(96)
    model = tiny_model()
    params = models.init(model, jax.random.PRNGKey(0), jnp.zeros((1, 64)))
    per_example = step.make_per_example_fn(model, objectives.build("bce", {}),
                                           corrupt=corruptions.masking(0.2))
    tx = optax.adam(1e-2)
    got, history = fit.fit(per_example, params, tx, x, epochs=1, batch_size=32, seed=5)
    data_key, step_key = jax.random.split(jax.random.PRNGKey(5))
    perm = np.asarray(batching.epoch_permutation(data_key, 96, 0))
    train_step = jax.jit(step.make_train_step(per_example, tx))
    state, losses = step.TrainState.create(params, tx), []
    for b in range(3):
        state, metrics = train_step(state, {"x": x[perm[b * 32:(b + 1) * 32]]}, step_key)
        losses.append(float(metrics["loss"]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got,
                 state.params)
    np.testing.assert_allclose(history[0], np.mean(losses), rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(epochs=-1), "epochs must be an integer >= 0"),
    (dict(epochs=1.5), "epochs must be an integer >= 0"),
    (dict(epochs=1, batch_size=0), "batch_size must be an integer >= 1"),
    (dict(epochs=1, x_train=np.zeros((0, 64), np.float32)), "x_train is empty"),
    (dict(epochs=1, x_train=np.floor(low_rank_images(64) * 255)), "scale images to"),
])
def test_fit_refuses_bad_arguments(kwargs, match):
    model = tiny_model()
    params = models.init(model, jax.random.PRNGKey(0), jnp.zeros((1, 64)))
    per_example = step.make_per_example_fn(model, objectives.build("bce", {}))
    kwargs = dict(kwargs)
    x_train = kwargs.pop("x_train", low_rank_images(64))
    with pytest.raises(ValueError, match=match):
        fit.fit(per_example, params, optax.sgd(0.1), x_train, **kwargs)
    with pytest.raises(ValueError, match="scale images to floats"):
        fit.fit(per_example, params, optax.sgd(0.1),
                (low_rank_images(64) * 255).astype(np.uint8), epochs=1)


class SigmoidAE(nn.Module):
    """A user's model in a few lines: the protocol, no dense_layers (so 'best' means 'auto')."""

    @nn.compact
    def __call__(self, x):
        code = self.encode(x)
        return nn.Dense(x.shape[-1], name="out")(nn.sigmoid(code)), {"code": code}

    @nn.compact
    def encode(self, x):
        h = nn.sigmoid(nn.Dense(8, name="hidden")(x))
        self.sow("intermediates", "hidden_0", h)
        return nn.Dense(3, name="code")(h)


def test_a_users_model_trains_with_fit_and_every_term():
    x = low_rank_images(256)
    model = SigmoidAE()
    params = models.init(model, jax.random.PRNGKey(0), jnp.asarray(x[:2]))
    objective = objectives.build("bce", {"contractive": {"weight": 0.1, "mode": "best"},
                                         "l1": {"weight": 1e-3},
                                         "kl_sparsity": {"weight": 0.1, "layer": "hidden_0"}})
    objectives.check_compatible(model, params, jnp.asarray(x[:64]),
                                {"kl_sparsity": {"layer": "hidden_0"}})
    per_example = step.make_per_example_fn(model, objective)
    trained, history = fit.fit(per_example, params, optax.adam(1e-2), x, epochs=5, batch_size=64)
    assert history[-1] < history[0]
    before = fit.evaluate(per_example, params, x)
    after = fit.evaluate(per_example, trained, x)
    assert after["reconstruction"] < before["reconstruction"]
    assert set(after) >= {"reconstruction", "contractive", "l1", "kl_sparsity", "loss"}
