"""run_grid, local backend: in process and in a spawn pool, per-cell files, resume, and the
fault cases (a failing cell, a killed parent, stale and truncated cell files).

The Ray backend is tested in ``test_sweeps_ray.py``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import dynsim
from dynsim.errors import ConfigError
from dynsim.sweeps import SweepError, cell_path, cell_resources, config_hash, run_grid

REPO = Path(__file__).resolve().parents[1]


def square(cell: dict) -> dict:
    return {"y": cell["x"] ** 2}


def fail_on_three(cell: dict) -> dict:
    if cell["x"] == 3:
        raise RuntimeError("boom")
    return square(cell)


def fail_first_fast(cell: dict) -> dict:
    """Cell 0 fails at once; the others take a moment, so they are still queued or running."""
    if cell["x"] == 0:
        raise RuntimeError("cell zero is broken")
    time.sleep(0.3)
    return square(cell)


CELLS = [{"x": x} for x in range(4)]


@pytest.mark.parametrize("workers", [1, 2])
def test_local_backend_runs_every_cell_in_order(tmp_path, workers):
    out = run_grid(CELLS, square, results_dir=tmp_path, workers=workers, progress=False)
    assert [r["y"] for r in out] == [0, 1, 4, 9]
    for cell in CELLS:
        saved = json.loads(cell_path(tmp_path, cell).read_text())
        assert saved["cell"] == cell and saved["result"] == square(cell) and saved["status"] == "done"
        assert saved["dynsim_version"] == dynsim.__version__ and saved["config_hash"] == config_hash(cell)


def test_interrupted_sweep_resumes_without_redoing_cells(tmp_path):
    with pytest.raises(SweepError, match="RuntimeError: boom"):
        run_grid(CELLS, fail_on_three, results_dir=tmp_path, workers=1, progress=False)
    status = {c["x"]: json.loads(cell_path(tmp_path, c).read_text())["status"] for c in CELLS}
    assert status == {0: "done", 1: "done", 2: "done", 3: "failed"}
    # finished cells are reused: mark one file to prove it is read back, not recomputed
    path = cell_path(tmp_path, CELLS[0])
    saved = json.loads(path.read_text())
    saved["result"]["y"] = -1
    path.write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match="failed attempt"):  # the failed cell is retried
        out = run_grid(CELLS, square, results_dir=tmp_path, workers=1, progress=False)
    assert [r["y"] for r in out] == [-1, 1, 4, 9]


def test_a_failing_cell_is_recorded_while_the_others_finish_and_are_saved(tmp_path, capsys):
    cells = [{"x": x} for x in range(6)]
    with pytest.raises(SweepError, match=r"1 of 6 sweep cells failed: \{\"x\": 0\}: RuntimeError: cell zero") as err:
        run_grid(cells, fail_first_fast, results_dir=tmp_path, workers=2, progress=False)
    assert err.value.results == [None, *({"y": x * x} for x in range(1, 6))]
    assert err.value.failures == [({"x": 0}, "RuntimeError: cell zero is broken")]
    failed = json.loads(cell_path(tmp_path, cells[0]).read_text())
    assert failed["status"] == "failed" and "cell zero is broken" in failed["traceback"]
    for c in cells[1:]:
        assert json.loads(cell_path(tmp_path, c).read_text())["result"] == square(c)
    assert "FAILED (RuntimeError: cell zero is broken)" in capsys.readouterr().out


def test_a_truncated_cell_file_is_recomputed_with_a_message(tmp_path):
    run_grid(CELLS, square, results_dir=tmp_path, workers=1, progress=False)
    path = cell_path(tmp_path, CELLS[2])
    text = path.read_text()
    path.write_text(text[: len(text) // 2])  # a write cut short (an old, non-atomic writer; a full disk)
    with pytest.warns(UserWarning, match=r"cell-.*\.json is unreadable .*truncated.*recomputing"):
        out = run_grid(CELLS, square, results_dir=tmp_path, workers=1, progress=False)
    assert [r["y"] for r in out] == [0, 1, 4, 9]
    assert json.loads(path.read_text())["result"] == {"y": 4}


def test_a_cell_file_of_other_code_or_settings_is_recomputed(tmp_path):
    run_grid(CELLS, square, results_dir=tmp_path, workers=1, progress=False)
    old = cell_path(tmp_path, CELLS[1])
    saved = json.loads(old.read_text())
    saved["dynsim_version"], saved["result"] = "0.0.1", {"y": -1}  # written by older code
    old.write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match=r"stale \(dynsim_version '0.0.1', now"):
        out = run_grid(CELLS, square, results_dir=tmp_path, workers=1, progress=False)
    assert [r["y"] for r in out] == [0, 1, 4, 9]
    # the same cells whose resolved settings changed (e.g. a new default): all recomputed
    with pytest.warns(UserWarning, match="stale \\(config_hash") as caught:
        run_grid(CELLS, square, results_dir=tmp_path, workers=1, progress=False,
                 resolve=lambda c: {**c, "new_default": 1})
    assert len(caught) == len(CELLS)


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="backend"):
        run_grid(CELLS, square, results_dir=tmp_path, backend="slurm")
    with pytest.raises(ConfigError, match="distinct"):
        run_grid([{"x": 1}, {"x": 1}], square, results_dir=tmp_path)
    with pytest.raises(ConfigError, match="workers must be an integer >= 1, got 0"):
        run_grid(CELLS, square, results_dir=tmp_path, workers=0)


def test_cell_resources_ask_for_a_gpu_only_for_cuda_cells():
    assert cell_resources({"x": 1}) == {"num_cpus": 1, "num_gpus": 0}
    assert cell_resources({"device": "cpu"}) == {"num_cpus": 1, "num_gpus": 0}
    assert cell_resources({"device": "cuda"}) == {"num_cpus": 1, "num_gpus": 1}


SLEEPER = '''
import os, time
from pathlib import Path

def sleep_long(cell):
    Path(os.environ["SWEEP_MARKS"], f"pid-{os.getpid()}").write_text("")
    time.sleep(120)
    return {}
'''

DRIVER = '''
import os, sys
sys.path.insert(0, os.environ["SWEEP_MODS"])
from sleeper import sleep_long
from dynsim.sweeps import run_grid

if __name__ == "__main__":
    run_grid([{"x": x} for x in range(4)], sleep_long, results_dir=os.environ["SWEEP_MARKS"] + "/cells",
             workers=2, progress=False)
'''


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
@pytest.mark.timeout(120)
def test_killing_the_parent_ends_its_workers(tmp_path):
    mods, marks = tmp_path / "mods", tmp_path / "marks"
    mods.mkdir()
    marks.mkdir()
    (mods / "sleeper.py").write_text(textwrap.dedent(SLEEPER))
    (mods / "driver.py").write_text(textwrap.dedent(DRIVER))
    env = {**os.environ, "SWEEP_MODS": str(mods), "SWEEP_MARKS": str(marks),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.Popen([sys.executable, str(mods / "driver.py")], env=env)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while len(workers) < 2 and time.monotonic() < deadline and parent.poll() is None:
            workers = [int(p.name.split("-")[1]) for p in marks.glob("pid-*")]
            time.sleep(0.2)
        assert len(workers) == 2, "the two workers did not start"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [p for p in workers if _alive(p)] == [], "workers outlived their parent"
    finally:
        for pid in workers:  # the workers this test started, if they survived
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()


def test_local_workers_take_the_gpus_in_turn():
    from dynsim.sweeps import gpu_for_worker

    assert [gpu_for_worker(k, 2, None) for k in range(5)] == ["0", "1", "0", "1", "0"]
    assert [gpu_for_worker(k, 2, "3,5") for k in range(3)] == ["3", "5", "3"]  # within the parent's list
