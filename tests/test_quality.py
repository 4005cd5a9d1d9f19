"""Tests of aejax.quality: the Frechet distance against SciPy's matrix square root and closed
forms, k-NN precision and recall against a direct loop."""

import numpy as np
import pytest
import scipy.linalg

from aejax import quality


def random_cov(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d


def scipy_frechet(m1, c1, m2, c2):
    cross = scipy.linalg.sqrtm(c1 @ c2)
    return float(np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * np.real(cross)))


@pytest.mark.parametrize("rank", [None, 3])  # full rank, and singular (fewer samples than D)
def test_frechet_distance_matches_scipys_matrix_square_root(rank):
    rng = np.random.default_rng(0)
    d = 8
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    c1, c2 = random_cov(rng, d, rank), random_cov(rng, d)
    got = quality.frechet_distance_from_statistics(m1, c1, m2, c2)
    np.testing.assert_allclose(got, scipy_frechet(m1, c1, m2, c2), rtol=1e-7)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(1)
    c = random_cov(rng, 5)
    m = rng.normal(size=5)
    assert quality.frechet_distance_from_statistics(m, c, m, c) == pytest.approx(0.0, abs=1e-9)
    # Isotropic Gaussians: |m1 - m2|^2 + d (s1 - s2)^2.
    got = quality.frechet_distance_from_statistics(m, 4.0 * np.eye(5), m + 1.0, 9.0 * np.eye(5))
    np.testing.assert_allclose(got, 5 * 1.0 + 5 * (2.0 - 3.0) ** 2, rtol=1e-12)


def test_frechet_distance_of_feature_sets_uses_their_mean_and_sample_covariance():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(300, 4)), 2.0 * rng.normal(size=(200, 4)) + 1.0
    want = quality.frechet_distance_from_statistics(a.mean(0), np.cov(a.T), b.mean(0), np.cov(b.T))
    assert quality.frechet_distance(a, b) == pytest.approx(want, rel=1e-12)
    assert quality.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def direct_precision_recall(real, gen, k):
    def radius(x, i):
        d = sorted(np.sum((x[i] - x[j]) ** 2) for j in range(len(x)) if j != i)
        return d[k - 1]

    def inside(p, centres):
        radii = [radius(centres, j) for j in range(len(centres))]
        return np.mean([any(np.sum((q - centres[j]) ** 2) <= radii[j] for j in range(len(centres)))
                        for q in p])

    return inside(gen, real), inside(real, gen)


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_matches_a_direct_loop(k):
    rng = np.random.default_rng(3)
    real = rng.normal(size=(40, 3))
    gen = rng.normal(size=(30, 3)) * 1.5 + 0.7
    got = quality.precision_recall(real, gen, k=k, chunk=7)  # chunks that do not divide N
    want = direct_precision_recall(real, gen, k)
    assert got == pytest.approx(want, abs=1e-12)
    assert 0 < got.precision < 1 and 0 < got.recall < 1


def test_precision_recall_of_the_same_and_of_far_apart_sets():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(50, 2))
    assert quality.precision_recall(real, real) == (1.0, 1.0)
    assert quality.precision_recall(real, real + 100.0) == (0.0, 0.0)
    # Generated points all at the real mean: precise, but they miss most of the real set.
    collapsed = np.zeros((50, 2)) + rng.normal(size=(50, 2)) * 1e-3
    pr = quality.precision_recall(real, collapsed)
    assert pr.precision == 1.0 and pr.recall < 0.2


def test_bad_features_are_clear_errors():
    x = np.zeros((10, 3))
    with pytest.raises(ValueError, match=r"must be \(N, D\) features"):
        quality.frechet_distance(np.zeros(10), x)
    with pytest.raises(ValueError, match="NaN or infinite"):
        quality.precision_recall(np.full((10, 3), np.nan), x)
    with pytest.raises(ValueError, match="differ in size"):
        quality.precision_recall(x, np.zeros((10, 4)))
    with pytest.raises(ValueError, match="k must be an integer"):
        quality.precision_recall(x, x, k=10)
    with pytest.raises(ValueError, match="statistics of different sizes"):
        quality.frechet_distance_from_statistics(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
