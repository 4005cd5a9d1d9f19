"""Generation quality on features: the Frechet distance and k-NN precision and recall.

Both compare a set of real images with a set of generated ones through the features a fixed
network gives them (aejax's own Fashion-MNIST classifier in ``experiments/quality.py``; any
``(N, D)`` features here). Computed in float64 with NumPy on the host: the statistics are a
``D x D`` covariance and a pairwise-distance scan, not training-time work.

* :func:`frechet_distance` (Heusel et al. 2017, "FID" with Inception features): the Frechet
  (2-Wasserstein) distance between the Gaussians fitted to the two feature sets,
  ``|m_1 - m_2|^2 + tr(C_1 + C_2 - 2 (C_1^{1/2} C_2 C_1^{1/2})^{1/2})``.
* :func:`precision_recall` (Kynkaanniemi et al. 2019): each set's manifold is the union of balls
  around its points reaching their k-th nearest neighbour; precision is the fraction of generated
  points inside the real manifold, recall the fraction of real points inside the generated one.

The floor of either is what a second sample of real images scores against the first (a Frechet
distance above 0 from finite samples alone; precision and recall below 1).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def _features(x, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{name} must be (N, D) features with N >= 2, got shape {x.shape}.")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} holds NaN or infinite values.")
    return x


def _psd_sqrt(c: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix."""
    w, v = np.linalg.eigh((c + c.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def gaussian_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and sample covariance ``(D, D)`` (``N - 1`` in the denominator)."""
    f = _features(features, "features")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance_from_statistics(mean_1, cov_1, mean_2, cov_2) -> float:
    """The Frechet distance between ``N(mean_1, cov_1)`` and ``N(mean_2, cov_2)``.

    ``tr((C_1^{1/2} C_2 C_1^{1/2})^{1/2})`` is computed from the symmetric square roots of
    symmetric matrices (eigendecompositions), so it is real and exact for singular covariances
    too (fewer samples than features).

    >>> frechet_distance_from_statistics(np.zeros(2), np.eye(2), np.array([3.0, 4.0]), np.eye(2))
    25.0
    """
    m1, m2 = np.asarray(mean_1, np.float64), np.asarray(mean_2, np.float64)
    c1, c2 = np.asarray(cov_1, np.float64), np.asarray(cov_2, np.float64)
    d = m1.shape[0]
    if m2.shape != (d,) or c1.shape != (d, d) or c2.shape != (d, d):
        raise ValueError(f"statistics of different sizes: means {m1.shape}, {m2.shape}, "
                         f"covariances {c1.shape}, {c2.shape}.")
    root_1 = _psd_sqrt(c1)
    cross = np.trace(_psd_sqrt(root_1 @ c2 @ root_1))
    value = float(np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * cross)
    return max(value, 0.0)  # rounding can leave -1e-12 for equal statistics


def frechet_distance(real, generated) -> float:
    """The Frechet distance between Gaussians fitted to two feature sets ``(N, D)``, ``(M, D)``.

    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(size=(5000, 2)), rng.normal(size=(5000, 2)) + [3.0, 0.0]
    >>> round(frechet_distance(a, b))
    9
    """
    return frechet_distance_from_statistics(*gaussian_statistics(real),
                                            *gaussian_statistics(generated))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = np.sum(a * a, 1)[:, None] + np.sum(b * b, 1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def _knn_radii(x: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """Squared distance from each point to its ``k``-th nearest other point of ``x``."""
    radii = np.empty(len(x))
    for i in range(0, len(x), chunk):
        d = _squared_distances(x[i:i + chunk], x)
        # The point itself is at distance 0: the k-th nearest other point is order statistic k.
        radii[i:i + chunk] = np.partition(d, k, axis=1)[:, k]
    return radii


def _inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, chunk: int) -> np.ndarray:
    """Whether each point lies within ``radii`` (squared) of at least one centre."""
    out = np.empty(len(points), bool)
    for i in range(0, len(points), chunk):
        out[i:i + chunk] = np.any(_squared_distances(points[i:i + chunk], centres) <= radii[None],
                                  axis=1)
    return out


class PrecisionRecall(NamedTuple):
    """k-NN precision (generated points on the real manifold) and recall (real points on the
    generated manifold), each in [0, 1]."""

    precision: float
    recall: float


def precision_recall(real, generated, *, k: int = 3, chunk: int = 1000) -> PrecisionRecall:
    """Kynkaanniemi et al.'s improved precision and recall of ``generated`` against ``real``.

    Args:
      real: ``(N, D)`` features of real images, N > k.
      generated: ``(M, D)`` features of generated images, M > k.
      k: the neighbour whose distance sets each ball's radius (the paper uses 3).
      chunk: rows of the distance matrix computed at a time (memory ``chunk * max(N, M)``).

    Returns:
      :class:`PrecisionRecall`.
    """
    r, g = _features(real, "real"), _features(generated, "generated")
    if r.shape[1] != g.shape[1]:
        raise ValueError(f"real and generated features differ in size: {r.shape[1]} and "
                         f"{g.shape[1]}.")
    if not (isinstance(k, (int, np.integer)) and 1 <= k < min(len(r), len(g))):
        raise ValueError(f"k must be an integer in [1, {min(len(r), len(g)) - 1}] (fewer than "
                         f"the points of each set), got {k!r}.")
    precision = _inside(g, r, _knn_radii(r, k, chunk), chunk).mean()
    recall = _inside(r, g, _knn_radii(g, k, chunk), chunk).mean()
    return PrecisionRecall(float(precision), float(recall))
