"""Models: shapes, named activations, encode/decode on their own, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aejax import models


@pytest.mark.parametrize("hidden,code", [((), 64), ((128,), 32), ((1000, 500, 250), 30)])
def test_mlp_shapes_and_layers(hidden, code):
    model = models.MLPAutoencoder(hidden=hidden, code_size=code)
    x = jnp.ones((3, 784))
    params = models.init(model, jax.random.PRNGKey(0), x)
    dims = (784, *hidden, code)
    for i in range(len(dims) - 1):
        assert params[f"encoder_{i}"]["kernel"].shape == (dims[i], dims[i + 1])
    (logits, z), state = model.apply({"params": params}, x, mutable=["intermediates"])
    assert logits.shape == (3, 784) and z.shape == (3, code)
    names = set(state["intermediates"])
    assert {"code", *(f"hidden_{i}" for i in range(len(hidden)))} <= names
    # encode / decode alone compose to the full model.
    z2 = model.apply({"params": params}, x, method=model.encode)
    np.testing.assert_allclose(model.apply({"params": params}, z2, method=model.decode), logits,
                               rtol=1e-6)


def test_mlp_matches_numpy_forward():
    model = models.MLPAutoencoder(input_shape=(6,), hidden=(4,), code_size=2, activation="tanh")
    x = np.random.default_rng(0).random((5, 6)).astype(np.float32)
    p = models.init(model, jax.random.PRNGKey(1), jnp.asarray(x))
    np_p = jax.tree.map(np.asarray, p)
    h = np.tanh(x @ np_p["encoder_0"]["kernel"] + np_p["encoder_0"]["bias"])
    z = h @ np_p["encoder_1"]["kernel"] + np_p["encoder_1"]["bias"]
    d = np.tanh(z @ np_p["decoder_0"]["kernel"] + np_p["decoder_0"]["bias"])
    out = d @ np_p["decoder_1"]["kernel"] + np_p["decoder_1"]["bias"]
    logits, code = model.apply({"params": p}, jnp.asarray(x))
    np.testing.assert_allclose(code, z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits, out, rtol=1e-5, atol=1e-6)


def test_tied_model_has_half_the_matrices():
    untied = models.init(models.MLPAutoencoder(), jax.random.PRNGKey(0), jnp.ones((1, 784)))
    tied = models.init(models.MLPAutoencoder(tied=True), jax.random.PRNGKey(0), jnp.ones((1, 784)))
    mats = lambda p: sum(a.size for a in jax.tree.leaves(p) if a.ndim == 2)
    assert 2 * mats(tied) == mats(untied)


@pytest.mark.parametrize("upsampling", ["nearest", "transpose"])
def test_conv_autoencoder_shapes(upsampling):
    model = models.ConvAutoencoder(upsampling=upsampling)
    x = jnp.ones((2, 28, 28, 1))
    params = models.init(model, jax.random.PRNGKey(0), x)
    logits, code = model.apply({"params": params}, x)
    assert logits.shape == (2, 28, 28, 1) and code.shape == (2, 128)


def test_vae_shapes_and_reparameterization():
    model = models.VAE(latent_size=3, hidden=(16,))
    x = jnp.full((4, 784), 0.5)
    params = models.init(model, jax.random.PRNGKey(0), x)
    logits, z, mean, logvar = model.apply({"params": params}, x, jax.random.PRNGKey(1))
    eps = jax.random.normal(jax.random.PRNGKey(1), mean.shape)
    np.testing.assert_allclose(z, mean + jnp.exp(0.5 * logvar) * eps, rtol=1e-6)
    assert logits.shape == (4, 784)


def test_bad_inputs_are_clear_errors():
    model = models.MLPAutoencoder()
    params = models.init(model, jax.random.PRNGKey(0), jnp.ones((1, 784)))
    with pytest.raises(ValueError, match=r"expected inputs of shape \(B, 784\).*flat=True"):
        model.apply({"params": params}, jnp.ones((2, 28, 28, 1)))
    with pytest.raises(TypeError, match="floating dtype"):
        model.apply({"params": params}, jnp.ones((2, 784), jnp.uint8))
    with pytest.raises(ValueError, match=r"codes of shape \(B, 32\)"):
        model.apply({"params": params}, jnp.ones((2, 31)), method=model.decode)
    with pytest.raises(ValueError, match="Unknown activation 'swish2'"):
        models.init(models.MLPAutoencoder(activation="swish2"), jax.random.PRNGKey(0),
                    jnp.ones((1, 784)))
    with pytest.raises(ValueError, match="Unknown model 'rbm'"):
        models.create("rbm")
    with pytest.raises(ValueError, match=r"no option\(s\) \['depth'\]"):
        models.create("mlp", depth=3)
