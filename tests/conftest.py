"""Shared fixtures: small learnable data made here, and the real local Fashion-MNIST when present."""

import os
import shutil
import tempfile

# How the suite compiles, set before JAX starts and inherited by the processes tests start
# (pytest-xdist workers, command-line runs):
# - LLVM's optimization level 0 for XLA's CPU code, and XLA's older elemental code generator for
#   fused elementwise work (`--xla_cpu_use_fusion_emitters=false`): the suite's programs are
#   small and mostly compiled, not run, and each of the two compiles them about a quarter to a
#   third faster. XLA's own graph passes (fusion, simplification) still run; what changes is how
#   the kernels are generated and optimized, not what they compute. AEJAX_TEST_XLA_OPT=default
#   runs the suite with XLA's defaults instead.
# - A compilation cache for this run of the suite, shared by its processes, so a program that
#   several processes compile (the multi-process and command-line runs) compiles once. It is a
#   new empty directory each run and is removed at the end.
_FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
if os.environ.get("AEJAX_TEST_XLA_OPT", "0") != "default":
    _flags = os.environ.get("XLA_FLAGS", "")
    _add = [f for f in _FAST_COMPILE if f.split("=")[0] not in _flags]
    os.environ["XLA_FLAGS"] = " ".join([_flags, *_add]).strip()
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="aejax-tests-xla-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax
import numpy as np
import pytest

# Float32 matrix products in float32, on every backend: GPUs default to TF32 (10-bit mantissa),
# which the suite's float32 tolerances (compared with NumPy) do not allow for. No effect on CPU.
jax.config.update("jax_default_matmul_precision", "highest")

from aejax.data import offline
from aejax.data import splits as data_splits


def low_rank_images(n: int, dim: int = 64, rank: int = 4, seed: int = 0) -> np.ndarray:
    """Images in [0, 1] on a smooth ``rank``-dimensional manifold: learnable by small models."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(1234).normal(size=(rank, dim)) * 1.5
    z = rng.normal(size=(n, rank))
    return (1.0 / (1.0 + np.exp(-(z @ basis)))).astype(np.float32)


@pytest.fixture(scope="session")
def small_splits() -> data_splits.Splits:
    """Train 1024 / validation 256 / test 256 examples of 64 pixels."""
    x = low_rank_images(1536)
    y = np.zeros(len(x), np.int32)
    return data_splits.Splits((x[:1024], y[:1024]), (x[1024:1280], y[1024:1280]), (x[1280:], y[1280:]))


FASHION_DIR = offline.DEBIAN_FASHION_MNIST_DIR
IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
needs_debian = pytest.mark.skipif(
    not all(os.path.isfile(os.path.join(FASHION_DIR, f)) for f in IDX_FILES),
    reason=f"Debian package dataset-fashion-mnist not installed ({FASHION_DIR}); "
    "`apt-get install dataset-fashion-mnist` to run the real-data tests",
)


@pytest.fixture(scope="session")
def fashion_data_dir(tmp_path_factory) -> str:
    """A tfds data_dir with Fashion-MNIST prepared from the Debian package's files (once per session).

    Uses AEJAX_DATA_DIR (or ~/tensorflow_datasets) so a prepared copy is reused across runs.
    """
    if not os.path.exists(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")):
        pytest.skip("Debian package dataset-fashion-mnist is not installed "
                    "(apt-get install dataset-fashion-mnist; ./run.sh test installs it)")
    return offline.prepare("fashion_mnist")


@pytest.fixture
def x64():
    """The test computes in float64; the flag is restored afterwards."""
    with jax.enable_x64(True):
        yield


def rbg_key(seed):
    """A typed "rbg" key: threefry programs take seconds each to compile on a shared CPU."""
    return jax.random.key(seed, impl="rbg")


def pytest_unconfigure(config):
    # The process that made the compilation cache removes it (the controller, under xdist).
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
