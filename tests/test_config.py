"""Tests of aejax.runtime.config: the optimizer a config names, and its checks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aejax.runtime import config as run_config


def test_sgd_nesterov_with_schedule_weight_decay_and_clipping_is_the_hand_built_chain():
    cfg = run_config.default_config().optimizer
    cfg.update(name="sgd", learning_rate=0.05, momentum=0.9, nesterov=True,
               schedule="warmup_cosine", warmup_steps=5, weight_decay=1e-4, grad_clip_norm=1.0)
    tx = run_config.build_optimizer(cfg, total_steps=40, steps_per_epoch=10)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 0.05, 5, 40)
    by_hand = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.chain(optax.add_decayed_weights(1e-4),
                                      optax.sgd(schedule, momentum=0.9, nesterov=True)))
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.ones(3)}
    grads = lambda i: jax.tree.map(lambda p: jnp.cos(p * (i + 1)) * 3.0, params)
    p1, p2 = params, params
    s1, s2 = tx.init(params), by_hand.init(params)
    for i in range(8):  # past the warm-up; the clipping is active (the gradient norm is > 1)
        u1, s1 = tx.update(grads(i), s1, p1)
        u2, s2 = by_hand.update(grads(i), s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    jax.tree.map(np.testing.assert_array_equal, p1, p2)
    assert float(optax.tree.norm(jax.tree.map(jnp.subtract, p1, params))) > 1e-3


def test_adam_with_weight_decay_is_adamw():
    cfg = run_config.default_config().optimizer
    cfg.update(weight_decay=0.01, learning_rate=1e-2)
    tx = run_config.build_optimizer(cfg, total_steps=10, steps_per_epoch=5)
    by_hand = optax.adamw(optax.constant_schedule(1e-2), b1=0.9, b2=0.999, weight_decay=0.01)
    params = {"w": jnp.arange(4.0)}
    g = {"w": jnp.array([0.3, -1.0, 2.0, 0.0])}
    u1, _ = tx.update(g, tx.init(params), params)
    u2, _ = by_hand.update(g, by_hand.init(params), params)
    np.testing.assert_array_equal(u1["w"], u2["w"])


@pytest.mark.parametrize("key,value,match", [
    ("learning_rate", 0.0, "must be a positive number"),
    ("schedule", "cyclic", "Unknown optimizer.schedule 'cyclic'"),
    ("name", "adagrad", "Unknown optimizer.name 'adagrad'"),
])
def test_bad_optimizer_settings_are_config_errors(key, value, match):
    cfg = run_config.default_config().optimizer
    cfg[key] = value
    with pytest.raises(run_config.ConfigError, match=match):
        run_config.build_optimizer(cfg, 10, 5)
