"""Parameter grids on a real engine: local worker processes by default, Ray when asked.

:func:`run_grid` runs ``fn(cell)`` for every cell (a JSON-able dict of settings). Each
finished cell's result is written at once, atomically, to ``results_dir/cell-<key>.json``
(``key`` = a hash of the cell), so an interrupted sweep resumes: cells whose result file
exists are read back instead of run again.

Backends
--------
``"local"`` : a process pool with ``workers`` processes (default: all cores); ``workers=1``
    runs in this process (no pickling; easiest to debug).
``"ray"`` : each cell is a Ray task (``ray.init(address=ray_address)``; ``None`` starts a
    local Ray instance). Ray is an optional extra: ``pip install dynsim[ray]``.

Example
-------
>>> import tempfile, pathlib
>>> from dynsim.sweeps import run_grid
>>> out = run_grid([{"a": 1}, {"a": 2}], _square, results_dir=pathlib.Path(tempfile.mkdtemp()),
...                workers=1, progress=False)
>>> [r["a2"] for r in out]
[1, 4]
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from dynsim.errors import ConfigError
from dynsim.results import _jsonable, write_json_atomic

BACKENDS = ("local", "ray")


def cell_key(cell: dict) -> str:
    """Stable short key of a cell: sha1 of its canonical JSON (sorted keys)."""
    text = json.dumps(_jsonable(cell), sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def cell_path(results_dir: Path, cell: dict) -> Path:
    return Path(results_dir) / f"cell-{cell_key(cell)}.json"


def _square(cell: dict) -> dict:  # used by the doctest
    return {"a2": cell["a"] ** 2}


def _run_cell(fn: Callable[[dict], dict], cell: dict) -> tuple[dict, float]:
    t0 = time.perf_counter()
    out = fn(cell)
    if not isinstance(out, dict):
        raise TypeError(f"sweep function {fn!r} must return a dict, got {type(out).__name__}")
    return out, time.perf_counter() - t0


def _record(results: list, i: int, cells: list[dict], results_dir: Path, out: dict, seconds: float,
            progress: bool) -> None:
    """Write cell ``i``'s result file (atomically), keep its result, and log it."""
    write_json_atomic(cell_path(results_dir, cells[i]), {"cell": cells[i], "seconds": seconds, "result": out})
    results[i] = out
    _log(progress, sum(r is not None for r in results), len(cells), cells[i], f"done in {seconds:.1f} s")


def _log(progress: bool, done: int, total: int, cell: dict, what: str) -> None:
    if progress:
        print(
            f"[sweep {done}/{total}] {what} {json.dumps(_jsonable(cell), sort_keys=True)}",
            flush=True,
        )


def run_grid(
    cells: list[dict],
    fn: Callable[[dict], dict],
    *,
    results_dir: Path,
    workers: int | None = None,
    backend: str = "local",
    ray_address: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """Run ``fn(cell)`` for every cell; return the results in the order of ``cells``.

    Parameters
    ----------
    cells : list of JSON-able dicts (distinct; their hash names the result files).
    fn : picklable top-level function ``cell -> dict`` (the result, JSON-able).
    results_dir : directory of the per-cell result files ``cell-<key>.json``
        (``{"cell", "seconds", "result"}``); existing files are reused (resume).
    workers : processes (local) or concurrent tasks (ray); default: all cores.
    backend : ``"local"`` or ``"ray"``; a ``ray_address`` implies ``"ray"``.
    progress : print one line per finished cell.
    """
    if ray_address is not None:
        backend = "ray"
    if backend not in BACKENDS:
        raise ConfigError(f"unknown sweep backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    keys = [cell_key(c) for c in cells]
    if len(set(keys)) != len(keys):
        raise ConfigError("sweep cells must be distinct (two cells have the same settings)")
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict | None] = [None] * len(cells)
    todo = []
    for i, cell in enumerate(cells):
        path = cell_path(results_dir, cell)
        if path.exists():
            results[i] = json.loads(path.read_text())["result"]
            _log(progress, sum(r is not None for r in results), len(cells), cell, "reused")
        else:
            todo.append(i)
    workers = workers or os.cpu_count() or 1
    if todo and backend == "ray":
        _run_ray(cells, fn, todo, results, results_dir, workers, ray_address, progress)
    elif todo and (workers == 1 or len(todo) == 1):
        for i in todo:
            out, seconds = _run_cell(fn, cells[i])
            _record(results, i, cells, results_dir, out, seconds, progress)
    elif todo:
        with ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
            pending = {pool.submit(_run_cell, fn, cells[i]): i for i in todo}
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    i = pending.pop(fut)
                    out, seconds = fut.result()
                    _record(results, i, cells, results_dir, out, seconds, progress)
    return [r for r in results if r is not None]


def _run_ray(cells, fn, todo, results, results_dir, workers, ray_address, progress) -> None:
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "the ray backend needs Ray: pip install 'dynsim[ray]' (or use --backend local)"
        ) from None
    if not ray.is_initialized():
        ray.init(
            address=ray_address,
            include_dashboard=False,
            ignore_reinit_error=True,
            **({} if ray_address else {"num_cpus": workers}),
        )
    task = ray.remote(_run_cell)
    pending = {task.remote(fn, cells[i]): i for i in todo}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            i = pending.pop(ref)
            out, seconds = ray.get(ref)
            _record(results, i, cells, results_dir, out, seconds, progress)
