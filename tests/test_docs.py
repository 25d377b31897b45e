"""The examples in docstrings run and print what they claim (modules whose examples need files
on disk mark them ``+SKIP`` and are not listed)."""

import doctest
import importlib

import pytest

MODULES = [
    "dynsim",
    "dynsim.data",
    "dynsim.pipelines.ssl",
    "dynsim.readouts",
    "dynsim.settings",
    "dynsim.settle",
    "dynsim.stopping",
    "dynsim.sklearn",
    "dynsim.solvers.block",
    "dynsim.solvers.controllers",
    "dynsim.solvers.fixed_point",
    "dynsim.solvers.rk",
    "dynsim.ssl.augment",
    "dynsim.ssl.loss",
    "dynsim.ssl.stages",
    "dynsim.studies.ssl",
    "dynsim.streaming",
    "dynsim.sweeps",
    "dynsim.systems.deep",
    "dynsim.systems.hebbian",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no docstring examples"
    assert result.failed == 0
