"""Tests of aejax.step: mixed precision (the rest of the step is tested in tests/test_train.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aejax import models, objectives, step

# bfloat16 keeps 8 significant bits: one rounding is off by up to 2^-9 (0.2%) relative. The
# logits reach the float32 BCE after such roundings, which average out over 64 pixels and 64
# examples; the gradient comes from a bfloat16 backward pass. Measured: the loss agrees to 2e-5
# and the SGD update (proportional to the gradient) to 3e-3, relative. The bounds are about one
# bfloat16 rounding for the loss and a few for the update.
LOSS_RTOL, UPDATE_RTOL = 2e-3, 2e-2


def one_step(compute_dtype, x, model, params, tx):
    per_example = step.make_per_example_fn(model, objectives.build("bce", {}),
                                           compute_dtype=compute_dtype)
    state = step.TrainState.create(params, tx, step.metrics_template(per_example, params, x))
    new, metrics = jax.jit(step.make_train_step(per_example, tx))(state, {"x": x},
                                                                 jax.random.PRNGKey(1))
    return new, metrics


def test_bfloat16_step_agrees_with_float32_and_keeps_float32_state(small_splits):
    x = jnp.asarray(small_splits.train[0][:64])
    model = models.MLPAutoencoder(input_shape=(64,), hidden=(32,), code_size=4, activation="tanh")
    params = models.init(model, jax.random.PRNGKey(0), x)
    tx = optax.sgd(0.1)
    f32, m32 = one_step("float32", x, model, params, tx)
    bf16, m16 = one_step("bfloat16", x, model, params, tx)
    for leaf in jax.tree.leaves((bf16.params, bf16.opt_state, m16)):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
    np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=LOSS_RTOL)
    assert float(m16["loss"]) != float(m32["loss"])  # really computed in bfloat16
    delta = lambda s: jnp.concatenate([(a - b).ravel() for a, b in zip(
        jax.tree.leaves(s.params), jax.tree.leaves(params))])
    d32, d16 = delta(f32), delta(bf16)
    assert float(jnp.linalg.norm(d16 - d32) / jnp.linalg.norm(d32)) < UPDATE_RTOL


def test_unknown_compute_dtype_is_refused():
    model = models.MLPAutoencoder(input_shape=(4,), hidden=(), code_size=2)
    with pytest.raises(ValueError, match="Unknown compute_dtype 'float16'"):
        step.make_per_example_fn(model, objectives.build("bce", {}), compute_dtype="float16")
