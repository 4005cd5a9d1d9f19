"""Tests of aejax.runtime.config: the optimizer a config names, and its checks."""

import glob
import importlib
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aejax.runtime import config as run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_burda_schedule_and_adam_epsilon_are_burdas_protocol():
    cfg = run_config.default_config().optimizer
    cfg.update(schedule="burda", eps=1e-4)
    spe = 3
    tx = run_config.build_optimizer(cfg, total_steps=121 * spe, steps_per_epoch=spe)
    schedule = run_config.burda_schedule(1e-3, spe, 121 * spe)
    # 10^(-i/7) * 1e-3 for 3^i epochs: stages start at epochs 0, 1, 4, 13, 40.
    for epoch, i in [(0, 0), (1, 1), (3, 1), (4, 2), (12, 2), (13, 3), (39, 3), (40, 4), (120, 4)]:
        for s in (epoch * spe, epoch * spe + spe - 1):
            np.testing.assert_allclose(float(schedule(s)), 1e-3 * 10 ** (-i / 7), rtol=1e-6)
    by_hand = optax.adam(schedule, b1=0.9, b2=0.999, eps=1e-4)
    params = {"w": jnp.arange(4.0)}
    g = {"w": jnp.array([3e-5, -1.0, 2.0, 0.0])}  # eps matters where the gradient is small
    s1, s2 = tx.init(params), by_hand.init(params)
    for _ in range(5):
        u1, s1 = tx.update(g, s1, params)
        u2, s2 = by_hand.update(g, s2, params)
        np.testing.assert_array_equal(u1["w"], u2["w"])
    u_default, _ = optax.adam(1e-3).update(g, optax.adam(1e-3).init(params), params)
    assert abs(float(u_default["w"][0]) - float(u1["w"][0])) > 1e-4


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


# --------------------------------------------------------------------------- validate


def tiny_config(**overrides):
    """experiments/configs/tiny.py with a contractive term, then ``overrides`` (dotted keys)."""
    from experiments.configs import tiny

    c = tiny.get_config()
    c.loss.terms.contractive = dict(weight=0.1, mode="best")
    for key, value in overrides.items():
        *path, last = key.split(".")
        target = c
        for part in path:
            target = target[part]
        with target.ignore_type():
            target[last] = value
    return c


