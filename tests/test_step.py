"""Tests of aejax.step: mixed precision, the objective's reconstruction kind, non-finite steps
(the loop around the step is tested in tests/test_trainer.py)."""

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
    state = step.TrainState.create(params, tx)
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


def test_the_reconstruction_kind_is_said_once():
    """The error metrics score the objective's own reconstruction: linear outputs stay linear."""
    x = jnp.asarray(np.random.default_rng(0).random((8, 6)), jnp.float32)
    model = models.MLPAutoencoder(input_shape=(6,), hidden=(), code_size=3)
    params = models.init(model, jax.random.PRNGKey(0), x)
    logits = model.apply({"params": params}, x)[0]
    for kind, images in (("mse_linear", logits), ("bce", jax.nn.sigmoid(logits))):
        fn = step.make_per_example_fn(model, objectives.build(kind, {}))
        _, metrics = fn(params, {"x": x}, jax.random.PRNGKey(0), 0)
        np.testing.assert_allclose(metrics["squared_error_per_image"],
                                   np.square(np.asarray(images) - np.asarray(x)).sum(1), rtol=1e-5)
    with pytest.raises(ValueError, match="needs an objective .* with a reconstruction term"):
        step.make_per_example_fn(model, objectives.combine({"l1": (1.0, objectives.l1_activity())}))


def test_a_non_finite_step_is_recorded_once():
    x = jnp.ones((4, 3))
    model = models.MLPAutoencoder(input_shape=(3,), hidden=(), code_size=2)
    params = models.init(model, jax.random.PRNGKey(0), x)
    tx = optax.sgd(1.0)
    fn = step.make_per_example_fn(model, objectives.build("mse_linear", {}))
    train_step = jax.jit(step.make_train_step(fn, tx))
    state = step.TrainState.create(params, tx)
    state, _ = train_step(state, {"x": x}, jax.random.PRNGKey(0))
    assert int(state.bad_step) == -1
    for _ in range(2):
        state, metrics = train_step(state, {"x": x * np.nan}, jax.random.PRNGKey(0))
    assert int(state.bad_step) == 1 and int(state.step) == 3  # the first bad step, kept
    assert not np.isfinite(metrics["loss"])


def test_per_device_step_equals_the_global_step_on_one_device():
    """make_train_step(axis_name=...) under jax.pmap on one device = the global step."""
    x = jnp.asarray(np.random.default_rng(1).random((8, 5)), jnp.float32)
    model = models.MLPAutoencoder(input_shape=(5,), hidden=(4,), code_size=2)
    params = models.init(model, jax.random.PRNGKey(0), x)
    tx = optax.adam(1e-2)
    fn = step.make_per_example_fn(model, objectives.build("bce", {}))
    state = step.TrainState.create(params, tx)
    ref, ref_metrics = jax.jit(step.make_train_step(step.shardwise(fn, 1), tx))(
        state, {"x": x}, jax.random.PRNGKey(3))
    stacked = jax.tree.map(lambda a: jnp.asarray(a)[None], state)
    out, metrics = step.make_pmap_step(fn, tx)(stacked, {"x": x[None]}, jax.random.PRNGKey(3))
    for a, b in zip(jax.tree.leaves((ref, ref_metrics)), jax.tree.leaves((out, metrics))):
        np.testing.assert_allclose(np.asarray(b)[0], a, rtol=1e-6, atol=1e-7)


def test_an_empty_batch_is_a_clear_error_everywhere():
    from aejax import losses

    model = models.MLPAutoencoder(hidden=(8,), code_size=3, input_shape=(16,))
    x = jnp.zeros((2, 16))
    empty = jnp.zeros((0, 16))
    params = models.init(model, jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="the batch is empty"):
        models.init(model, jax.random.PRNGKey(0), empty)
    with pytest.raises(ValueError, match="the batch is empty"):
        model.apply({"params": params}, empty, rngs={models.SAMPLE_RNG: jax.random.PRNGKey(0)})
    for fn in (losses.bce_with_logits, losses.squared_error, losses.mse):
        with pytest.raises(ValueError, match="the batch is empty"):
            fn(empty, empty)
    with pytest.raises(ValueError, match="B >= 1"):
        losses.contractive(lambda v: v[:, :2], empty)
    tx = optax.sgd(0.1)
    train_step = step.make_train_step(step.make_per_example_fn(model, objectives.build("bce", {})), tx)
    with pytest.raises(ValueError, match="the batch is empty"):
        train_step(step.TrainState.create(params, tx), {"x": empty}, jax.random.PRNGKey(0))
