"""The scripts' --seed: a seed changes the training, and its values go into the record under it.

Made-up results stand in for the full runs; the records are copies of the committed ones.
"""

import os
import shutil

import jax
import numpy as np
import pytest

from experiments import repro_configs, repro_generation, repro_linear_pca, repro_sparse
from experiments import repro_upscaling, repro_vae
from experiments import results as records


@pytest.fixture
def record_dir(tmp_path):
    for name in ("sparse", "linear_pca", "upscaling", "vae", "generation", "reconstructions",
                 "deep_vs_pca"):
        shutil.copy(os.path.join(records.RESULTS_DIR, f"{name}.json"), tmp_path)
    return str(tmp_path)


def _add(name, entries, directory):
    before = records.load(os.path.join(directory, f"{name}.json"))
    after = records.record_many(name, entries, directory=directory)
    return before, after


def _seeded_arms_gained_seed(before, after, seed):
    for arm, entry in after["arms"].items():
        if records.arm_kind(entry) == "fixed":
            assert entry == before["arms"][arm]  # PCA, bicubic: no seed, unchanged
        else:
            assert seed in entry["seeds"] and len(entry["seeds"]) == len(set(entry["seeds"]))


def test_sparse_values_are_recorded_under_the_runs_seed(record_dir):
    rows = [dict(kind="l1", weight=0.0, mean_activation=2.0),
            dict(kind="l1", weight=repro_sparse.KERAS_L1, mean_activation=0.5),
            dict(kind="kl", weight=3.0, mean_activation=0.14),
            dict(kind="ng", weight=repro_sparse.NG_BETA, mean_activation=0.07)]
    entries = repro_sparse.record_entries({"seed": 7, "rows": rows})
    assert {s for _, s, _ in entries} == {7}
    assert dict((a, v) for a, _, v in entries)[
        "mean activation ratio, L1 0.0784 / no penalty"] == pytest.approx(0.25)
    before, after = _add("sparse", entries, record_dir)
    _seeded_arms_gained_seed(before, after, 7)


def test_linear_pca_and_upscaling_record_the_seed_and_leave_the_baselines_fixed(record_dir):
    lin = {"seed": 5, "autoencoder_squared_error_per_image": 16.05,
           "pca_squared_error_per_image": 16.0312,
           "max_angle_deg": {"decoder_rows": 20.0, "decoder_rows_vs_top_k_plus_1": 1.0}}
    entries = repro_linear_pca.record_entries(lin)
    assert [s for _, s, _ in entries] == [5, None, 5, 5]
    # The PCA value does not depend on the seed: recording it again leaves the record's as is.
    entries = [e for e in entries if e[1] is not None]
    _seeded_arms_gained_seed(*_add("linear_pca", entries, record_dir), 5)

    up = {"seed": 6, "test": {"autoencoder": {"psnr_db": 21.5}, "bicubic": {"psnr_db": 19.3},
                              "nearest": {"psnr_db": 18.0}}}
    entries = repro_upscaling.record_entries(up)
    assert entries[0] == ("autoencoder", 6, 21.5) and entries[1][1] is None
    _seeded_arms_gained_seed(*_add("upscaling", entries[:1], record_dir), 6)


def test_vae_and_generation_record_the_seed_they_are_given(record_dir):
    res = {"vae50": {"test_elbo_subset": -250.0, "test_iwae_nll_subset": 245.0,
                     "test_elbo_full": -251.0, "active_units": 12},
           "vae2d": {"test_elbo_dynamic": -230.0}}
    entries = repro_vae.record_entries(res, 4)
    assert {s for _, s, _ in entries} == {4}
    _seeded_arms_gained_seed(*_add("vae", entries, record_dir), 4)
    gen = {"test_code_log_likelihood_nats": {"gaussian": -20.0, "gmm_10": -15.0},
           "gmm_components": 10}
    entries = repro_generation.record_entries(gen, 4)
    assert {s for _, s, _ in entries} == {4}
    _seeded_arms_gained_seed(*_add("generation", entries, record_dir), 4)


def test_the_seed_reaches_the_configs():
    assert repro_vae.vae50_config(quick=True, seed=3).seed == 3
    assert repro_vae.vae2d_config(quick=True, seed=3).seed == 3
    assert repro_generation.autoencoder_config(quick=True, seed=3).seed == 3
    for record, arms in repro_configs.ARMS.items():
        for name in arms.values():
            c = repro_configs.load_config(name, 2)
            assert c.seed == 2 and not c.progress and not c.figures


def test_a_seed_changes_the_training_and_the_same_seed_repeats_it():
    x = np.random.default_rng(0).uniform(size=(512, 12)).astype(np.float32)
    train = lambda seed: repro_linear_pca.train_linear_autoencoder(
        x, 3, epochs=1, learning_rate=1e-2, batch_size=64, seed=seed)[1]
    flat = lambda p: np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(p)])
    a, b, c = flat(train(0)), flat(train(0)), flat(train(1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_config_records_declare_their_arms_and_refuse_an_unknown_record(record_dir):
    for record, arms in repro_configs.ARMS.items():
        rec = records.load(os.path.join(record_dir, f"{record}.json"))
        assert set(arms) <= set(rec["arms"])
        entries = [(arm, 9, 7.0 + i) for i, arm in enumerate(arms)]
        _seeded_arms_gained_seed(*_add(record, entries, record_dir), 9)
    with pytest.raises(SystemExit, match="not a config record; choose one of"):
        repro_configs.run("nope", 0, record_dir)
    # A stacked run's summary holds the fine-tuned model's numbers under "finetune".
    assert repro_configs.test_value({"finetune": {"test": {"squared_error_per_image": 7.1}},
                                     "test": {"squared_error_per_image": 99.0}}) == 7.1
    assert repro_configs.test_value({"test": {"squared_error_per_image": 7.2}}) == 7.2
