"""Tests of aejax.pooling: switches and unpooling against NumPy loops, flax, gradients, jit/vmap."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from aejax.pooling import max_pool_with_switches, max_unpool, upsample_nearest


def np_pool(x, k, padding):
    """Loop reference: pooled values and row-major argmax within each (padded) window."""
    b, h, w, c = x.shape
    if padding == "SAME":
        ho, wo = -(-h // k), -(-w // k)
        ph, pw = ho * k - h, wo * k - w
        # lax's SAME split: the odd extra row/column goes at the bottom/right.
        xp = np.full((b, ho * k, wo * k, c), -np.inf)
        xp[:, ph // 2: ph // 2 + h, pw // 2: pw // 2 + w] = x
    else:
        ho, wo = h // k, w // k
        xp = x
    pooled, switches = np.zeros((b, ho, wo, c)), np.zeros((b, ho, wo, c), np.int64)
    for n in range(b):
        for i in range(ho):
            for j in range(wo):
                for ch in range(c):
                    flat = xp[n, i * k:(i + 1) * k, j * k:(j + 1) * k, ch].reshape(-1)
                    best = 0
                    for t in range(1, k * k):
                        if flat[t] > flat[best]:  # strict: a tie keeps the earlier one
                            best = t
                    pooled[n, i, j, ch], switches[n, i, j, ch] = flat[best], best
    return pooled, switches


def np_unpool(y, switches, k, output_hw=None):
    b, ho, wo, c = y.shape
    out = np.zeros((b, ho * k, wo * k, c))
    for n in range(b):
        for i in range(ho):
            for j in range(wo):
                for ch in range(c):
                    s = switches[n, i, j, ch]
                    out[n, i * k + s // k, j * k + s % k, ch] = y[n, i, j, ch]
    if output_hw is not None:
        th, tw = ho * k - output_hw[0], wo * k - output_hw[1]
        out = out[:, th // 2: th // 2 + output_hw[0], tw // 2: tw // 2 + output_hw[1]]
    return out


def rand(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def ties(shape, seed=0):
    """Small integers, so most windows hold ties."""
    return np.random.default_rng(seed).integers(0, 3, size=shape).astype(np.float32)


CASES = [  # (shape, window, padding)
    ((2, 8, 8, 3), 2, "VALID"),
    ((2, 7, 9, 2), 2, "VALID"),
    ((2, 7, 7, 2), 2, "SAME"),
    ((1, 7, 8, 2), 3, "SAME"),  # padding 2 rows split 1/1, like lax
    ((1, 6, 6, 1), 1, "VALID"),
]


@pytest.mark.parametrize("shape,k,padding", CASES)
def test_pooled_matches_flax_and_numpy(shape, k, padding):
    x = rand(shape)
    pooled, switches = jax.jit(max_pool_with_switches, static_argnums=1,
                               static_argnames="padding")(x, k, padding=padding)
    flax_pooled = nn.max_pool(jnp.asarray(x), (k, k), strides=(k, k), padding=padding)
    np.testing.assert_array_equal(pooled, flax_pooled)
    ref_pooled, ref_switches = np_pool(x, k, padding)
    np.testing.assert_array_equal(pooled, ref_pooled)
    np.testing.assert_array_equal(switches, ref_switches)
    assert switches.dtype == jnp.int32 and pooled.dtype == jnp.float32


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
def test_ties_pick_first_in_row_major_order(padding):
    x = np.zeros((1, 4, 4, 1), np.float32)
    x[0, :2, :2, 0] = [[1, 5], [5, 5]]  # three-way tie: first is (0, 1) -> 1
    x[0, :2, 2:, 0] = [[0, 0], [7, 7]]  # tie on the bottom row -> (1, 0) -> 2
    x[0, 2:, :2, 0] = [[3, 3], [3, 3]]  # all equal -> 0
    x[0, 2:, 2:, 0] = [[0, 1], [2, 9]]  # no tie -> 3
    _, switches = max_pool_with_switches(x, padding=padding)
    np.testing.assert_array_equal(switches[0, :, :, 0], [[1, 2], [0, 3]])
    x = ties((3, 6, 5, 4))
    np.testing.assert_array_equal(max_pool_with_switches(x, padding=padding)[1],
                                  np_pool(x, 2, padding)[1])


def test_same_padding_never_selected_even_when_inputs_are_very_negative():
    x = np.full((1, 7, 7, 1), -1e30, np.float32)
    pooled, switches = max_pool_with_switches(x, padding="SAME")
    assert pooled.shape == (1, 4, 4, 1)
    np.testing.assert_array_equal(pooled, np.float32(-1e30))
    # Padding sits at indices 1, 3 (right edge) or 2, 3 (bottom edge); the tie goes to index 0.
    np.testing.assert_array_equal(switches[0, :, :, 0], np.zeros((4, 4)))


@pytest.mark.parametrize("shape,k,padding", CASES)
def test_unpool_matches_numpy(shape, k, padding):
    ho, wo = np_pool(rand(shape), k, padding)[0].shape[1:3]
    rng = np.random.default_rng(1)
    y = rand((shape[0], ho, wo, shape[3]), seed=2)
    switches = rng.integers(0, k * k, size=y.shape).astype(np.int32)
    out = jax.jit(max_unpool, static_argnums=2)(y, switches, k)
    np.testing.assert_array_equal(out, np_unpool(y, switches, k))


@pytest.mark.parametrize("k,hw", [(2, (7, 7)), (2, (7, 8)), (3, (7, 8))])
def test_unpool_crops_to_pre_pooling_size(k, hw):
    x = rand((2, *hw, 3), seed=3)
    pooled, switches = max_pool_with_switches(x, k, padding="SAME")
    out = max_unpool(pooled, switches, k, output_hw=hw)
    assert out.shape == x.shape
    np.testing.assert_array_equal(out, np_unpool(np.asarray(pooled), np.asarray(switches), k, hw))
    # Every maximum lands back on the input element it came from.
    kept = np.asarray(out) != 0
    np.testing.assert_array_equal(np.asarray(out)[kept], x[kept])
    assert kept.sum() == pooled.size


@pytest.mark.parametrize("padding,hw", [("VALID", (8, 6)), ("SAME", (7, 7))])
def test_round_trip_keeps_exactly_the_maxima(padding, hw):
    x = np.abs(rand((2, *hw, 3), seed=4)) + 0.1  # positive: a kept maximum is never 0
    pooled, switches = max_pool_with_switches(x, padding=padding)
    out = np.asarray(max_unpool(pooled, switches, output_hw=hw if padding == "SAME" else None))
    mask = np_unpool(np.ones(pooled.shape), np_pool(x, 2, padding)[1], 2,
                     hw if padding == "SAME" else None).astype(bool)
    np.testing.assert_array_equal(out[mask], x[:, : out.shape[1], : out.shape[2]][mask])
    np.testing.assert_array_equal(out[~mask], 0.0)


@pytest.mark.parametrize("padding,hw", [("VALID", (8, 8)), ("SAME", (7, 7))])
def test_pool_of_unpool_is_identity_for_non_negative_inputs(padding, hw):
    x = np.maximum(rand((2, *hw, 3), seed=5), 0.0)  # relu-like, so many all-zero windows
    x[0, :2, :2, 0] = [[0.5, 0.5], [0.1, 0.5]]  # a tie survives the round trip too
    pooled, switches = max_pool_with_switches(x, padding=padding)
    again, again_switches = max_pool_with_switches(
        max_unpool(pooled, switches, output_hw=hw if padding == "SAME" else None), padding=padding)
    np.testing.assert_array_equal(again, pooled)
    positive = np.asarray(pooled) > 0  # all-zero windows may move their switch to index 0
    np.testing.assert_array_equal(np.asarray(again_switches)[positive],
                                  np.asarray(switches)[positive])


@pytest.mark.parametrize("padding,hw,make", [("VALID", (6, 8), rand), ("VALID", (6, 8), ties),
                                             ("SAME", (7, 7), ties)])
def test_gradient_routes_to_the_argmax(padding, hw, make):
    x = make((2, *hw, 3), seed=6)
    g = rand((2, *hw, 3), seed=7)
    out_hw = hw if padding == "SAME" else None

    def f(x):
        pooled, switches = max_pool_with_switches(x, padding=padding)
        out = max_unpool(pooled, switches, output_hw=out_hw)
        return jnp.sum(out * g[:, : out.shape[1], : out.shape[2]])

    grad = jax.jit(jax.grad(f))(x)
    # Each window's maximum (the first of ties only) receives g at its own position; all else 0.
    mask = np_unpool(np.ones(np_pool(x, 2, padding)[0].shape), np_pool(x, 2, padding)[1], 2, out_hw)
    expected = np.zeros_like(x)
    expected[:, : mask.shape[1], : mask.shape[2]] = np.where(mask, g[:, : mask.shape[1],
                                                                   : mask.shape[2]], 0.0)
    # With ties, jnp.max (and flax) would split the gradient; the switches send it to one element.
    np.testing.assert_array_equal(grad, expected)


def test_check_grads_unpool_and_pool():
    y = rand((2, 3, 4, 2), seed=8)
    switches = np.random.default_rng(9).integers(0, 4, size=y.shape).astype(np.int32)
    check_grads(lambda y: max_unpool(y, switches, output_hw=(5, 8)), (y,), order=2,
                modes=("fwd", "rev"), atol=1e-2, rtol=1e-2)
    x = rand((1, 4, 6, 2), seed=10)  # distinct values: no tie within the finite-difference step
    check_grads(lambda x: max_pool_with_switches(x)[0], (x,), order=1, modes=("fwd", "rev"),
                atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("padding,hw", [("VALID", (4, 6)), ("SAME", (5, 5))])
def test_forward_and_reverse_jacobians_are_the_switch_selection(padding, hw):
    # The exact contractive modes run forward mode through the encoder's pooling; its Jacobian
    # must be the same 0/1 selection either way, ties included.
    x = ties((1, *hw, 2), seed=12)
    pooled, switches = max_pool_with_switches(x, padding=padding)
    f = lambda x: max_pool_with_switches(x, padding=padding)[0]
    fwd, rev = jax.jacfwd(f)(x), jax.jacrev(f)(x)
    np.testing.assert_array_equal(fwd, rev)
    # d pooled[n, i, j, c] / d x = 1 at the switch element of that window, 0 elsewhere.
    expected = np.zeros(pooled.shape + x.shape, np.float32)
    _, pos = np_pool(x, 2, padding)
    for i, j, c in np.ndindex(*pooled.shape[1:]):  # SAME pads window 2 bottom/right only
        r, q = 2 * i + pos[0, i, j, c] // 2, 2 * j + pos[0, i, j, c] % 2
        expected[0, i, j, c, 0, r, q, c] = 1.0
    np.testing.assert_array_equal(fwd, expected)


def test_a_nan_in_a_window_pools_to_nan_at_its_first_position():
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    x[0, 0, 1, 0] = x[0, 1, 0, 0] = np.nan  # window (0, 0): NaN at row-major 1 and 2
    pooled, switches = max_pool_with_switches(x)
    window = x[0, :2, :2, 0].reshape(-1)
    assert np.isnan(pooled[0, 0, 0, 0]) and switches[0, 0, 0, 0] == np.argmax(window) == 1
    np.testing.assert_array_equal(pooled[0, :, :, 0][~np.isnan(pooled[0, :, :, 0])], [7.0, 13.0, 15.0])


def test_vmap_matches_per_slice():
    x = rand((3, 2, 7, 7, 2), seed=11)
    pool = functools.partial(max_pool_with_switches, padding="SAME")
    pooled, switches = jax.vmap(pool)(x)
    out = jax.vmap(functools.partial(max_unpool, output_hw=(7, 7)))(pooled, switches)
    for i in range(x.shape[0]):
        p, s = pool(x[i])
        np.testing.assert_array_equal(pooled[i], p)
        np.testing.assert_array_equal(switches[i], s)
        np.testing.assert_array_equal(out[i], max_unpool(p, s, output_hw=(7, 7)))


def test_jit_matches_eager_and_traces_once():
    traces = []

    def round_trip(x):
        traces.append(1)
        return max_unpool(*max_pool_with_switches(x, 2, padding="SAME"), 2, output_hw=(7, 7))

    jitted = jax.jit(round_trip)
    for seed in range(3):
        x = rand((2, 7, 7, 2), seed=seed)
        np.testing.assert_array_equal(jitted(x), round_trip(x))
    assert len(traces) == 1 + 3  # one trace for jit, one per eager call


def test_integer_inputs_pad_with_dtype_minimum():
    x = -np.arange(49, dtype=np.int32).reshape(1, 7, 7, 1)
    pooled, switches = max_pool_with_switches(x, padding="SAME")
    ref_pooled, ref_switches = np_pool(x.astype(np.float64), 2, "SAME")
    np.testing.assert_array_equal(pooled, ref_pooled)
    np.testing.assert_array_equal(switches, ref_switches)
    assert pooled.dtype == jnp.int32


@pytest.mark.parametrize("call,match", [
    (lambda: max_pool_with_switches(np.zeros((4, 4, 1))), r"x must have shape \(B, H, W, C\)"),
    (lambda: max_pool_with_switches(np.zeros((1, 4, 4, 1)), 0), "window must be an integer >= 1"),
    (lambda: max_pool_with_switches(np.zeros((1, 4, 4, 1)), 2.0), "window must be an integer"),
    (lambda: max_pool_with_switches(np.zeros((1, 4, 4, 1)), padding="same"), "padding must be"),
    (lambda: max_pool_with_switches(np.zeros((1, 3, 4, 1)), 4), "does not fit"),
    (lambda: max_unpool(np.zeros((2, 2, 1)), np.zeros((1, 2, 2, 1), np.int32)), "y must have"),
    (lambda: max_unpool(np.zeros((1, 2, 2, 1)), np.zeros((2, 2, 1), np.int32)), "switches must have"),
    (lambda: max_unpool(np.zeros((1, 2, 2, 1)), np.zeros((1, 2, 3, 1), np.int32)), "same shape"),
    (lambda: max_unpool(np.zeros((1, 2, 2, 1)), np.zeros((1, 2, 2, 1))), "must be integer"),
    (lambda: max_unpool(np.zeros((1, 2, 2, 1)), np.zeros((1, 2, 2, 1), np.int32), -1), "window"),
    (lambda: max_unpool(np.zeros((1, 4, 4, 1)), np.zeros((1, 4, 4, 1), np.int32),
                        output_hw=(9, 8)), "larger than the unpooled size"),
    (lambda: max_unpool(np.zeros((1, 4, 4, 1)), np.zeros((1, 4, 4, 1), np.int32),
                        output_hw=(6, 8)), "would not pool to 4x4"),
])
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------- nearest upsampling


@pytest.mark.parametrize("shape,factor", [((2, 4, 4, 3), 2), ((1, 3, 5, 2), 3), ((2, 2, 2, 1), 1)])
def test_upsample_nearest_is_jax_image_resize_and_its_gradient_sums_each_block(shape, factor):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    b, h, w, c = shape
    want = jax.image.resize(x, (b, h * factor, w * factor, c), "nearest")
    got = upsample_nearest(x, factor)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, np.repeat(np.repeat(np.asarray(x), factor, 1), factor, 2))
    g = jax.random.normal(jax.random.PRNGKey(1), got.shape)
    grad = jax.grad(lambda x: jnp.sum(g * upsample_nearest(x, factor)))(x)
    blocks = np.asarray(g).reshape(b, h, factor, w, factor, c).sum(axis=(2, 4))
    np.testing.assert_allclose(grad, blocks, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("x,factor,match", [
    (jnp.zeros((2, 4, 4)), 2, r"x must have shape \(B, H, W, C\)"),
    (jnp.zeros((1, 2, 2, 1)), 0, "factor must be an integer >= 1, got 0"),
    (jnp.zeros((1, 2, 2, 1)), True, "factor must be an integer >= 1, got True"),
])
def test_upsample_nearest_errors(x, factor, match):
    with pytest.raises(ValueError, match=match):
        upsample_nearest(x, factor)