@pytest.mark.parametrize("key,value,match", [
    # names, against the choices where they live
    ("model.name", "foo", "Unknown model 'foo'"),
    ("model.activation", "swish2", "Unknown activation 'swish2' \\(model.activation\\)"),
    ("model.code_activation", "Relu", "Unknown activation 'Relu'"),
    ("corruption.kind", "blur", "Unknown corruption 'blur' \\(corruption.kind\\)"),
    ("loss.reconstruction", "l3", "Unknown reconstruction 'l3' \\(loss.reconstruction\\)"),
    ("loss.terms.contractive.mode", "fast", "Unknown contractive mode 'fast'"),
    ("loss.terms.l2", {"weight": 1.0}, "Unknown loss term 'l2'"),
    ("data.name", "cifar10", "Unknown dataset 'cifar10'"),
    ("optimizer.name", "adagrad", "Unknown optimizer.name 'adagrad'"),
    ("optimizer.schedule", "cyclic", "Unknown optimizer.schedule 'cyclic'"),
    ("parallel", "gpu", "Unknown parallel mode 'gpu'"),
    ("compute_dtype", "fp16", "Unknown compute_dtype 'fp16'"),
    ("wandb.mode", "cloud", "Unknown W&B mode 'cloud' \\(wandb.mode\\)"),
    # ranges
    ("model.code_size", 0, "model.code_size must be positive"),
    ("model.hidden", (64, 0), "model.hidden must be a tuple of positive integers"),
    ("loss.terms.contractive.weight", -0.1, "contractive.weight must be a finite number >= 0"),
    ("loss.terms.contractive.weight", float("nan"), "contractive.weight must be a finite"),
    ("loss.terms.contractive.num_probes", 0, "num_probes must be positive"),
    ("loss.terms.contractive.warmup_steps", -1, "warmup_steps must be an integer >= 0"),
    ("seed", -1, "seed must be an integer in \\[0, "),
    ("keep_checkpoints", 0, "keep_checkpoints must be positive"),
    ("early_stopping_patience", -1, "early_stopping_patience must be an integer >= 0"),
    ("early_stopping_min_delta", -0.1, "early_stopping_min_delta must be a finite number >= 0"),
    ("monitor", "", "monitor must be the name of a validation metric"),
    ("num_epochs", 0, "num_epochs must be positive .*a run of 0 epochs trains nothing"),
    ("batch_size", 0, "batch_size must be positive"),
    ("batch_size", 5000, "batch_size 5000 is larger than data.train_examples 2000"),
    ("eval_batch_size", -1, "eval_batch_size must be positive"),
    ("log_every_steps", 0, "log_every_steps must be positive"),
    ("checkpoint_every_steps", 0, "checkpoint_every_steps must be positive"),
    ("num_figure_images", 0, "num_figure_images must be positive"),
    ("iwae_samples", -1, "iwae_samples must be an integer >= 0"),
    ("stacking.pretrain_epochs", -1, "stacking.pretrain_epochs must be an integer >= 0"),
    ("data.validation_size", 0, "data.validation_size must be a number of examples >= 1"),
    ("data.validation_size", 1.0, "data.validation_size must be"),
    ("data.train_examples", -5, "data.train_examples must be an integer >= 0"),
    ("data.classes", (3, 10), "data.classes must be a tuple of labels in 0..9"),
    ("optimizer.learning_rate", 0.0, "optimizer.learning_rate must be a positive number"),
    ("optimizer.learning_rate", float("inf"), "optimizer.learning_rate must be a positive number"),
    ("optimizer.decay_rate", 0.0, "optimizer.decay_rate must be a number in \\(0, 1\\]"),
    ("optimizer.b2", 1.0, "optimizer.b2 must be a number in \\[0, 1\\)"),
    ("optimizer.weight_decay", -1e-4, "optimizer.weight_decay must be a finite number >= 0"),
    ("optimizer.grad_clip_norm", -1.0, "optimizer.grad_clip_norm must be a finite number >= 0"),
    ("distributed.num_processes", 0, "distributed.num_processes must be positive"),
    ("distributed.process_id", 1, "distributed.process_id must be an integer in \\[0, 1\\)"),
    ("distributed.heartbeat_timeout", 0, "heartbeat_timeout must be positive"),
    # types
    ("model.tied", 1, "model.tied must be True or False"),
    ("figures", "yes", "figures must be True or False"),
    ("tensorboard", "yes", "tensorboard must be True or False"),
    ("wandb.enabled", 1, "wandb.enabled must be True or False"),
    ("wandb.project", "", "wandb.project must be a W&B project name"),
    ("data.flat", None, "data.flat must be True or False"),
    ("num_epochs", 2.5, "num_epochs must be positive"),
    ("seed", True, "seed must be an integer"),
    # the builders' own checks, run by validate
    ("model.widths", (3,), "Model 'mlp' has no option\\(s\\) \\['widths'\\]"),
    ("loss.terms.contractive.probes", 2, "got unknown options"),
    # the generative members' terms
    ("loss.reconstruction_weight", -1.0, "loss.reconstruction_weight must be a finite number >= 0"),
    ("loss.terms.mmd", {"kernel": "laplace"}, "Unknown mmd kernel 'laplace' \\(loss.terms.mmd.kernel\\)"),
    ("loss.terms.mmd", {"sigma": 0.0}, "loss.terms.mmd.sigma must be a positive number"),
    ("loss.terms.mmd", {"scales": (1.0, -2.0)}, "mmd: sigma and scales must be positive"),
    ("loss.terms.total_correlation", {"weight": 6.0}, "total_correlation needs dataset_size=N"),
    ("loss.terms.dimwise_kl", {"dataset_size": 0}, "dimwise_kl.dataset_size must be positive"),
    ("loss.terms.iwae", {"num_samples": 0}, "loss.terms.iwae.num_samples must be positive"),
    ("loss.terms.decoder_jacobian", {"mode": "dense"},
     "Unknown decoder_jacobian mode 'dense' \\(loss.terms.decoder_jacobian.mode\\); choose one of 'fwd'"),
])
def test_validate_rejects_each_bad_value_in_one_line(key, value, match):
    with pytest.raises(run_config.ConfigError, match=match) as e:
        run_config.validate(tiny_config(**{key: value}))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key,package", [("tensorboard", "tensorboardX"),
                                         ("wandb.enabled", "wandb")])
