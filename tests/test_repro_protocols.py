"""Tests of the papers' protocols: Rifai et al.'s CAE (repro_cae), Kingma et al.'s M1
(repro_m1), and the probes they share (L-BFGS logistic regression, early-stopped fine-tuning)."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from aejax import losses, models
from experiments import probes, repro_cae as cae, repro_m1 as m1, results


def _toy_classes(n=600, d=20, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 10)
    centres = rng.normal(size=(10, d)) * 1.5
    return (centres[y] + rng.normal(size=(n, d))).astype(np.float32), y


def test_logistic_regression_matches_scikit_learns_solution():
    from sklearn.linear_model import LogisticRegression

    x, y = _toy_classes()
    l2 = 1e-2
    w, info = probes.logistic_regression(x, y, l2=l2, tolerance=1e-6, max_iterations=1000)
    assert info["grad_norm"] < 1e-6
    # scikit-learn minimizes C * sum(cross-entropy) + ||W||^2 / 2: the same optimum at C = 1/(l2 N).
    ref = LogisticRegression(C=1 / (l2 * len(x)), tol=1e-10, max_iter=10000).fit(x, y)
    np.testing.assert_allclose(np.asarray(w["kernel"]), ref.coef_.T, atol=2e-3)
    # The intercept is unpenalized in both; softmax is invariant to a shared shift.
    b = np.asarray(w["bias"])
    np.testing.assert_allclose(b - b.mean(), ref.intercept_ - ref.intercept_.mean(), atol=5e-3)
    assert probes.logistic_error(w, x, y) == pytest.approx(1 - ref.score(x, y), abs=2 / len(x))


def test_logistic_regression_warm_start_reaches_the_same_optimum():
    x, y = _toy_classes(seed=1)
    cold, _ = probes.logistic_regression(x, y, l2=1e-3, tolerance=1e-6, max_iterations=1000)
    strong, _ = probes.logistic_regression(x, y, l2=1e-1)
    warm, _ = probes.logistic_regression(x, y, l2=1e-3, tolerance=1e-6, max_iterations=1000,
                                         init=strong)
    np.testing.assert_allclose(np.asarray(warm["kernel"]), np.asarray(cold["kernel"]), atol=1e-3)


def test_early_stopping_keeps_the_best_validation_epoch_and_stops_after_patience():
    x, y = _toy_classes(n=400)
    module = probes.MLPClassifier(hidden=(8,), activation="sigmoid")
    # Validation labels shuffled: the error does not improve for long, so patience stops it.
    x_va, y_va = x[:200], np.random.default_rng(0).permutation(y[:200])
    params, info = probes.fit_classifier_early_stopped(
        module, x, y, epochs=30, batch_size=50, learning_rate=1e-2, validation=(x_va, y_va),
        patience=2)
    history = info["validation_errors"]
    assert info["epochs_run"] == len(history) < 30
    best = int(np.argmin(history))
    assert info["best_epoch"] == best + 1 and info["epochs_run"] == best + 1 + 2
    assert probes.error_rate(module, params, x_va, y_va) == history[best]


def test_fine_tuning_starts_from_the_given_parameters():
    x, y = _toy_classes(n=100, d=12)
    kernel = np.full((12, 4), 0.5, np.float32)
    module = probes.MLPClassifier(hidden=(4,), activation="sigmoid")
    start = dict(module.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]))["params"],
                 Dense_0={"kernel": jnp.asarray(kernel), "bias": jnp.zeros(4)})
    params, _ = probes.fit_classifier_early_stopped(module, x, y, epochs=1, params=start,
                                                    batch_size=50, learning_rate=1e-7)
    np.testing.assert_allclose(np.asarray(params["Dense_0"]["kernel"]), kernel, atol=1e-6)
    fresh, _ = probes.fit_classifier_early_stopped(module, x, y, epochs=1, batch_size=50,
                                                   learning_rate=1e-7)
    assert np.abs(np.asarray(fresh["Dense_0"]["kernel"]) - kernel).max() > 0.1


def test_cae_config_is_a_tied_sigmoid_encoder_with_the_closed_form_penalty():
    c = cae.config("cae", 0.1, seed=0, epochs=1, hidden=16)
    model = models.from_config(c.model)
    assert model.tied and c.loss.terms.contractive.mode == "sigmoid"
    x = jax.random.uniform(jax.random.PRNGKey(0), (5, 784))
    params = models.init(model, jax.random.PRNGKey(1), x)
    assert not any(k.startswith("decoder_") and isinstance(v, dict) and "kernel" in v
                   for k, v in params.items())  # the decoder owns biases only
    m = cae.measure(model, params, np.asarray(x), seed=0, num_points=5)
    assert m["closed_form_vs_fwd_max_relative"] < 1e-4
    encode = models.encoder(model, params)
    frob = np.sqrt(np.asarray(losses.contractive(encode, x, mode="fwd")))
    assert m["jacobian_frobenius_mean"] == pytest.approx(float(frob.mean()), rel=1e-4)
    codes = np.asarray(encode(x))
    assert m["saturation"] == pytest.approx(float(((codes < 0.05) | (codes > 0.95)).mean()))
    with pytest.raises(ValueError, match="unknown representation"):
        cae.config("rbm", None, seed=0, epochs=1)


def test_cae_choice_is_made_on_validation_errors_only(tmp_path):
    cache = cae.Cache(str(tmp_path), {"x": 1})
    for kind, values in cae.GRID.items():
        for i, v in enumerate(values):
            # Validation best at the last value; the test error would pick the first.
            cache.data[cae.run_name(kind, v, 0)] = {"selection": {
                "validation_error": 0.3 - 0.01 * i, "test_error": 0.1 + 0.01 * i}}
    assert cae.choose(cache, "cae") == cae.GRID["cae"][-1]
    assert cae.choose(cache, "ae") is None


def _made_up_cae_output(seeds=(0, 1, 2)):
    chosen = {k: v[0] for k, v in cae.GRID.items()}
    probes_out = {"pixels": {"logistic": {"test_error": 0.16}}}
    for s in seeds:
        for k in cae.ARMS:
            probes_out[cae.run_name(k, chosen[k], s)] = {
                "logistic": {"test_error": 0.15 + 0.001 * s}, "finetune": {"test_error": 0.11},
                "measures": {"jacobian_frobenius_mean": 3.0, "saturation": 0.4}}
        probes_out[f"random_seed{s}"] = {"finetune": {"test_error": 0.12}}
    return {"chosen": chosen, "seeds_done": list(seeds), "probes": probes_out,
            "wall_seconds": 10.0}


def test_cae_record_is_valid_and_records_every_compared_arm(tmp_path):
    rec = cae.make_record(_made_up_cae_output(), epochs=10)
    results.validate(rec, "cae.json")
    entries = cae.record_entries(_made_up_cae_output())
    recorded = {a for a, _, _ in entries}
    assert {c[k] for c in rec["comparisons"] for k in ("a", "b")} <= recorded
    assert rec["arms"]["CAE, logistic regression, test error"]["values"] == [15.0, 15.1, 15.2]
    assert rec["arms"]["raw pixels, logistic regression, test error"] == {"value": 16.0}


def test_m1_draws_are_balanced_and_differ_between_draws():
    y = np.repeat(np.arange(10), 50)
    a = m1.balanced_draw(y, 100, np.random.default_rng([0, 100, 0]))
    b = m1.balanced_draw(y, 100, np.random.default_rng([0, 100, 1]))
    assert np.bincount(y[a], minlength=10).tolist() == [10] * 10 and len(set(a)) == 100
    assert set(a) != set(b)


@pytest.mark.parametrize("kind", sorted(m1.CLASSIFIERS))
def test_m1_classifiers_cross_validate_on_the_labelled_examples_only(kind):
    x, y = _toy_classes(n=300, d=10)
    x_test, y_test = _toy_classes(n=300, d=10, seed=0)  # same distribution
    pred, chosen = m1.fit_predict(kind, x[:100], y[:100], x_test)
    assert pred.shape == (300,) and set(chosen) == ({"C", "gamma"} if kind == "svm" else {"C"})
    assert (pred != y_test).mean() < 0.2
    with pytest.raises(ValueError, match="unknown classifier"):
        m1.fit_predict("tsvm", x[:100], y[:100], x_test)


def test_m1_record_is_valid_and_a_seeds_value_is_the_mean_over_its_draws():
    errors = {f: {str(n): {"svm": [10.0, 12.0], "logreg": [11.0, 13.0]}
                  for n in m1.LABEL_COUNTS} for f in m1.FEATURES}
    runs = [{"seed": s, "errors": errors} for s in (0, 1, 2)]
    rec = m1.make_record(runs, epochs=100, draws=2, wall_seconds=1.0)
    results.validate(rec, "m1.json")
    assert rec["arms"]["VAE (M1) + RBF SVM, 100 labels"] == {"values": [11.0] * 3,
                                                              "seeds": [0, 1, 2]}
    assert {c[k] for c in rec["comparisons"] for k in ("a", "b")} <= set(rec["arms"])


def test_cae_section_shows_the_sweep_the_arms_and_the_verdicts():
    out = _made_up_cae_output()
    for kind in cae.ARMS:
        for v in cae.GRID[kind]:
            entry = out["probes"].setdefault(cae.run_name(kind, v, 0), {})
            entry.update(selection={"validation_error": 0.2},
                         training={"test_squared_error_per_image": 3.0})
    for name, entry in out["probes"].items():
        if "measures" in entry:
            entry["measures"].update(closed_form_vs_fwd_max_relative=1e-7,
                                     encoder_weight_norm=50.0)
        if "finetune" in entry:
            entry["finetune"]["best_epoch"] = 4
        if "logistic" in entry:
            entry["logistic"].update(l2=1e-3, path=[{"l2": 1e-3, "iterations": 200,
                                                     "grad_norm": 0.002}])
    rec = cae.make_record(out, epochs=10)
    text = cae.section(out, rec, epochs=10)
    assert text.startswith(f"### {rec['number']}. ")
    assert "| CAE | lambda 0.01 (chosen) | 20.00 | 3.00 |" in text
    assert "At the edge of its grid: AE + weight decay, DAE-g, DAE-b, CAE" in text
    assert "| CAE | 11.00 ± 0.00 | 15.10 ± 0.10 | 1.14 | 3.00 ± 0.00 | 40.00 ± 0.00 |" in text
    assert "| raw pixels | — | 16.00 |" in text
    assert text.count("**inconclusive") + text.count("**holds") + text.count(
        "**does not hold") == len(rec["comparisons"])
    assert "10 epochs of Adam" in text
    assert "ran 200 to 200 L-BFGS iterations (15 of 15 stopped at the cap of 200" in text
    assert "0 of 18 fine-tuned networks had their best" in text


def test_m1_section_shows_each_feature_and_classifier_and_the_verdicts():
    errors = {f: {str(n): {"svm": [10.0, 12.0], "logreg": [11.0, 13.0]}
                  for n in m1.LABEL_COUNTS} for f in m1.FEATURES}
    runs = [{"seed": s, "errors": errors, "vae_test": {"elbo": -240.0, "kl": 25.0},
             "active_units": 12} for s in (0, 1, 2)]
    rec = m1.make_record(runs, epochs=100, draws=2, wall_seconds=120.0)
    text = m1.section(runs, rec, epochs=100)
    assert "| VAE (M1) | RBF SVM | 11.00 ± 0.00 (1.10) | 11.00 ± 0.00 (1.10) |" in text
    assert "ELBO -240.0, -240.0, -240.0 nats" in text and "100 epochs of Adam" in text
    assert "12, 12, 12 of 50" in text
    assert text.count("**inconclusive") + text.count("**holds") + text.count(
        "**does not hold") == len(rec["comparisons"])


def test_standardize_uses_the_training_statistics_only():
    rng = np.random.default_rng(0)
    train, test = rng.normal(3.0, 2.0, (500, 4)), rng.normal(0.0, 1.0, (50, 4))
    s_train, s_test = probes.standardize(train, test)
    np.testing.assert_allclose(s_train.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(s_train.std(0), 1.0, atol=1e-5)
    np.testing.assert_allclose(s_test, (test - train.mean(0)) / train.std(0), rtol=1e-4)
