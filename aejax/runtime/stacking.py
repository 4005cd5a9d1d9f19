"""Greedy layer-wise training of a deep MLP autoencoder, then end-to-end fine-tuning.

Each layer pair is trained as a one-hidden-layer autoencoder on the codes of the previous one
(Hinton & Salakhutdinov 2006 pretrained this way before fine-tuning); the pairs are stacked
into the deep model, which is then trained end to end.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any, Optional

import ml_collections
import numpy as np

from aejax import models
from aejax.data import splits as splits_lib
from aejax.runtime import trainer
from aejax.runtime.config import ConfigError, check_config, data_options

log = logging.getLogger(__name__)


def _encode_splits(model, params, splits: splits_lib.Splits) -> splits_lib.Splits:
    return splits_lib.Splits(*[(np.asarray(models.encode_batched(model, params, x)), y)
                               for x, y in splits])


def stage_config(config: ml_collections.ConfigDict, stage: int) -> ml_collections.ConfigDict:
    """Config of layer pair ``stage``: a one-hidden-layer autoencoder on the previous codes."""
    m = config.model
    dims = (int(np.prod(m.get("input_shape", (784,)))), *m.hidden, m.code_size)
    last = stage == len(dims) - 2
    c = copy.deepcopy(config)
    c.model = ml_collections.ConfigDict(dict(
        name="mlp", input_shape=(dims[stage],), hidden=(), code_size=dims[stage + 1],
        activation=m.activation, code_activation=m.code_activation if last else m.activation))
    if stage > 0:
        # Codes of sigmoid units lie in (0, 1) and are modelled as Bernoulli means (as an RBM's
        # would be); other units are real-valued.
        c.loss.reconstruction = "bce" if m.activation == "sigmoid" else "mse_linear"
        c.loss.terms = ml_collections.ConfigDict()
        c.corruption = ml_collections.ConfigDict(dict(kind="none"))
    c.num_epochs = config.stacking.pretrain_epochs
    c.early_stopping_patience = 0
    c.pca_baseline = False
    c.figures = False
    return c


def train_stacked(config: ml_collections.ConfigDict, workdir: str, *,
                  splits: Optional[splits_lib.Splits] = None) -> dict:
    """Pretrains ``config.model`` layer pair by layer pair, then fine-tunes it end to end.

    Writes ``stage_<i>/`` and ``finetune/`` runs under ``workdir`` (each resumable), and, when
    ``config.stacking.compare_scratch``, ``scratch/``: the same model trained from a random start
    for as many epochs as the fine-tuning. ``workdir/summary.json`` holds all of them.

    Returns:
      The summary dict.
    """
    if config.model.name != "mlp" or config.model.get("tied", False):
        raise ConfigError("Greedy stacking needs an untied MLP model (model.name='mlp').")
    if splits is None:
        check_config(config)
        splits = splits_lib.load(config.data.name, **data_options(config))
    os.makedirs(workdir, exist_ok=True)
    num_stages = len(config.model.hidden) + 1
    stage_params, stage_splits, stages = [], splits, []
    for i in range(num_stages):
        cfg = stage_config(config, i)
        stage_dir = os.path.join(workdir, f"stage_{i}")
        log.info("Pretraining layer pair %d of %d: %s", i + 1, num_stages, dict(cfg.model))
        summary = trainer.train_and_evaluate(cfg, stage_dir, splits=stage_splits)
        params = trainer.load_best_params(stage_dir)
        stages.append({"model": cfg.model.to_dict(), "test": summary["test"]})
        stage_params.append(params)
        if i < num_stages - 1:
            stage_splits = _encode_splits(models.from_config(cfg.model), params, stage_splits)
    result = {"stages": stages}
    finetune = trainer.train_and_evaluate(config, os.path.join(workdir, "finetune"), splits=splits,
                                        init_params=models.stack_mlp_params(stage_params))
    result["finetune"] = finetune
    if config.stacking.compare_scratch:
        result["scratch"] = trainer.train_and_evaluate(config, os.path.join(workdir, "scratch"),
                                                     splits=splits)
        result["stacked_beats_scratch"] = (finetune["test"]["squared_error_per_image"]
                                           < result["scratch"]["test"]["squared_error_per_image"])
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains ``config``: greedily stacked when ``config.stacking.pretrain_epochs > 0``, else
    directly (:func:`aejax.runtime.trainer.train_and_evaluate`)."""
    if config.stacking.pretrain_epochs > 0:
        return train_stacked(config, workdir)
    return trainer.train_and_evaluate(config, workdir)