def test_a_writer_whose_package_is_missing_is_a_config_error(monkeypatch, key, package):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == package else find_spec(name, *a))
    with pytest.raises(run_config.ConfigError, match=f"{key}=True needs the {package} package"):
        run_config.validate(tiny_config(**{key: True}))
    run_config.validate(tiny_config(**{key: False}))


def test_validate_checks_corruption_options_and_term_ranges():
    c = tiny_config(**{"corruption.kind": "gaussian"})
    c.corruption.std = -1.0
    with pytest.raises(run_config.ConfigError, match="corruption: gaussian: std must be >= 0"):
        run_config.validate(c)
    c = tiny_config()
    c.loss.terms.kl_sparsity = dict(weight=1.0, rho=1.5)
    with pytest.raises(run_config.ConfigError, match="kl_sparsity.rho must be a number in \\(0, 1\\)"):
        run_config.validate(c)


def test_validate_accepts_every_experiment_config():
    paths = sorted(glob.glob(os.path.join(REPO, "experiments", "configs", "*.py")))
    names = [os.path.basename(p)[:-3] for p in paths if not p.endswith("__init__.py")]
    assert len(names) >= 10
    for name in names:
        run_config.validate(importlib.import_module(f"experiments.configs.{name}").get_config())


def test_zero_epochs_is_allowed_after_greedy_pretraining():
    # Fine-tuning for 0 epochs keeps the stacked parameters (tests/test_configs.py uses it).
    run_config.validate(tiny_config(**{"num_epochs": 0, "stacking.pretrain_epochs": 1}))


def test_dataset_name_is_a_label_when_the_data_is_given():
    c = tiny_config(**{"data.name": "my_images"})
    run_config.validate(c, data_given=True)
    with pytest.raises(run_config.ConfigError, match="Unknown dataset 'my_images'"):
        run_config.validate(c)


class UsersModel(nn.Module):
    """A user's model: its options are its own, and validate leaves their values to it."""

    activation: str = "swish"
    code_size: int = 0

    def __call__(self, x):
        return x, {"code": x}


def test_a_users_model_options_are_its_own():
    import ml_collections

    c = tiny_config()
    c.model = ml_collections.ConfigDict(dict(name=f"{__name__}:UsersModel", activation="swish",
                                             code_size=0))
    run_config.validate(c)  # neither "swish" nor 0 is checked: not an aejax model
    c.model.hidden = (3,)
    with pytest.raises(run_config.ConfigError, match=r"has no option\(s\) \['hidden'\]"):
        run_config.validate(c)


@pytest.mark.parametrize("path,missing,close", [
    ("optimizer.lr", "optimizer.lr", "optimizer.learning_rate"),
    ("num_epoch", "num_epoch", "num_epochs"),
    ("epochs", "epochs", "num_epochs"),
    ("optimizer.wd", "optimizer.wd", "optimizer.weight_decay"),
    ("data.flat", None, None),
    ("model.code_size", None, None),
])
def test_missing_key_names_the_key_and_the_one_meant(path, missing, close):
    found = run_config.missing_key(run_config.default_config(), path)
    if missing is None:
        assert found is None
    else:
        assert found[:2] == (missing, close)


def test_unknown_nested_key_suggests_its_dotted_path():
    c = run_config.default_config()
    c.optimizer.unlock()
    c.optimizer.lr = 0.1
    with pytest.raises(run_config.ConfigError, match="Did you mean 'optimizer.learning_rate'"):
        run_config.check_config(c)


@pytest.mark.parametrize("key,value,match", [
    ("monitor", "foo", "monitor 'foo' is not a validation metric"),
    ("model.upsampling", "cubic", "upsampling"),
    ("model.likelihood", "poisson", "likelihood"),
])
def test_model_objective_and_monitor_are_checked_before_the_data_is_read(monkeypatch, key, value,
                                                                          match):
    from aejax.data import splits as splits_lib
    from aejax.runtime import trainer

    def no_data(*args, **kwargs):
        raise AssertionError("the data was read before the configuration was checked")

    monkeypatch.setattr(splits_lib, "load", no_data)
    cfg = run_config.default_config()
    if key.startswith("model."):
        cfg.model.name = "conv" if key == "model.upsampling" else "vae"
        cfg.data.flat = key != "model.upsampling"
    section, _, name = key.rpartition(".")
    (cfg.model if section == "model" else cfg)[name] = value
    with pytest.raises(ValueError, match=match):
        trainer.build_experiment(cfg)
