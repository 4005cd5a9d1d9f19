"""Tests of aejax.corruptions: the noise statistics each corruption promises, composition, build()."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aejax import corruptions

SHAPE = (300, 400)  # 120,000 entries: a standard error of at most 0.0015 on a fraction
N = math.prod(SHAPE)


def key(seed):
    """A typed key of the "rbg" PRNG. The corruptions only pass keys to jax.random, so the
    implementation does not matter to them, and threefry programs take seconds each to compile on
    the shared CPU runners. One test uses the default raw keys."""
    return jax.random.key(seed, impl="rbg")


def images(seed, low=0.0, high=1.0, shape=SHAPE, dtype=np.float32):
    return jnp.asarray(np.random.default_rng(seed).uniform(low, high, size=shape), dtype)


def assert_fraction(observed, expected, n=N, sigmas=4.0):
    se = math.sqrt(expected * (1 - expected) / n)
    assert abs(observed - expected) <= sigmas * se, (observed, expected, se)


@pytest.mark.parametrize("clip", [True, False])
def test_gaussian_zero_std_is_identity(clip):
    x = images(0, shape=(4, 5))
    np.testing.assert_array_equal(corruptions.gaussian(0.0, clip=clip)(key(0), x), x)


def test_gaussian_noise_has_the_requested_std():
    x = images(1)
    std = 0.2
    d = np.asarray(jax.jit(corruptions.gaussian(std, clip=False))(key(1), x), np.float64) - np.asarray(x)
    # Standard errors: std / sqrt(N) = 0.0006 for the mean, std / sqrt(2 N) = 0.0004 for the std.
    assert abs(d.mean()) < 4 * std / math.sqrt(N)
    assert abs(d.std() - std) < 4 * std / math.sqrt(2 * N)
    # Gaussian, not merely the right variance: 68.27% within one std, 95.45% within two.
    assert_fraction(np.mean(np.abs(d) < std), 0.6827)
    assert_fraction(np.mean(np.abs(d) < 2 * std), 0.9545)
    # Without clipping, values leave [0, 1].
    assert (np.asarray(x) + d).min() < 0 and (np.asarray(x) + d).max() > 1


def test_gaussian_clip_keeps_unit_interval_and_is_the_clipped_noisy_image():
    x = images(2)
    clipped = np.asarray(corruptions.gaussian(0.5)(key(2), x))
    raw = np.asarray(corruptions.gaussian(0.5, clip=False)(key(2), x))
    assert clipped.min() == 0.0 and clipped.max() == 1.0
    np.testing.assert_array_equal(clipped, np.clip(raw, 0.0, 1.0))
    # A good share of entries was clipped, so the comparison above was not vacuous.
    assert np.mean((raw < 0) | (raw > 1)) > 0.2


def test_masking_zeroes_the_fraction_and_keeps_the_rest():
    x = images(3, low=0.01)  # no zeros to begin with
    fraction = 0.3
    y = np.asarray(jax.jit(corruptions.masking(fraction))(key(3), x))
    zero = y == 0
    assert_fraction(zero.mean(), fraction)
    # Independent per entry: the same rate in every block of rows and columns.
    for block in (zero[:150], zero[150:], zero[:, :200], zero[:, 200:]):
        assert_fraction(block.mean(), fraction, n=block.size)
    np.testing.assert_array_equal(y[~zero], np.asarray(x)[~zero])


def test_masking_extremes():
    x = images(4, low=0.01, shape=(5, 6))
    np.testing.assert_array_equal(corruptions.masking(0.0)(key(4), x), x)
    np.testing.assert_array_equal(corruptions.masking(1.0)(key(4), x), np.zeros((5, 6)))


def test_salt_and_pepper_changes_the_fraction_to_zeros_and_ones_evenly():
    x = images(5, low=0.01, high=0.99)  # no 0 or 1 to begin with
    fraction = 0.2
    y = np.asarray(jax.jit(corruptions.salt_and_pepper(fraction))(key(5), x))
    changed = y != np.asarray(x)
    assert_fraction(changed.mean(), fraction)
    assert set(np.unique(y[changed]).tolist()) == {0.0, 1.0}
    assert_fraction(y[changed].mean(), 0.5, n=int(changed.sum()))
    np.testing.assert_array_equal(y[~changed], np.asarray(x)[~changed])


def test_salt_and_pepper_extremes():
    x = images(6, low=0.01, high=0.99, shape=(50, 60))
    np.testing.assert_array_equal(corruptions.salt_and_pepper(0.0)(key(6), x), x)
    y = np.asarray(corruptions.salt_and_pepper(1.0)(key(6), x))
    assert set(np.unique(y).tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("factory", [
    lambda: corruptions.gaussian(0.3), lambda: corruptions.masking(0.5),
    lambda: corruptions.salt_and_pepper(0.5), corruptions.identity,
    lambda: corruptions.compose(corruptions.masking(0.5), corruptions.gaussian(0.1)),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_corruptions_keep_shape_and_dtype(factory, dtype):
    with jax.enable_x64(dtype == np.float64):
        x = images(7, shape=(2, 28, 28, 1), dtype=dtype)
        y = factory()(key(7), x)
        assert y.shape == x.shape and y.dtype == x.dtype


def test_compose_applies_in_order_with_folded_keys():
    x = images(8, shape=(40, 50))
    first, second = corruptions.masking(0.5), corruptions.gaussian(0.1, clip=False)
    rng = key(8)
    y = corruptions.compose(first, second)(rng, x)
    expected = second(jax.random.fold_in(rng, 1), first(jax.random.fold_in(rng, 0), x))
    np.testing.assert_array_equal(y, expected)
    # Order matters: noise after masking leaves no exact zeros; masking after noise leaves ~half.
    assert np.mean(np.asarray(y) == 0) == 0.0
    reversed_zero = np.mean(np.asarray(corruptions.compose(second, first)(rng, x)) == 0)
    assert_fraction(reversed_zero, 0.5, n=x.size)


def test_compose_uses_independent_keys():
    x = images(9)
    std = 0.1
    twice = corruptions.compose(corruptions.gaussian(std, clip=False),
                                corruptions.gaussian(std, clip=False))
    d = np.asarray(twice(key(9), x), np.float64) - np.asarray(x)
    # Independent draws add in variance (std * sqrt 2); one key reused would give 2 * std.
    assert abs(d.std() - std * math.sqrt(2)) < 4 * std * math.sqrt(2) / math.sqrt(2 * N)
    masked_twice = corruptions.compose(corruptions.masking(0.3), corruptions.masking(0.3))
    y = np.asarray(masked_twice(key(10), images(10, low=0.01)))
    assert_fraction(np.mean(y == 0), 1 - 0.7 ** 2)


def test_compose_is_deterministic_per_key_with_default_keys_and_under_jit():
    x = images(11, shape=(8, 10))
    c = corruptions.compose(corruptions.masking(0.4), corruptions.gaussian(0.2))
    fn = jax.jit(c)
    a, b = fn(jax.random.PRNGKey(0), x), fn(jax.random.PRNGKey(0), x)
    other = fn(jax.random.PRNGKey(1), x)
    np.testing.assert_array_equal(a, b)
    assert np.mean(np.asarray(a) != np.asarray(other)) > 0.5
    # Same draws eagerly and jitted (XLA may fuse x + std * eps differently: 1 ulp).
    np.testing.assert_allclose(c(key(3), x), fn(key(3), x), rtol=1e-6, atol=1e-7)


def test_compose_of_nothing_is_identity():
    x = images(12, shape=(3, 4))
    np.testing.assert_array_equal(corruptions.compose()(key(12), x), x)


@pytest.mark.parametrize("kind, kwargs, direct", [
    ("none", {}, corruptions.identity()),
    ("gaussian", {"std": 0.2, "clip": False}, corruptions.gaussian(0.2, clip=False)),
    ("masking", {"fraction": 0.25}, corruptions.masking(0.25)),
    ("salt_and_pepper", {"fraction": 0.1}, corruptions.salt_and_pepper(0.1)),
])
def test_build_returns_the_named_corruption(kind, kwargs, direct):
    x = images(13, low=0.01, high=0.99, shape=(20, 30))
    y = corruptions.build(kind, **kwargs)(key(13), x)
    np.testing.assert_array_equal(y, direct(key(13), x))
    if kind != "none":
        assert np.any(np.asarray(y) != np.asarray(x))


def test_build_errors():
    with pytest.raises(ValueError, match=r"Unknown corruption 'blur'; choose one of \['gaussian', "
                                         r"'masking', 'none', 'salt_and_pepper'\]"):
        corruptions.build("blur")
    with pytest.raises(ValueError, match=r"Corruption 'masking' got bad options \['std'\]"):
        corruptions.build("masking", std=0.1)
    with pytest.raises(ValueError, match=r"Corruption 'gaussian' got bad options \[\]"):
        corruptions.build("gaussian")
    with pytest.raises(ValueError, match=r"Corruption 'none' got bad options \['fraction'\]"):
        corruptions.build("none", fraction=0.1)
    with pytest.raises(ValueError, match=r"masking: fraction must lie in \[0, 1\], got 2.0"):
        corruptions.build("masking", fraction=2.0)


def test_invalid_hyperparameters_raise():
    with pytest.raises(ValueError, match="gaussian: std must be >= 0, got -0.1"):
        corruptions.gaussian(-0.1)
    for factory in (corruptions.masking, corruptions.salt_and_pepper):
        for fraction in (1.5, -0.1, float("nan")):
            with pytest.raises(ValueError, match=rf"{factory.__name__}: fraction must lie in \[0, 1\]"):
                factory(fraction)
