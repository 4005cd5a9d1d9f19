"""End to end: the command line on real Fashion-MNIST, resumption, and its error messages."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from aejax import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "experiments.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_tiny_config_end_to_end_extended_by_an_override_then_resume_is_a_no_op(fashion_data_dir,
                                                                              tmp_path):
    work = tmp_path / "run"
    first = cli("--config=experiments/configs/tiny.py", f"--workdir={work}", "--config.num_epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    # A finished run with more epochs asked for continues from its last checkpoint.
    more = cli("--config=experiments/configs/tiny.py", f"--workdir={work}")
    assert more.returncode == 0, more.stderr[-3000:]
    assert "Resumed from step 20" in more.stderr
    summary = json.loads((work / "summary.json").read_text())
    assert summary["dataset"] == "fashion_mnist" and summary["epochs_run"] == 2
    assert summary["steps"] == 2 * (2000 // 100)
    assert 0 < summary["test"]["mse_per_pixel"] < 0.2
    assert summary["pca"]["code_size"] == 16
    for name in ("reconstructions.png", "learning_curves.png", "pca_vs_autoencoder.png"):
        assert (work / name).stat().st_size > 1000
    lines = (work / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if '"validation"' in line] == [20, 40]
    # TensorBoard: one event file per process that trained (the first run and the extension).
    events = {p: p.read_bytes() for p in work.glob("events.out.tfevents.*")}
    assert len(events) == 2 and all(len(b) > 1000 for b in events.values())
    # Running again finds the finished run: no step is retrained, the same test numbers result.
    again = cli("--config=experiments/configs/tiny.py", f"--workdir={work}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "is finished" in again.stderr
    assert json.loads((work / "summary.json").read_text())["test"] == summary["test"]
    assert (work / "metrics.jsonl").read_text().splitlines() == lines
    assert {p: p.read_bytes() for p in work.glob("events.out.tfevents.*")} == events


@pytest.mark.parametrize("args,message", [
    (["--config.num_epoch=3"], 'Did you mean "num_epochs"'),
    (["--config.data.name=cifar10"], "Unknown dataset 'cifar10'"),
    (["--workdir=/proc/no/such/dir"], "Cannot write to workdir"),
])
def test_bad_command_lines_are_one_clear_line(tmp_path, args, message):
    argv = ["--config=experiments/configs/tiny.py", f"--workdir={tmp_path / 'w'}", *args]
    out = cli(*argv, timeout=120)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


# --------------------------------------------------------------------------- a user's own model


class DenseAE(nn.Module):
    """A model written here, not in aejax: the protocol, a sown layer and its dense layers."""

    hidden: int = 32
    code_size: int = 8

    def setup(self):
        self.first = nn.Dense(self.hidden)
        self.second = nn.Dense(self.code_size)
        self.up = nn.Dense(self.hidden)
        self.out = nn.Dense(784)

    def encode(self, x):
        h = nn.sigmoid(self.first(x))
        self.sow("intermediates", "hidden_0", h)
        return self.second(h)

    def decode(self, z):
        return self.out(nn.relu(self.up(z)))

    def __call__(self, x):
        code = self.encode(x)
        return self.decode(code), {"code": code}

    def dense_layers(self):
        p = lambda layer: layer.variables["params"]
        return (models.DenseLayer(p(self.first)["kernel"], p(self.first)["bias"], "sigmoid"),
                models.DenseLayer(p(self.second)["kernel"], p(self.second)["bias"], "linear"))


USER_CONFIG = """
import ml_collections
from experiments.configs.tiny import get_config as tiny


def get_config():
    c = tiny()
    c.model = ml_collections.ConfigDict(dict(name="tests.test_main:DenseAE", code_size=8))
    c.loss.terms = ml_collections.ConfigDict(dict(
        contractive=dict(weight=0.1, mode="{mode}"), l1=dict(weight=1e-3),
        kl_sparsity=dict(weight=0.1, layer="hidden_0", rho=0.1)))
    return c
"""


@pytest.mark.parametrize("mode", ["best", "auto"])
def test_a_users_model_trains_through_the_command_line(fashion_data_dir, tmp_path, mode):
    config = tmp_path / "user.py"
    config.write_text(USER_CONFIG.format(mode=mode))
    work = tmp_path / "run"
    out = cli(f"--config={config}", f"--workdir={work}")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((work / "summary.json").read_text())
    for term in ("reconstruction", "contractive", "l1", "kl_sparsity"):
        assert np.isfinite(summary["test"][term]), term
    assert summary["pca"]["code_size"] == 8 and "autoencoder_beats_pca" in summary
    for name in ("reconstructions.png", "learning_curves.png", "pca_vs_autoencoder.png"):
        assert (work / name).stat().st_size > 1000


def test_best_contractive_mode_of_a_users_model_is_exact():
    """mode='best' on the model above takes the one-hidden-layer quadratic form; it equals 'auto'."""
    from aejax import objectives

    model = DenseAE()
    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 784))
    params = models.init(model, jax.random.PRNGKey(1), x)
    f = objectives.forward(model, params, x, x, rng=jax.random.PRNGKey(2), step=0)
    best = objectives.contractive(mode="best")(f)
    np.testing.assert_allclose(best, objectives.contractive(mode="auto")(f), rtol=1e-4)
    np.testing.assert_allclose(best, objectives.contractive(mode="one_hidden")(f), rtol=1e-6)


# --------------------------------------------------------------------------- bad input, one line


@pytest.mark.parametrize("config,args,message", [
    ("experiments/configs/no_such.py", [], "config file 'experiments/configs/no_such.py' does not exist"),
    ("{tmp}/broken.py", [], "syntax error in {tmp}/broken.py, line 2"),
    ("experiments/configs/tiny.py", ["--config.optimizer.lr=0.1"],
     'unknown config key "optimizer.lr" (from --config.optimizer.lr). Did you mean '
     '"optimizer.learning_rate"?'),
    ("experiments/configs/tiny.py", ["--config.model.name=foo"], "Unknown model 'foo'"),
    ("experiments/configs/tiny.py", ["--config.num_epochs=0"], "a run of 0 epochs trains nothing"),
    ("experiments/configs/tiny.py", ["--config.model.activation=swish2"],
     "Unknown activation 'swish2' (model.activation)"),
    ("experiments/configs/contractive.py", ["--config.loss.terms.contractive.mode=fast"],
     "Unknown contractive mode 'fast' (loss.terms.contractive.mode)"),
    ("experiments/configs/tiny.py", ["--config.keep_checkpoints=0"],
     "keep_checkpoints must be positive"),
])
def test_bad_input_is_one_error_line_and_status_2_before_anything_runs(tmp_path, config, args,
                                                                        message):
    (tmp_path / "broken.py").write_text("def get_config():\n    return (\n")
    work = tmp_path / "w"
    out = cli(f"--config={config.format(tmp=tmp_path)}", f"--workdir={work}", *args, timeout=120)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    assert message.format(tmp=tmp_path) in lines[0]
    assert "Traceback" not in out.stderr
    assert not work.exists()  # refused before the workdir was touched
