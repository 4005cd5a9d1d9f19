"""experiments/quality.py: the cached feature classifier and the scores built on it."""

import jax
import numpy as np
import pytest

from aejax.data import splits as data_splits
from experiments import quality


def blobs(n, seed):
    """Ten well-separated classes of 784-pixel 'images' in [0, 1]."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).uniform(size=(10, 784))
    y = rng.integers(0, 10, n)
    x = np.clip(centres[y] + 0.05 * rng.normal(size=(n, 784)), 0, 1).astype(np.float32)
    return x, y.astype(np.int32)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    (x, y), (xt, yt) = blobs(1280, 0), blobs(400, 1)
    splits = data_splits.Splits((x, y), (xt[:10], yt[:10]), (xt, yt))
    params, info = quality.classifier(splits, directory=str(d))
    return d, splits, params, info


def test_the_classifier_learns_and_is_read_back_from_its_cache(cached):
    d, splits, params, info = cached
    assert info["test_accuracy"] > 0.95 and info["features"] == 128
    again, info_again = quality.classifier(None, directory=str(d))  # no data needed: cached
    assert info_again == info
    jax.tree.map(np.testing.assert_array_equal, again, params)
    feats = quality.apply_batched(params, splits.test[0][:30], features=True, batch_size=7)
    assert feats.shape == (30, 128) and np.all(feats >= 0)


def test_scores_of_real_images_and_of_one_collapsed_mode(cached):
    _, splits, params, _ = cached
    x = splits.test[0]
    same = quality.score(params, x, x)
    assert same["frechet_distance"] < 1e-6 and same["precision"] == same["recall"] == 1.0
    floor = quality.floor(params, x)
    one_class = x[splits.test[1] == 0]
    collapsed = quality.score(params, x, np.repeat(one_class, 10, axis=0)[:len(x)])
    assert collapsed["frechet_distance"] > 10 * floor["frechet_distance"]
    assert collapsed["recall"] < 0.3 < floor["recall"]


def test_code_marginal_sampler_draws_each_position_from_its_own_marginal():
    # 4 training examples, 2 positions of 2-dimensional codewords; every value is distinct.
    codes = np.arange(16, dtype=np.float32).reshape(4, 2, 2).reshape(4, 4)
    sample = quality.code_marginal_sampler(codes, 2, lambda z: z)
    z = sample(jax.random.PRNGKey(0), 4000).reshape(4000, 2, 2)
    per_position = codes.reshape(4, 2, 2)
    for p in range(2):
        rows = np.array([np.flatnonzero((per_position[:, p] == v).all(1))[0] for v in z[:, p]])
        np.testing.assert_allclose(np.bincount(rows, minlength=4) / 4000, 0.25, atol=0.03)
    # independent positions: pairs that no single training example holds appear
    first = np.array([np.flatnonzero((per_position[:, 0] == v).all(1))[0] for v in z[:, 0]])
    second = np.array([np.flatnonzero((per_position[:, 1] == v).all(1))[0] for v in z[:, 1]])
    np.testing.assert_allclose(np.mean(first == second), 0.25, atol=0.03)
    np.testing.assert_array_equal(sample(jax.random.PRNGKey(0), 10), sample(jax.random.PRNGKey(0), 10))
