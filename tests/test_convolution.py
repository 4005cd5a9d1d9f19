"""aejax.convolution: shifted-slice convolutions against NumPy, XLA's convolution and its gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from aejax import convolution, models

NHWC = ("NHWC", "HWIO", "NHWC")


def numpy_conv(x, k, pads):
    """The definition: out[b, i, j, o] = sum over (di, dj, c) of xpad[b, i+di, j+dj, c] k[di, dj, c, o]."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
    k = np.asarray(k, np.float64)
    kh, kw = k.shape[:2]
    ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    out = np.zeros((x.shape[0], ho, wo, k.shape[3]))
    for di in range(kh):
        for dj in range(kw):
            out += np.einsum("bhwc,co->bhwo", x[:, di:di + ho, dj:dj + wo, :], k[di, dj])
    return out


def xla_conv(x, k, padding):
    return lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=NHWC,
                                    precision=lax.Precision.HIGHEST)


CASES = [  # (input shape, kernel shape, padding): few and many channels, odd and even kernels
    ((3, 9, 8, 1), (3, 3, 1, 5), "SAME"),
    ((3, 9, 8, 6), (3, 3, 6, 1), "SAME"),
    ((2, 10, 10, 2), (3, 3, 2, 7), "VALID"),
    ((2, 10, 10, 7), (3, 3, 7, 3), "VALID"),
    ((2, 7, 7, 3), (2, 4, 3, 4), "SAME"),       # even sizes: lax's uneven SAME split
    ((2, 7, 6, 5), (5, 3, 5, 2), ((1, 3), (0, 2))),
]


@pytest.mark.parametrize("xs,ks,padding", CASES)
def test_shifted_conv_is_the_convolution(xs, ks, padding):
    rng = np.random.default_rng(0)
    x = rng.normal(size=xs).astype(np.float32)
    k = rng.normal(size=ks).astype(np.float32)
    got = convolution.shifted_conv(jnp.asarray(x), jnp.asarray(k), padding,
                                   precision=lax.Precision.HIGHEST)
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(xs[1:3], ks[:2], (1, 1), padding)
    else:
        pads = padding
    want = numpy_conv(x, k, pads)
    assert got.shape == want.shape == xla_conv(x, k, padding).shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, xla_conv(x, k, padding), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("xs,ks,padding", CASES[:4])
def test_shifted_conv_gradients_are_the_convolutions(xs, ks, padding):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=xs), jnp.float32)
    k = jnp.asarray(rng.normal(size=ks), jnp.float32)
    w = jnp.asarray(rng.normal(size=xla_conv(x, k, padding).shape), jnp.float32)
    loss = lambda conv: lambda x, k: jnp.sum(w * jnp.tanh(conv(x, k)))
    ours = jax.grad(loss(lambda x, k: convolution.shifted_conv(
        x, k, padding, precision=lax.Precision.HIGHEST)), argnums=(0, 1))(x, k)
    theirs = jax.grad(loss(lambda x, k: xla_conv(x, k, padding)), argnums=(0, 1))(x, k)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def primitives(fn, *args) -> list[str]:
    return [e.primitive.name for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns]


