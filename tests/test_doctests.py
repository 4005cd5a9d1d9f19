"""The ``>>>`` examples in the core modules' docstrings run and print what they say."""

import doctest
import importlib

import pytest

MODULES = ["aejax.losses", "aejax.jacobians", "aejax.objectives", "aejax.models", "aejax.quantize",
           "aejax.vae", "aejax.quality",
           "aejax.step", "aejax.corruptions", "aejax.pooling", "aejax.convolution", "aejax.pca",
           "aejax.data.batching"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name),
                             optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_the_examples_exist():
    attempted = sum(doctest.testmod(importlib.import_module(n)).attempted for n in MODULES)
    assert attempted >= 8
