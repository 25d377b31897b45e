"""run_grid: local backend (in process and pool), per-cell files, resume; Ray if installed."""

from __future__ import annotations

import json

import pytest

from dynsim.errors import ConfigError
from dynsim.sweeps import cell_path, run_grid


def square(cell: dict) -> dict:
    return {"y": cell["x"] ** 2}


def fail_on_three(cell: dict) -> dict:
    if cell["x"] == 3:
        raise RuntimeError("boom")
    return square(cell)


CELLS = [{"x": x} for x in range(4)]


@pytest.mark.parametrize("workers", [1, 2])
def test_local_backend_runs_every_cell_in_order(tmp_path, workers):
    out = run_grid(CELLS, square, results_dir=tmp_path, workers=workers, progress=False)
    assert [r["y"] for r in out] == [0, 1, 4, 9]
    for cell in CELLS:
        saved = json.loads(cell_path(tmp_path, cell).read_text())
        assert saved["cell"] == cell and saved["result"] == square(cell)


def test_interrupted_sweep_resumes_without_redoing_cells(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        run_grid(CELLS, fail_on_three, results_dir=tmp_path, workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.glob("cell-*.json")) == sorted(
        cell_path(tmp_path, c).name for c in CELLS[:3]
    )
    # finished cells are reused: mark one file to prove it is read back, not recomputed
    path = cell_path(tmp_path, CELLS[0])
    saved = json.loads(path.read_text())
    saved["result"]["y"] = -1
    path.write_text(json.dumps(saved))
    out = run_grid(CELLS, square, results_dir=tmp_path, workers=1, progress=False)
    assert [r["y"] for r in out] == [-1, 1, 4, 9]


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="backend"):
        run_grid(CELLS, square, results_dir=tmp_path, backend="slurm")
    with pytest.raises(ConfigError, match="distinct"):
        run_grid([{"x": 1}, {"x": 1}], square, results_dir=tmp_path)


def test_ray_backend_two_cells(tmp_path):
    pytest.importorskip("ray")
    out = run_grid(
        CELLS[:2], square, results_dir=tmp_path, workers=2, backend="ray", progress=False
    )
    assert [r["y"] for r in out] == [0, 1]
