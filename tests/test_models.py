"""Models: shapes, named activations, encode/decode on their own, and bad input."""

import flax.linen as nn
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
    (logits, aux), state = model.apply({"params": params}, x, mutable=["intermediates"])
    z = aux["code"]
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
    logits, aux = model.apply({"params": p}, jnp.asarray(x))
    np.testing.assert_allclose(aux["code"], z, rtol=1e-5, atol=1e-6)
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
    logits, aux = model.apply({"params": params}, x)
    assert logits.shape == (2, 28, 28, 1) and aux["code"].shape == (2, 128)


def test_vae_shapes_and_reparameterization():
    model = models.VAE(latent_size=3, hidden=(16,))
    x = jnp.full((4, 784), 0.5)
    params = models.init(model, jax.random.PRNGKey(0), x)
    logits, aux = model.apply({"params": params}, x, rngs={"sample": jax.random.PRNGKey(1)})
    z, mean, logvar = aux["code"], aux["mean"], aux["logvar"]
    # z - mean is exp(logvar / 2) times standard normal noise drawn from the "sample" stream.
    eps = (z - mean) / jnp.exp(0.5 * logvar)
    assert abs(float(eps.mean())) < 1.5 and 0.2 < float(eps.std()) < 3.0
    again, _ = model.apply({"params": params}, x, rngs={"sample": jax.random.PRNGKey(1)})
    np.testing.assert_array_equal(logits, again)  # the same key, the same draw
    other = model.apply({"params": params}, x, rngs={"sample": jax.random.PRNGKey(2)})[1]["code"]
    assert not np.allclose(other, z)
    np.testing.assert_array_equal(model.apply({"params": params}, x, method=model.encode), mean)
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
    with pytest.raises(ValueError, match="Unknown model 'rbm'.*register"):
        models.create("rbm")
    with pytest.raises(ValueError, match="Cannot import model 'nowhere:Model'"):
        models.create("nowhere:Model")
    with pytest.raises(ValueError, match=r"no option\(s\) \['depth'\]"):
        models.create("mlp", depth=3)


# --------------------------------------------------------------------------- the protocol


class TinyAutoencoder(nn.Module):
    """A user's own model: the protocol in a few lines, nothing from aejax.models but DenseLayer."""

    code_size: int = 3

    @nn.compact
    def __call__(self, x):
        code = self.encode(x)
        return nn.Dense(x.shape[-1], name="out")(code), {"code": code}

    @nn.compact
    def encode(self, x):
        h = nn.sigmoid(nn.Dense(5, name="first")(x))
        self.sow("intermediates", "hidden_0", h)
        return nn.Dense(self.code_size, name="second")(h)

    def dense_layers(self):
        p = self.variables["params"]
        return (models.DenseLayer(p["first"]["kernel"], p["first"]["bias"], "sigmoid"),
                models.DenseLayer(p["second"]["kernel"], p["second"]["bias"], "linear"))


@pytest.mark.parametrize("model,x", [
    (models.MLPAutoencoder(hidden=(16, 8), code_size=4), jnp.linspace(0, 1, 3 * 784).reshape(3, 784)),
    (models.MLPAutoencoder(hidden=(), code_size=4, code_activation="sigmoid", tied=True),
     jnp.linspace(0, 1, 3 * 784).reshape(3, 784)),
    (models.VAE(hidden=(8,), latent_size=2), jnp.linspace(0, 1, 3 * 784).reshape(3, 784)),
    (TinyAutoencoder(), jnp.linspace(-1, 1, 12).reshape(2, 6)),
])
def test_dense_layers_compute_the_encoder(model, x):
    params = models.init(model, jax.random.PRNGKey(0), x)
    h = x.reshape(x.shape[0], -1)
    for layer in models.dense_encoder(model, params):
        h = models.activation(layer.activation)(h @ layer.kernel + layer.bias)
    np.testing.assert_allclose(h, models.encoder(model, params)(x), rtol=1e-5, atol=1e-6)


def test_describe_and_reconstruct_follow_the_protocol():
    x = jnp.full((2, 784), 0.5)
    vae = models.VAE(hidden=(8,), latent_size=3)
    params = models.init(vae, jax.random.PRNGKey(0), x)
    d = models.describe(vae, params, x)
    assert d == models.Description(code_size=3, stochastic=True,
                                   aux=("code", "log_scale", "logvar", "mean"))
    # A stochastic model reconstructs from its posterior mean: no noise, decode(encode(x)).
    np.testing.assert_allclose(models.reconstruct_logits(vae, params, x),
                               models.decoder(vae, params)(models.encoder(vae, params)(x)), rtol=1e-6)
    conv = models.ConvAutoencoder(upsampling="unpool")
    xc = jnp.full((2, 28, 28, 1), 0.5)
    pc = models.init(conv, jax.random.PRNGKey(0), xc)
    assert models.describe(conv, pc, xc) == models.Description(128, False, ("code",))
    assert models.dense_encoder(conv, pc) is None
    np.testing.assert_array_equal(models.reconstruct_logits(conv, pc, xc), conv.apply({"params": pc}, xc)[0])


def test_register_and_create_a_users_model():
    models.register("tiny_test", TinyAutoencoder)
    try:
        assert models.create("tiny_test", code_size=2).code_size == 2
        with pytest.raises(ValueError, match="registered already"):
            models.register("tiny_test", models.VAE)
        with pytest.raises(TypeError, match="not a flax.linen Module"):
            models.register("not_a_model", dict)
    finally:
        del models.MODELS["tiny_test"]
    # "module:Class" needs no registration.
    assert models.create("tests.test_models:TinyAutoencoder", code_size=4).code_size == 4


def test_a_model_that_breaks_the_protocol_is_named():
    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(x.shape[-1])(x), nn.Dense(2)(x)  # a bare code, no aux dict

    x = jnp.ones((2, 4))
    params = Plain().init(jax.random.PRNGKey(0), x)["params"]
    with pytest.raises(TypeError, match="Plain does not follow the aejax model protocol"):
        models.forward(Plain(), params, x, jax.random.PRNGKey(0))


def test_encode_batched_equals_one_call_and_compiles_once():
    model = models.MLPAutoencoder(hidden=(8,), code_size=3)
    x = np.random.default_rng(0).random((25, 784)).astype(np.float32)
    params = models.init(model, jax.random.PRNGKey(0), jnp.asarray(x))
    np.testing.assert_allclose(models.encode_batched(model, params, x, batch_size=10),
                               models.encoder(model, params)(jnp.asarray(x)), rtol=1e-5, atol=1e-6)
    before = models._encode_jit._cache_size()
    models.encode_batched(model, params, x + 1, batch_size=10)
    assert models._encode_jit._cache_size() == before
