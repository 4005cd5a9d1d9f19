"""Tests of aejax.data.batching: binarize, the epoch order, batches, padding, the memory check."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aejax.data import batching, offline


@pytest.mark.parametrize("method", batching.BINARIZE_METHODS)
def test_binarize(method):
    x = jnp.full((200_000,), 0.3, jnp.float32)
    b = jax.jit(functools.partial(batching.binarize, method=method))(jax.random.key(0), x)
    assert b.dtype == jnp.float32 and b.shape == x.shape
    assert set(np.unique(np.asarray(b))) == {0.0, 1.0}
    assert abs(float(b.mean()) - 0.3) < 0.01  # Standard error of the mean is about 0.001.
    xs = jnp.linspace(0, 1, 7)
    np.testing.assert_array_equal(
        batching.binarize(jax.random.key(1), jnp.array([0.0, 1.0]), method=method), [0.0, 1.0]
    )
    assert not np.array_equal(
        batching.binarize(jax.random.key(1), x, method=method),
        batching.binarize(jax.random.key(2), x, method=method),
    )
    assert batching.binarize(jax.random.key(0), xs.astype(jnp.bfloat16),
                             method=method).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="choose one of"):
        batching.binarize(jax.random.key(0), x, method="fast")


def test_counter_uniform_is_uniform_independent_and_a_pure_function_of_the_key():
    from scipy import stats

    shape = (256, 784)  # a batch of images
    u = np.asarray(batching.counter_uniform(jax.random.key(3), shape), np.float64)
    assert u.dtype == np.float64 and u.min() >= 0.0 and u.max() < 1.0
    np.testing.assert_array_equal(u, batching.counter_uniform(jax.random.key(3), shape))
    # Uniform: Kolmogorov-Smirnov, and a chi-square over 256 equal bins.
    assert stats.kstest(u.ravel(), "uniform").pvalue > 1e-3
    counts = np.bincount((u.ravel() * 256).astype(int), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-3
    # Independent of the neighbouring pixel, of the same pixel in the next image, and of the
    # same pixel under the next key (the next step's draw): correlations within 5 standard
    # errors (1 / sqrt(n)) of 0.
    v = np.asarray(batching.counter_uniform(jax.random.key(4), shape), np.float64)
    for a, b in ((u[:, :-1], u[:, 1:]), (u[:-1], u[1:]), (u, v)):
        r = np.corrcoef(a.ravel(), b.ravel())[0, 1]
        assert abs(r) < 5 / np.sqrt(a.size), r
    # Bits used: 24, so 2^24 distinct values are possible; with 200,704 draws collisions are
    # rare (a bijection of the index before the shift).
    assert len(np.unique(u)) > 0.99 * u.size
    # Bernoulli(p) at every grey level of an 8-bit image: the mean of 100 keys' draws is p.
    p = jnp.arange(256, dtype=jnp.float32) / 255
    draws = jnp.stack([batching.binarize(jax.random.key(k), jnp.tile(p, 400), method="counter")
                       .reshape(400, 256).mean(0) for k in range(10)])
    se = np.sqrt(np.asarray(p) * (1 - np.asarray(p)) / 4000) + 1e-9
    z = (np.asarray(draws.mean(0)) - np.asarray(p)) / se
    assert np.abs(z).max() < 5
    assert np.asarray(draws)[:, 0].max() == 0 and np.asarray(draws)[:, -1].min() == 1


# --------------------------------------------------------------------------------------------------
# Device-resident helpers
# --------------------------------------------------------------------------------------------------


def test_epoch_permutation():
    rng = jax.random.key(3)
    p0 = batching.epoch_permutation(rng, 1000, 0)
    np.testing.assert_array_equal(np.sort(p0), np.arange(1000))
    # A resumed run agrees.
    np.testing.assert_array_equal(p0, batching.epoch_permutation(rng, 1000, 0))
    assert not np.array_equal(p0, batching.epoch_permutation(rng, 1000, 1))
    jitted = jax.jit(batching.epoch_permutation, static_argnums=1)
    np.testing.assert_array_equal(
        jitted(rng, 1000, jnp.int32(1)), batching.epoch_permutation(rng, 1000, 1)
    )


def test_take_batch_matches_numpy_and_compiles_once():
    x = np.arange(50 * 3, dtype=np.float32).reshape(50, 3)
    perm = batching.epoch_permutation(jax.random.key(0), 50, 0)
    traces = []

    def take(x, perm, index):
        traces.append(1)
        return batching.take_batch(x, perm, index, 8)

    take = jax.jit(take)
    steps = batching.steps_per_epoch(50, 8)
    assert steps == 6
    seen = []
    for i in range(steps):
        batch = take(x, perm, i)
        np.testing.assert_array_equal(batch, x[np.asarray(perm)[i * 8 : (i + 1) * 8]])
        seen.extend(np.asarray(batch)[:, 0])
    assert len(traces) == 1
    assert len(set(seen)) == 48  # Distinct rows within one epoch.


def test_steps_per_epoch():
    assert batching.steps_per_epoch(10, 3) == 3
    assert batching.steps_per_epoch(10, 10) == 1
    for bad in (0, -1, 11):
        with pytest.raises(offline.DataError, match="batch_size"):
            batching.steps_per_epoch(10, bad)


@pytest.mark.parametrize("n, batch_size", [(10, 4), (8, 4), (3, 5)])
def test_pad_batches_matches_numpy(n, batch_size):
    x = np.arange(1, n * 2 + 1, dtype=np.float32).reshape(n, 2)
    xs, masks = batching.pad_batches(x, batch_size)
    num = -(-n // batch_size)
    expected = np.zeros((num * batch_size, 2), np.float32)
    expected[:n] = x
    expected_masks = (np.arange(num * batch_size) < n).astype(np.float32)
    assert isinstance(xs, np.ndarray) and isinstance(masks, np.ndarray)
    assert xs.shape == (num, batch_size, 2) and xs.dtype == x.dtype
    assert masks.shape == (num, batch_size) and masks.dtype == np.float32
    np.testing.assert_array_equal(xs, expected.reshape(num, batch_size, 2))
    np.testing.assert_array_equal(masks, expected_masks.reshape(num, batch_size))
    rows, row_masks = xs.reshape(-1, 2), masks.reshape(-1)
    np.testing.assert_array_equal(rows[row_masks == 1], x)  # Every example once, in order.
    assert np.all(rows[row_masks == 0] == 0)  # Padding is zeros.
    # A masked mean over the batches equals the plain mean.
    total = float((xs.sum(-1) * masks).sum())
    assert total / masks.sum() == pytest.approx(float(x.sum(1).mean()))
    for bad in (0, -1):
        with pytest.raises(offline.DataError, match="batch_size"):
            batching.pad_batches(x, bad)


@pytest.mark.parametrize("array", [np.asarray, jnp.asarray])
@pytest.mark.parametrize("n, multiple", [(10, 4), (8, 4), (3, 5), (0, 3)])
def test_pad_rows_matches_numpy(array, n, multiple):
    x = np.arange(1, n * 6 + 1, dtype=np.float32).reshape(n, 2, 3)
    padded, mask = batching.pad_rows(array(x), multiple)
    m = -(-n // multiple) * multiple
    expected = np.concatenate([x, np.zeros((m - n, 2, 3), np.float32)])
    # Numpy stays numpy (host memory); a JAX array stays a JAX array.
    kind = np.ndarray if array is np.asarray else jax.Array
    assert isinstance(padded, kind) and isinstance(mask, kind)
    assert padded.shape == (m, 2, 3) and padded.dtype == np.float32
    assert mask.shape == (m,) and mask.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(padded), expected)
    np.testing.assert_array_equal(np.asarray(mask), (np.arange(m) < n).astype(np.float32))
    for bad in (0, -2):
        with pytest.raises(offline.DataError, match="multiple"):
            batching.pad_rows(array(x), bad)


def test_pad_rows_under_jit():
    x = np.arange(10, dtype=np.float32).reshape(5, 2)
    padded, mask = jax.jit(batching.pad_rows, static_argnums=1)(jnp.asarray(x), 4)
    want_x, want_mask = batching.pad_rows(x, 4)
    np.testing.assert_array_equal(padded, want_x)
    np.testing.assert_array_equal(mask, want_mask)


class FakeDevice:
    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        if isinstance(self.stats, Exception):
            raise self.stats
        return self.stats


@pytest.mark.parametrize("stats,nbytes,fraction,fits", [
    ({"bytes_limit": 1000}, 499, 0.5, True),   # under half of the device's memory
    ({"bytes_limit": 1000}, 500, 0.5, False),  # exactly half is too much
    ({"bytes_limit": 1000}, 899, 0.9, True),
    (None, 4 * 2**30 - 1, 0.5, True),          # a device that reports nothing: 4 GiB
    (None, 4 * 2**30, 0.5, False),
    (RuntimeError("unsupported"), 2**20, 0.5, True),  # one that raises: the same rule
    ({"bytes_in_use": 5}, 4 * 2**30, 0.5, False),     # stats without a limit: the same rule
])
def test_fits_on_device_against_the_reported_limit(monkeypatch, stats, nbytes, fraction, fits):
    monkeypatch.setattr(jax, "devices", lambda *a: [FakeDevice(stats)])
    assert batching.fits_on_device(nbytes, fraction=fraction) is fits


def test_fits_on_device_refuses_a_bad_fraction():
    for fraction in (0.0, -0.5, 1.5):
        with pytest.raises(offline.DataError, match="fraction must be in"):
            batching.fits_on_device(10, fraction=fraction)


def test_import_does_not_import_tensorflow():
    code = (
        "import sys, aejax.data.batching; "
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)
