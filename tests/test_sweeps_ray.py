"""run_grid on Ray: a local instance started (and stopped) by run_grid, and a cluster the
tests start with ``ray start --head`` on the loopback interface and stop at the end.

Everything the workers run comes from dynsim (shipped by run_grid's runtime env) or from a
driver script's ``__main__`` (sent by value): nothing here depends on this test module
being importable on the workers. Skipped when Ray is not installed (``pip install -e '.[ray]'``;
``make test`` installs it), except under ``DYNSIM_REQUIRE_RAY=1`` (set by ``.ci/run``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

# before Ray is imported: nodes and drivers of these tests use 127.0.0.1, not the machine's
# reachable address (Ray reads this once, at import); a loopback-only test cluster needs no
# token (a token shared through ~/.ray breaks when several checkouts test at once)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_OBJECT_STORE_ALLOW_SLOW_STORAGE", "1")  # CI containers may have a tiny /dev/shm
if os.environ.get("DYNSIM_REQUIRE_RAY"):  # CI (.ci/run): a missing Ray is a failure, not a skip
    import ray
else:
    ray = pytest.importorskip("ray")

from dynsim.errors import ConfigError  # noqa: E402
from dynsim.studies.convergence import ConvergenceConfig, resolve_cell, train_cell  # noqa: E402
from dynsim.sweeps import _square, cell_path, run_grid  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RAY_BIN = Path(sys.executable).with_name("ray")
pytestmark = pytest.mark.timeout(240)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A one-node Ray cluster (2 CPUs, no GPU, 100 MB object store) on 127.0.0.1: its address."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="dynsim-ray-")  # short: Ray's socket paths must stay < 108 chars
    cmd = [str(RAY_BIN), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", "--object-store-memory=100000000",
           "--disable-usage-stats", f"--temp-dir={temp}"]
    head = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("ray start --head did not come up within 60 s")
                time.sleep(0.3)
        yield f"127.0.0.1:{port}"
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything of that session still alive
        except ProcessLookupError:
            pass
        shutil.rmtree(temp, ignore_errors=True)


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if "seconds" not in k}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def test_same_grid_same_cells_on_local_and_on_a_local_ray_instance(tmp_path):
    cells = ConvergenceConfig(thresholds=[1e-2], caps=[5, 50], streams=[None], epochs=1, images_per_epoch=20,
                              eval_train_size=60, eval_test_size=30, readout="ridge", solver="heun").cells()
    local = run_grid(cells, train_cell, results_dir=tmp_path / "local", workers=1, progress=False,
                     resolve=resolve_cell)
    assert not ray.is_initialized()
    remote = run_grid(cells, train_cell, results_dir=tmp_path / "ray", ray_address="local", progress=False,
                      resolve=resolve_cell)
    assert not ray.is_initialized()  # run_grid stopped the local instance it started
    assert _without_timings(remote) == _without_timings(local)
    assert local[0]["iterations_per_input"] != local[1]["iterations_per_input"]  # the cells differ
    for c in cells:
        saved = json.loads(cell_path(tmp_path / "ray", c).read_text())
        assert saved["status"] == "done" and saved["config_hash"] == json.loads(
            cell_path(tmp_path / "local", c).read_text())["config_hash"]


def test_a_running_cluster_is_joined_through_RAY_ADDRESS_and_auto(ray_head, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", ray_head)
    out = run_grid([{"a": 1}, {"a": 2}], _square, results_dir=tmp_path / "env", backend="ray", progress=False)
    assert out == [{"a2": 1}, {"a2": 4}]
    out = run_grid([{"a": 3}], _square, results_dir=tmp_path / "auto", ray_address="auto", progress=False)
    assert out == [{"a2": 9}] and not ray.is_initialized()


def test_cuda_cells_are_refused_by_a_cluster_without_gpus(ray_head, tmp_path):
    with pytest.raises(ConfigError, match="ask for 1 GPU each, but the Ray cluster has 0 GPUs"):
        run_grid([{"a": 1, "device": "cuda"}], _square, results_dir=tmp_path, ray_address=ray_head, progress=False)
    assert not ray.is_initialized()


DRIVER = '''
import os, sys, time
from pathlib import Path
from dynsim.sweeps import run_grid

MARKS = Path(os.environ["SWEEP_MARKS"])

def slow_square(cell):  # defined in __main__: Ray sends it to the workers by value
    with open(MARKS / f"ran-{cell['x']}", "a") as fh:
        fh.write("x")
    if cell["x"] >= 2 and (MARKS / "stall").exists():  # read on the worker (the env is the cluster's)
        time.sleep(600)
    return {"y": cell["x"] ** 2}

if __name__ == "__main__":
    out = run_grid([{"x": x} for x in range(4)], slow_square, results_dir=MARKS / "cells",
                   ray_address=sys.argv[1], workers=2)
    print("RESULT", [r["y"] for r in out], flush=True)
'''


def test_a_killed_driver_resumes_only_the_missing_cells(ray_head, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER))
    env = {**os.environ, "SWEEP_MARKS": str(marks),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    (marks / "stall").write_text("")
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115
    first = subprocess.Popen([sys.executable, str(script), ray_head], env=env,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        done = lambda: len(list((marks / "cells").glob("cell-*.json"))) if (marks / "cells").exists() else 0  # noqa: E731
        while not (done() == 2 and (marks / "ran-2").exists() and (marks / "ran-3").exists()):
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.3)
    finally:
        first.send_signal(signal.SIGKILL)  # cells 0, 1 saved; 2, 3 running
        first.wait()
        log.close()
    (marks / "stall").unlink()
    second = subprocess.run([sys.executable, str(script), ray_head], env=env, capture_output=True, text=True,
                            timeout=180)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "RESULT [0, 1, 4, 9]" in second.stdout
    reused = [line for line in second.stdout.splitlines() if "reused" in line]
    assert [json.loads(line.split("reused ", 1)[1])["x"] for line in reused] == [0, 1]
    runs = {x: len((marks / f"ran-{x}").read_text()) for x in range(4)}
    assert runs == {0: 1, 1: 1, 2: 2, 3: 2}  # only the two missing cells ran again
