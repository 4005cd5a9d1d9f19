"""The contractive estimator audit in the loop: config.contractive_audit.every logs split "audit"."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from test_trainer import params_of, small_config

from aejax import losses, models
from aejax.runtime import config as run_config
from aejax.runtime import trainer


def test_the_audit_is_logged_every_n_steps_and_its_exact_value_is_the_penalty(small_splits, tmp_path):
    c = small_config(num_epochs=2, tensorboard=False, log_every_steps=8, **{
        "contractive_audit.every": 16, "contractive_audit.estimator": "hutch++",
        "contractive_audit.num_probes": 3, "contractive_audit.examples": 32,
        "loss.terms": {"contractive": {"weight": 0.1}}})
    trainer.train_and_evaluate(c, str(tmp_path), splits=small_splits)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    audits = [r for r in rows if r["split"] == "audit"]
    assert [r["step"] for r in audits] == [16, 32]  # 16 steps an epoch, 2 epochs
    for r in audits:
        assert r["audit_exact"] > 0 and -1.0 <= r["audit_grad_cosine"] <= 1.0
        np.testing.assert_allclose(r["audit_rel_error"],
                                   abs(r["audit_estimate"] - r["audit_exact"]) / r["audit_exact"],
                                   rtol=1e-4)
    # At the last step the parameters are the final checkpoint's: the exact value is theirs.
    c2 = small_config(num_epochs=2, **{"contractive_audit.every": 0})
    model = models.from_config(c2.model)
    params, step = params_of(str(tmp_path))
    assert step == 32
    exact = losses.contractive(models.encoder(model, params), jnp.asarray(small_splits.validation[0][:32]),
                               mode="rev")
    np.testing.assert_allclose(audits[-1]["audit_exact"], float(exact.mean()), rtol=1e-5)


@pytest.mark.parametrize("key,value,match", [
    ("contractive_audit.every", 7, "multiple of log_every_steps"),
    ("contractive_audit.estimator", "xtrace", "Unknown estimator"),
    ("contractive_audit.num_probes", 2, "Hutch\\+\\+ needs 3"),
])
def test_bad_audit_settings_are_one_line(key, value, match):
    c = small_config(**{"contractive_audit.estimator": "hutch++", "contractive_audit.num_probes": 3})
    section, name = key.split(".")
    c[section][name] = value
    with pytest.raises(run_config.ConfigError, match=match):
        run_config.validate(c, data_given=True)
