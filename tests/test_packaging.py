"""What `pip install aejax` gives: the core without TensorFlow, and no `experiments` package."""

import os
import subprocess
import sys
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = ["aejax.losses", "aejax.jacobians", "aejax.models", "aejax.quantize", "aejax.objectives",
        "aejax.vae",
        "aejax.step", "aejax.corruptions", "aejax.pooling", "aejax.convolution", "aejax.pca",
        "aejax.data.batching"]


def test_the_core_imports_neither_tensorflow_nor_the_runtimes_needs():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in CORE)
            + "heavy = [m for m in ('tensorflow', 'tensorflow_datasets', 'ml_collections', "
              "'matplotlib', 'aejax.runtime', 'tensorboardX', 'tensorboard', 'wandb') "
              "if m in sys.modules]\n"
              "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


def test_only_aejax_is_packaged_and_the_core_needs_five_packages():
    project = tomllib.load(open(os.path.join(REPO, "pyproject.toml"), "rb"))
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["aejax", "aejax.*"]
    names = sorted(d.split(">")[0].split("=")[0].split("[")[0] for d in
                   project["project"]["dependencies"])
    assert names == ["flax", "jax", "numpy", "optax", "orbax-checkpoint"]
    # Lower bounds only: an installed JAX or Flax is never downgraded.
    assert all("<" not in d and "==" not in d for d in project["project"]["dependencies"])
