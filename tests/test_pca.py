"""PCA in JAX against NumPy's SVD."""

import numpy as np
import pytest

from aejax import pca


def test_components_and_errors_match_numpy_svd():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(400, 20)) @ rng.normal(size=(20, 20)) * [3.0 ** -i for i in range(20)]
         + rng.normal(size=20)).astype(np.float32)
    k = 5
    fitted = pca.fit(x, k)
    xc = x.astype(np.float64) - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    # Same subspace and variances; signs may differ, so compare |cosines|.
    cos = np.abs(np.sum(np.asarray(fitted.components, np.float64) * vt[:k], axis=1))
    np.testing.assert_allclose(cos, 1.0, atol=1e-4)
    np.testing.assert_allclose(fitted.variances, s[:k] ** 2 / (len(x) - 1), rtol=1e-3)
    recon = xc @ vt[:k].T @ vt[:k] + x.mean(0)
    se = ((recon - x) ** 2).sum(1).mean()
    errs = pca.reconstruction_errors(fitted, x)
    np.testing.assert_allclose(errs["squared_error_per_image"], se, rtol=1e-3)
    np.testing.assert_allclose(errs["mse_per_pixel"], se / 20, rtol=1e-3)
    # Equal to the sum of the discarded variances (the Eckart-Young optimum).
    np.testing.assert_allclose(se, (s[k:] ** 2).sum() / len(x), rtol=1e-3)


def test_images_round_trip_shapes_and_bad_k():
    x = np.random.default_rng(1).random((50, 4, 4, 1)).astype(np.float32)
    fitted = pca.fit(x, 16)
    z = pca.encode(fitted, x)
    assert z.shape == (50, 16)
    np.testing.assert_allclose(pca.decode(fitted, z, (4, 4, 1)), x, atol=1e-4)  # full rank: exact
    with pytest.raises(ValueError, match="k must be in"):
        pca.fit(x, 17)
