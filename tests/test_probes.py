"""The reproduction scripts' probe classifiers (experiments/probes.py) against scikit-learn."""

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.linear_model import LogisticRegression

from aejax import models
from experiments import probes


def blobs(seed, n, dim=20, classes=3):
    rs = np.random.RandomState(seed)
    centers = np.random.RandomState(100).randn(classes, dim) * 1.2
    y = rs.randint(0, classes, n)
    return (centers[y] + rs.randn(n, dim)).astype(np.float32), y.astype(np.int32)


def test_logistic_probe_matches_sklearn_and_compiles_once():
    x_tr, y_tr = blobs(0, 600)
    x_te, y_te = blobs(1, 2000)
    module = probes.MLPClassifier(hidden=(), num_classes=3)
    before = probes._classifier_epoch._cache_size()
    params = probes.fit_classifier(module, x_tr, y_tr, epochs=60, batch_size=100, seed=0)
    ours = probes.error_rate(module, params, x_te, y_te)
    ref = 1 - LogisticRegression(max_iter=2000).fit(x_tr, y_tr).score(x_te, y_te)
    assert ours <= ref + 0.02, (ours, ref)
    # Same module and shapes, other data and seed: no new compilation.
    x2, y2 = blobs(2, 600)
    probes.fit_classifier(module, x2, y2, epochs=2, batch_size=100, seed=1)
    assert probes._classifier_epoch._cache_size() == before + 1


def test_encode_in_batches_equals_one_call():
    model = models.MLPAutoencoder(input_shape=(16,), hidden=(8,), code_size=3)
    x = np.random.RandomState(0).rand(45, 16).astype(np.float32)
    params = models.init(model, jax.random.PRNGKey(0), jnp.asarray(x[:2]))
    got = probes.encode(model, params, x, batch=20)  # 20 + 20 + 5
    want = model.apply({"params": params}, jnp.asarray(x), method=model.encode)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