@pytest.mark.parametrize("xs,ks,padding", [c for c in CASES if c[1][3] <= 4])
def test_few_outputs_conv_is_the_convolution_in_value_gradients_and_tangents(xs, ks, padding):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=xs), jnp.float32)
    k = jnp.asarray(rng.normal(size=ks), jnp.float32)
    hi = lax.Precision.HIGHEST
    ours = lambda x, k: convolution.few_outputs_conv(x, k, padding, precision=hi)
    theirs = lambda x, k: xla_conv(x, k, padding)
    pads = lax.padtype_to_pads(xs[1:3], ks[:2], (1, 1), padding) if isinstance(padding, str) \
        else padding
    np.testing.assert_allclose(ours(x, k), numpy_conv(x, k, pads), rtol=1e-5, atol=1e-5)
    w = jnp.asarray(rng.normal(size=theirs(x, k).shape), jnp.float32)
    loss = lambda conv: lambda x, k: jnp.sum(w * jnp.tanh(conv(x, k)))
    for a, b in zip(jax.grad(loss(ours), argnums=(0, 1))(x, k),
                    jax.grad(loss(theirs), argnums=(0, 1))(x, k)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # Forward mode (the tangent in the kernel is written out by hand): against XLA's and NumPy's.
    dx = jnp.asarray(rng.normal(size=xs), jnp.float32)
    dk = jnp.asarray(rng.normal(size=ks), jnp.float32)
    tangent = jax.jvp(ours, (x, k), (dx, dk))[1]
    np.testing.assert_allclose(tangent, jax.jvp(theirs, (x, k), (dx, dk))[1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(tangent, numpy_conv(dx, k, pads) + numpy_conv(x, dk, pads),
                               rtol=1e-4, atol=1e-4)
    # The value and the kernel's gradient are products: no convolution (XLA's program has two).
    grad_k = jax.grad(loss(ours), argnums=1)
    hlo = jax.jit(grad_k).lower(x, k).as_text()
    ref = jax.jit(jax.grad(loss(theirs), argnums=1)).lower(x, k).as_text()
    assert hlo.count("convolution(") == 0 and ref.count("convolution(") == 2


@pytest.mark.parametrize("kwargs,channels,path", [
    ({}, (1, 16), "shifted"),
    ({}, (4, 8), "shifted"),
    ({}, (1, 1), "shifted"),                               # few of both: patches first
    ({}, (16, 1), "few_outputs"),
    ({}, (16, 2), "xla"),
    ({}, (16, 8), "xla"),                                  # many of both: XLA's convolution
    ({"window_strides": (2, 2)}, (1, 16), "xla"),
    ({"window_strides": (2, 2)}, (16, 1), "xla"),
    ({"rhs_dilation": (2, 2)}, (1, 16), "xla"),
    ({"lhs_dilation": (2, 2), "padding": ((1, 1), (1, 1))}, (1, 16), "xla"),
])
def test_the_drop_in_takes_each_path_only_where_it_applies(kwargs, channels, path):
    c_in, c_out = channels
    x = jnp.ones((2, 8, 8, c_in))
    k = jnp.ones((3, 3, c_in, c_out))
    args = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC)
    args.update(kwargs)
    fn = lambda x, k: convolution.conv_general_dilated(x, k, **args)
    names = primitives(fn, x, k)
    taken = ("few_outputs" if "custom_jvp_call" in names
             else "xla" if "conv_general_dilated" in names else "shifted")
    assert taken == path, names
    np.testing.assert_allclose(fn(x, k), lax.conv_general_dilated(x, k, **args), rtol=1e-5)


def test_flax_conv_with_the_drop_in_has_the_same_parameters_and_values():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 12, 12, 1))
    plain = nn.Conv(6, (3, 3), padding="SAME")
    ours = nn.Conv(6, (3, 3), padding="SAME", conv_general_dilated=convolution.conv_general_dilated)
    params = plain.init(jax.random.PRNGKey(1), x)
    assert jax.tree.structure(ours.init(jax.random.PRNGKey(1), x)) == jax.tree.structure(params)
    np.testing.assert_allclose(ours.apply(params, x), plain.apply(params, x), rtol=1e-5, atol=1e-6)


def test_unknown_lowering_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown convolution lowering 'fast'"):
        convolution.for_lowering("fast")
    x = jnp.zeros((1, 28, 28, 1))
    with pytest.raises(ValueError, match="Unknown convolution lowering"):
        models.ConvAutoencoder(conv_lowering="fast").init(jax.random.PRNGKey(0), x)


@pytest.mark.parametrize("upsampling", ["nearest", "transpose", "unpool"])
def test_conv_autoencoder_lowerings_agree(upsampling):
    """The shifted first layer and the last one's kernel gradient: same parameters, the same logits and gradients to float
    tolerance, and no XLA convolution left in that layer."""
    x = jax.random.uniform(jax.random.PRNGKey(0), (8, 28, 28, 1))
    xla = models.ConvAutoencoder(upsampling=upsampling, conv_lowering="xla")
    shifted = models.ConvAutoencoder(upsampling=upsampling, conv_lowering="shifted")
    params = xla.init(jax.random.PRNGKey(1), x)
    assert jax.tree.structure(shifted.init(jax.random.PRNGKey(1), x)) == jax.tree.structure(params)

    def loss(model):
        return lambda p: jnp.mean(
            (jax.nn.sigmoid(model.apply(p, x)[0]) - x) ** 2)

    np.testing.assert_allclose(shifted.apply(params, x)[0], xla.apply(params, x)[0],
                               rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.grad(loss(shifted))(params)),
                    jax.tree.leaves(jax.grad(loss(xla))(params))):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)
    count = lambda m: primitives(lambda p: m.apply(p, x), params).count("conv_general_dilated")
    # The first layer (1 channel in) has no convolution left; the last (1 channel out) keeps
    # XLA's inside its custom tangent.
    assert count(shifted) == count(xla) - 2
    jvps = lambda m: primitives(lambda p: m.apply(p, x), params).count("custom_jvp_call")
    assert jvps(shifted) == jvps(xla) + 1
    # On a CPU, "auto" is the shifted lowering.
    assert jax.default_backend() != "cpu" or count(models.ConvAutoencoder(
        upsampling=upsampling)) == count(shifted)
