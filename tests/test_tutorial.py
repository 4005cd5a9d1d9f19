"""docs/tutorial.py (a jupytext notebook) runs headless from top to bottom on a small subset."""

import os
import pathlib
import runpy

import pytest
from conftest import needs_debian

REPO = pathlib.Path(__file__).resolve().parents[1]


@needs_debian
def test_the_tutorial_runs_headless(tmp_path, monkeypatch, fashion_data_dir):
    monkeypatch.setenv("AEJAX_TUTORIAL_QUICK", "1")
    monkeypatch.setenv("AEJAX_TUTORIAL_OUT", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    scope = runpy.run_path(str(REPO / "docs" / "tutorial.py"), run_name="__main__")
    assert (tmp_path / "reconstructions.png").stat().st_size > 0
    assert (tmp_path / "codes.png").stat().st_size > 0
    # Two short epochs already take a quarter off the untrained model's reconstruction error.
    assert scope["test"]["reconstruction"] < 0.75 * scope["before"]["reconstruction"]
    assert float(scope["exact"].min()) > 0
    assert -1.0 <= float(scope["audit"]["audit_grad_cosine"]) <= 1.0
