"""The README's library examples run as written, and what they print is what they claim."""

import contextlib
import io
import os
import re

import jax
import numpy as np

from aejax import models

README = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")


def python_blocks():
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)
    assert len(blocks) >= 3, "the README lost its python examples"
    return blocks


def test_readme_step_example_runs_and_its_loss_is_the_weighted_sum_of_its_terms():
    namespace = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(python_blocks()[0], "README.md", "exec"), namespace)
    printed = out.getvalue()
    for term in ("reconstruction", "contractive", "l1", "loss", "grad_norm"):
        assert f"'{term}'" in printed
    m = {k: float(v) for k, v in namespace["metrics"].items()}
    # "every term is logged": the logged loss is the objective's weighted sum of the logged parts.
    np.testing.assert_allclose(m["loss"], m["reconstruction"] + 0.1 * m["contractive"]
                               + 1e-3 * m["l1"], rtol=1e-5)
    assert int(namespace["state"].step) == 1 and m["contractive"] > 0


def test_readme_user_model_follows_the_protocol():
    namespace = {}
    try:
        exec(compile(python_blocks()[1], "README.md", "exec"), namespace)
        model = models.create("mine", code_size=5)
        x = jax.random.uniform(jax.random.PRNGKey(0), (3, 20))
        params = models.init(model, jax.random.PRNGKey(1), x)
        assert models.describe(model, params, x) == models.Description(5, False, ("code",))
        _, _, activations = models.forward(model, params, x, jax.random.PRNGKey(2))
        assert set(activations) == {"hidden_0", "code"}
    finally:
        models.MODELS.pop("mine", None)


def test_readme_generative_composition_runs_and_its_loss_is_the_weighted_sum():
    namespace = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(python_blocks()[2], "README.md", "exec"), namespace)
    m = {k: float(v) for k, v in namespace["metrics"].items()}
    for term in ("reconstruction", "kl", "total_correlation", "mmd", "contractive", "elbo"):
        assert f"'{term}'" in out.getvalue()
    np.testing.assert_allclose(m["loss"], m["reconstruction"] + m["kl"] + 5.0 * m["total_correlation"]
                               + 10.0 * m["mmd"] + 0.01 * m["contractive"], rtol=1e-5)
    assert int(namespace["state"].step) == 1 and m["contractive"] > 0 and m["mmd"] != 0
