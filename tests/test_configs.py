"""Every experiment config runs end to end on a tiny slice of real Fashion-MNIST, and says how to run it."""

import importlib
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aejax import models
from aejax.runtime import config as run_config
from aejax.runtime import stacking, trainer
from aejax.data import splits as data_splits
from experiments import family

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments", "configs")
ALL = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and f != "__init__.py")


@pytest.fixture(scope="module")
def tiny_fashion(fashion_data_dir):
    s = data_splits.load("fashion_mnist", validation_size=200, flat=True)
    return data_splits.Splits((s.train[0][:600], s.train[1][:600]), s.validation,
                       (s.test[0][:200], s.test[1][:200]))


def shrink(config):
    config.num_epochs = 1
    config.batch_size = 50
    config.eval_batch_size = 100
    config.progress = False
    config.figures = False
    config.iwae_samples = min(config.iwae_samples, 8)
    config.stacking.pretrain_epochs = min(config.stacking.pretrain_epochs, 1)
    return config


@pytest.mark.parametrize("name", ALL)
def test_config_docstring_says_how_to_run_it(name):
    doc = importlib.import_module(f"experiments.configs.{name}").__doc__
    assert f"--config=experiments/configs/{name}.py" in doc and "Expect" in doc
    run_config.check_config(importlib.import_module(f"experiments.configs.{name}").get_config())


@pytest.mark.parametrize("name", family.FAMILY)
def test_family_config_trains_on_real_data(name, tiny_fashion, tmp_path):
    config = shrink(family.load_config(name))
    splits = tiny_fashion
    if not config.data.flat:
        splits = data_splits.Splits(*[(x.reshape(-1, 28, 28, 1), y) for x, y in splits])
    if config.stacking.pretrain_epochs:
        out = stacking.train_stacked(config, str(tmp_path), splits=splits)
        summary = out["finetune"]
        assert len(out["stages"]) == len(config.model.hidden) + 1
        assert "stacked_beats_scratch" in out
    else:
        summary = trainer.train_and_evaluate(config, str(tmp_path), splits=splits)
    test = summary["test"]
    assert all(math.isfinite(v) for v in test.values())
    for term in config.loss.terms:
        assert term in test  # every term is reported
    if name == "vae":
        assert {"elbo", "iwae_nll", "iwae_nll_k1", "kl"} <= set(test)
        # On the same binarized images the k-sample bound is tighter than k = 1 (up to MC noise).
        assert test["iwae_nll"] <= test["iwae_nll_k1"] + 0.5
        assert abs(test["iwae_nll_k1"] + test["elbo"]) < 5.0  # -ELBO, other binarizations
    if config.pca_baseline:
        # PCA is scored on the targets the model is scored on: binary for a binarizing config.
        assert summary["pca"]["targets"] == ("binarized" if config.data.binarize else "grey levels")
    if name in family.GENERATIVE:  # what experiments/quality.py scores: images in [0, 1]
        from experiments import quality

        sample, description = quality.generator(config, str(tmp_path), splits, components=2)
        images = sample(jax.random.PRNGKey(0), 7)
        assert images.shape == (7, 784) and np.all((images >= 0) & (images <= 1))
        assert ("GMM" in description) == (name == "rae")
        assert ("marginals" in description) == (name == "vqvae")


def test_family_table_keeps_the_rows_of_configs_not_run(tmp_path):
    path = tmp_path / "FAMILY.md"
    path.write_text("\n".join(["# t", "", family.HEADER, "|---|", "| vanilla | 1 | 2 |",
                               "| vae | 3 | 4 |", "", family.QUALITY_HEADER, "|---|",
                               "| vae | z | 1.00 | 0.5 | 0.5 |", "", "after"]) + "\n")
    assert family.kept_rows(str(path), family.HEADER, {"vae"}) == {"vanilla": "| vanilla | 1 | 2 |"}
    assert family.kept_rows(str(path), family.QUALITY_HEADER, {"wae"}) == {
        "vae": "| vae | z | 1.00 | 0.5 | 0.5 |"}
    assert family.quality_row("vqvae", {"sampler": "no prior"}) == "| vqvae | no prior | — | — | — |"


def test_stacked_params_compose_the_stage_encoders(tiny_fashion, tmp_path):
    """The deep model built from the stages encodes exactly as the stages chained."""
    config = shrink(family.load_config("stacked"))
    config.stacking.compare_scratch = False
    config.num_epochs = 0  # fine-tuning of 0 epochs keeps the stacked parameters
    stacking.train_stacked(config, str(tmp_path), splits=tiny_fashion)
    stage_params = [trainer.load_best_params(str(tmp_path / f"stage_{i}")) for i in range(3)]
    x = jnp.asarray(tiny_fashion.test[0][:16])
    h = x
    for i, p in enumerate(stage_params):
        cfg = stacking.stage_config(config, i)
        m = models.create("mlp", **{k: v for k, v in cfg.model.items() if k != "name"})
        h = m.apply({"params": p}, h, method=m.encode)
    deep = models.create("mlp", **{k: v for k, v in config.model.items() if k != "name"})
    got = deep.apply({"params": models.stack_mlp_params(stage_params)}, x, method=deep.encode)
    np.testing.assert_allclose(got, h, rtol=1e-5, atol=1e-5)
