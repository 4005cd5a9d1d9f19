"""End to end: the command line on real Fashion-MNIST, resumption, and its error messages."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "experiments.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_tiny_config_end_to_end_then_resume_is_a_no_op(fashion_data_dir, tmp_path):
    work = tmp_path / "run"
    first = cli("--config=experiments/configs/tiny.py", f"--workdir={work}")
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((work / "summary.json").read_text())
    assert summary["dataset"] == "fashion_mnist" and summary["epochs_run"] == 2
    assert summary["steps"] == 2 * (2000 // 100)
    assert 0 < summary["test"]["mse_per_pixel"] < 0.2
    assert summary["pca"]["code_size"] == 16
    for name in ("reconstructions.png", "learning_curves.png", "pca_vs_autoencoder.png"):
        assert (work / name).stat().st_size > 1000
    lines = (work / "metrics.jsonl").read_text().splitlines()
    # Running again finds the finished run: no step is retrained, the same test numbers result.
    again = cli("--config=experiments/configs/tiny.py", f"--workdir={work}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "is finished" in again.stderr
    assert json.loads((work / "summary.json").read_text())["test"] == summary["test"]
    assert (work / "metrics.jsonl").read_text().splitlines() == lines


def test_override_extends_a_finished_run(fashion_data_dir, tmp_path):
    work = tmp_path / "run"
    assert cli("--config=experiments/configs/tiny.py", f"--workdir={work}",
               "--config.num_epochs=1").returncode == 0
    more = cli("--config=experiments/configs/tiny.py", f"--workdir={work}", "--config.num_epochs=2")
    assert more.returncode == 0, more.stderr[-3000:]
    assert "Resumed from step 20" in more.stderr
    assert json.loads((work / "summary.json").read_text())["epochs_run"] == 2


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
