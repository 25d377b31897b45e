"""A package that feels like its ecosystem (issue 19, items 8 and 10): licence, one version,
py.typed, logging, dependencies that are used, honest first runs and benchmarks."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

import dynsim
from dynsim.cli import main

ROOT = Path(__file__).resolve().parents[1]
if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_file_matches_pyproject():
    assert PYPROJECT["project"]["license"] == {"text": "MIT"}
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_one_version_source_and_version_flag(capsys):
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "dynsim._version.__version__"}
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"dynsim {dynsim.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", dynsim.__version__)


def test_py_typed_is_shipped():
    assert (ROOT / "dynsim" / "py.typed").exists()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["dynsim"]


def _imported_modules() -> set[str]:
    names = set()
    files = [*(ROOT / "dynsim").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py"), *(ROOT / "examples").glob("*.py")]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
    return names


def test_every_declared_dependency_is_imported():
    imported = _imported_modules()
    module = {"scikit-learn": "sklearn"}
    for requirement in PYPROJECT["project"]["dependencies"]:
        name = re.split(r"[<>=!~\[ ]", requirement)[0]
        assert module.get(name, name) in imported, f"{name} is declared but never imported"


def test_library_code_logs_instead_of_printing():
    """print() only in the CLI, in __main__ blocks and in the sweep's progress lines (issue 18's)."""
    allowed = {"__main__.py", "sweeps.py"}
    offenders = []
    for path in (ROOT / "dynsim").rglob("*.py"):
        if path.name in allowed or path.parent.name == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_first_run_says_it_is_compiling(monkeypatch, caplog):
    from dynsim import compiled, warmup

    if not compiled.available():
        pytest.skip("numba is not installed")
    monkeypatch.setattr(warmup, "_warm", False)
    monkeypatch.setattr(warmup, "kernels_cached", lambda: False)
    with caplog.at_level("INFO", logger="dynsim"):
        assert warmup.warm_up()
    assert warmup.COMPILING_MESSAGE in caplog.text
    assert warmup.COMPILING_MESSAGE == "compiling kernels (once per machine, ~10 s)"
    caplog.clear()
    monkeypatch.setattr(warmup, "_warm", False)
    monkeypatch.setattr(warmup, "kernels_cached", lambda: True)
    with caplog.at_level("INFO", logger="dynsim"):
        warmup.warm_up()
    assert warmup.COMPILING_MESSAGE not in caplog.text  # cached: nothing to announce


def test_bench_includes_newton_and_never_times_warm_up(monkeypatch):
    from dynsim.studies import bench

    assert "newton" in bench.DEFAULT_SETTINGS
    calls = []
    real = bench.settle

    def counting(*args, **kwargs):
        calls.append(kwargs["x"].shape[0] if "x" in kwargs else args[1].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "settle", counting)
    clock = iter(range(10**6))
    monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(clock)))
    import torch

    from dynsim.systems import HebbianLayer

    layer = HebbianLayer((1, 8, 8), nps=2, stride=2, radius=3.0)
    x = torch.randn(3, 64)
    config = bench.BenchConfig(batch_size=1, repeats=1, progress=False)
    row = bench.run_setting(layer, x, torch.zeros(3, layer.state_size), "euler", config)
    # one untimed warm-up settle, then the 3 timed ones, each timed call between two clock reads
    assert calls == [1, 1, 1, 1]
    assert row["seconds"] == 1.0


def test_readme_never_links_outside_the_repository():
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", text)
    for link in links:
        assert not link.startswith(("http:", "https:", "/", "..")), link
        assert (ROOT / link.split("#")[0]).exists(), link
    assert "../" not in text


def test_quickstart_prints_status_names():
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quickstart (Python)", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "Status(" in quick and ".name" in quick


def test_cli_log_lines_follow_the_current_stderr(capsys):
    """Messages logged by the library reach whatever sys.stderr is when they are logged, also
    after an earlier ``main`` call set up logging under another (now closed) stderr."""
    import contextlib
    import io
    import logging

    from dynsim.cli import _configure_logging

    logger = logging.getLogger("dynsim")
    saved = list(logger.handlers)
    for h in saved:
        logger.removeHandler(h)
    earlier = io.StringIO()
    with contextlib.redirect_stderr(earlier):  # an earlier main() call, under another stderr
        _configure_logging()
    earlier.close()
    capsys.readouterr()
    logging.getLogger("dynsim").info("compiling kernels (once per machine, ~10 s)")
    err = capsys.readouterr().err
    for h in list(logger.handlers):
        logger.removeHandler(h)
    for h in saved:
        logger.addHandler(h)
    assert err == "compiling kernels (once per machine, ~10 s)\n"
