"""Parameter grids on a real engine: local worker processes by default, Ray when asked.

:func:`run_grid` runs ``fn(cell)`` for every cell (a JSON-able dict of settings). Each
finished cell's result is written at once, atomically, to ``results_dir/cell-<key>.json``
(``key`` = a hash of the cell), so an interrupted sweep resumes: cells whose result file
exists and is *current* are read back instead of run again.

Cell files
----------
``{"format", "dynsim_version", "config_hash", "cell", "status", "seconds", "result" | "error"}``.
``config_hash`` hashes the cell's *resolved* settings (``resolve(cell)``, e.g. the full
config with every default filled in), so a file written by another dynsim version or under
other defaults is *stale*: it is recomputed, with a warning naming the file and why. So is
a truncated or unreadable file. A cell whose function raised is saved with
``status = "failed"`` and its error; the other cells still run and are saved, and
:func:`run_grid` then raises :class:`SweepError` naming the failed cells. Running the same
sweep again retries only the failed and missing cells.

Backends
--------
``"local"`` : a pool of ``workers`` processes started with ``spawn`` (not ``fork``: a
    child of a process that has touched CUDA cannot use CUDA, and a forked child inherits
    locks held by the parent's threads). Each worker watches its parent and exits when the
    parent is gone, so killing a sweep does not leave its workers running. When cells run
    on CUDA, worker k sees only GPU k mod (number of GPUs) (``CUDA_VISIBLE_DEVICES``).
    ``workers=1`` runs in this process (no pickling; easiest to debug).
``"ray"`` : each cell is a Ray task asking for ``num_cpus=1`` and, when the cell's
    ``device`` setting is CUDA, ``num_gpus=1`` (Ray then gives the task its own GPU through
    ``CUDA_VISIBLE_DEVICES``, so ``device="cuda"`` means that GPU). The address is
    resolved as Ray does: ``ray_address`` (``"auto"``: a running cluster, ``"local"``: a new
    local instance, ``"host:port"``), else ``RAY_ADDRESS``, else the cluster last started on
    this machine with ``ray start``, else a new local instance. When dynsim connects, it
    ships its own package to the workers (``runtime_env={"py_modules": [dynsim]}``), so the
    workers run the driver's code (they need dynsim's dependencies installed); it
    disconnects (and stops a local instance it started) when the grid is done. ``workers``
    bounds the cells in flight (default: as many as the cluster's resources allow);
    results are collected as they finish. ``fn`` must be importable on the workers (a
    function of an installed package, or defined in the driver's ``__main__``, which Ray
    sends by value). Ray is an optional extra: ``pip install 'dynsim[ray]'``.

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
import multiprocessing
import os
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from dynsim.errors import ConfigError, DynsimError
from dynsim.results import _jsonable, write_json_atomic

BACKENDS = ("local", "ray")
CELL_FORMAT = 2
PARENT_POLL_SECONDS = 0.5  # how often a local worker checks that its parent is alive


class SweepError(DynsimError):
    """Some cells of a grid failed; the others finished and are saved.

    Attributes
    ----------
    results : per cell (in the order of the grid), its result dict or ``None`` if it failed.
    failures : ``[(cell, error message)]`` of the failed cells.
    """

    def __init__(self, message: str, results: list[dict | None], failures: list[tuple[dict, str]]):
        super().__init__(message)
        self.results = results
        self.failures = failures


def _canonical(obj: Any) -> str:
    return json.dumps(_jsonable(obj), sort_keys=True)


def cell_key(cell: dict) -> str:
    """Stable short key of a cell: sha1 of its canonical JSON (sorted keys)."""
    return hashlib.sha1(_canonical(cell).encode()).hexdigest()[:16]


def config_hash(resolved: dict) -> str:
    """Hash of a cell's resolved settings (sha1 of the canonical JSON, 16 hex digits)."""
    return hashlib.sha1(_canonical(resolved).encode()).hexdigest()[:16]


def cell_path(results_dir: Path, cell: dict) -> Path:
    return Path(results_dir) / f"cell-{cell_key(cell)}.json"


def _square(cell: dict) -> dict:  # used by the doctest
    return {"a2": cell["a"] ** 2}


def cell_resources(cell: dict) -> dict[str, float]:
    """What one cell asks of a Ray cluster: one CPU, and one GPU if its ``device`` is CUDA."""
    cuda = str(cell.get("device") or "cpu").startswith("cuda")
    return {"num_cpus": 1, "num_gpus": 1 if cuda else 0}


# --- running one cell (in a worker) --------------------------------------------------------
def _run_cell(fn: Callable[[dict], dict], cell: dict) -> dict:
    """Run ``fn(cell)``; return ``{"status": "done", "result", "seconds"}`` or, if it raised,
    ``{"status": "failed", "error", "traceback", "seconds"}`` (the error as text, so that any
    exception reaches the driver, picklable or not)."""
    t0 = time.perf_counter()
    try:
        out = fn(cell)
        if not isinstance(out, dict):
            raise TypeError(f"sweep function {fn!r} must return a dict, got {type(out).__name__}")
    except Exception as exc:
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(), "seconds": time.perf_counter() - t0}
    return {"status": "done", "result": out, "seconds": time.perf_counter() - t0}


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(1)  # the parent is gone: nobody will read this worker's result
        time.sleep(PARENT_POLL_SECONDS)


def gpu_for_worker(k: int, n_gpus: int, visible: str | None) -> str:
    """``CUDA_VISIBLE_DEVICES`` for local worker number ``k``: the GPUs in turn (within the
    parent's own ``CUDA_VISIBLE_DEVICES`` list, if it has one)."""
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else [str(i) for i in range(n_gpus)]
    return ids[k % len(ids)]


def _worker_init(parent: int, counter=None, n_gpus: int = 0) -> None:
    """Pool-worker start-up: exit as soon as the parent process has died (even by SIGKILL);
    with ``n_gpus`` > 0, see one GPU only (worker k gets GPU k mod n), before CUDA starts."""
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="dynsim-parent-watch").start()
    if counter is not None and n_gpus > 0:
        with counter.get_lock():
            k = counter.value
            counter.value += 1
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_for_worker(k, n_gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))


# --- cell files ------------------------------------------------------------------------------
def read_cell(path: Path, fingerprint: dict[str, str]) -> tuple[dict | None, str | None]:
    """A saved cell's result, or ``(None, why it must be (re)computed)``; ``(None, None)`` if absent."""
    if not path.exists():
        return None, None
    try:
        saved = json.loads(path.read_text())
        status = saved["status"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        return None, f"{path} is unreadable ({type(exc).__name__}: truncated or not a dynsim cell file)"
    for key, now in fingerprint.items():
        if saved.get(key) != now:
            return None, f"{path} is stale ({key} {saved.get(key)!r}, now {now!r})"
    if status == "failed":
        return None, f"{path} holds a failed attempt ({saved.get('error')})"
    if status != "done" or not isinstance(saved.get("result"), dict):
        return None, f"{path} is unreadable (status {status!r})"
    return saved["result"], None


class _Book:
    """The driver's record of a grid: writes each outcome's file and logs it."""

    def __init__(self, cells, results_dir, fingerprints, progress):
        self.cells, self.dir, self.fingerprints, self.progress = cells, Path(results_dir), fingerprints, progress
        self.results: list[dict | None] = [None] * len(cells)
        self.failures: dict[int, str] = {}

    def record(self, i: int, outcome: dict) -> None:
        cell = self.cells[i]
        payload = {"format": CELL_FORMAT, **self.fingerprints[i], "cell": cell, **outcome}
        write_json_atomic(cell_path(self.dir, cell), payload)
        if outcome["status"] == "done":
            self.results[i] = outcome["result"]
            self.log(i, f"done in {outcome['seconds']:.1f} s")
        else:
            self.failures[i] = outcome["error"]
            self.log(i, f"FAILED ({outcome['error']})", force=True)

    def log(self, i: int, what: str, force: bool = False) -> None:
        if self.progress or force:
            done = sum(r is not None for r in self.results) + len(self.failures)
            print(f"[sweep {done}/{len(self.cells)}] {what} {_canonical(self.cells[i])}", flush=True)


def run_grid(
    cells: list[dict],
    fn: Callable[[dict], dict],
    *,
    results_dir: Path,
    workers: int | None = None,
    backend: str = "local",
    ray_address: str | None = None,
    progress: bool = True,
    resolve: Callable[[dict], dict] | None = None,
) -> list[dict]:
    """Run ``fn(cell)`` for every cell; return the results in the order of ``cells``.

    Parameters
    ----------
    cells : list of JSON-able dicts (distinct; their hash names the result files).
    fn : picklable top-level function ``cell -> dict`` (the result, JSON-able).
    results_dir : directory of the per-cell result files ``cell-<key>.json``; current files
        are reused (resume), stale, truncated and failed ones recomputed (module docstring).
    workers : processes (local) or cells in flight (ray); default: all cores (local),
        as many as the cluster allows (ray).
    backend : ``"local"`` or ``"ray"``; a ``ray_address`` implies ``"ray"``.
    progress : print one line per finished cell (failures are always printed).
    resolve : ``cell -> dict`` of the settings the cell really runs with (defaults filled
        in); its hash is stored in the cell file. Default: the cell itself.

    Raises
    ------
    SweepError : after every cell has run, if some failed (the others are saved).
    """
    from dynsim._version import __version__

    if ray_address is not None:
        backend = "ray"
    if backend not in BACKENDS:
        raise ConfigError(f"unknown sweep backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
    keys = [cell_key(c) for c in cells]
    if len(set(keys)) != len(keys):
        raise ConfigError("sweep cells must be distinct (two cells have the same settings)")
    resolve = resolve or (lambda c: c)
    fingerprints = [{"dynsim_version": __version__, "config_hash": config_hash(resolve(c))} for c in cells]
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    book = _Book(cells, results_dir, fingerprints, progress)
    todo = []
    for i, cell in enumerate(cells):
        result, why = read_cell(cell_path(results_dir, cell), fingerprints[i])
        if result is not None:
            book.results[i] = result
            book.log(i, "reused")
            continue
        if why is not None:
            warnings.warn(f"sweep: {why}; recomputing that cell", stacklevel=2)
        todo.append(i)
    if todo and backend == "ray":
        _run_ray(book, fn, todo, workers, ray_address)
    elif todo and (workers == 1 or len(todo) == 1):
        for i in todo:
            book.record(i, _run_cell(fn, cells[i]))
    elif todo:
        _run_pool(book, fn, todo, workers or os.cpu_count() or 1)
    if book.failures:
        failed = sorted(book.failures)
        lines = "; ".join(f"{_canonical(cells[i])}: {book.failures[i]}" for i in failed[:3])
        more = f" (and {len(failed) - 3} more)" if len(failed) > 3 else ""
        raise SweepError(
            f"{len(failed)} of {len(cells)} sweep cells failed: {lines}{more}. The other cells are saved in "
            f"{results_dir}; run the same command again to retry only the failed ones",
            book.results, [(cells[i], book.failures[i]) for i in failed],
        )
    return list(book.results)


def _local_gpus(cells: list[dict]) -> int:
    """GPUs to share among local workers: those of this machine if a cell runs on CUDA."""
    if not any(cell_resources(c)["num_gpus"] for c in cells):
        return 0
    import torch

    return torch.cuda.device_count()  # counts devices without creating a CUDA context


def _run_pool(book: _Book, fn, todo: list[int], workers: int) -> None:
    """The local backend: a spawn-context process pool whose workers die with this process;
    CUDA cells are spread over the GPUs (one per worker, in turn)."""
    ctx = multiprocessing.get_context("spawn")
    n_gpus = _local_gpus([book.cells[i] for i in todo])
    pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx, initializer=_worker_init,
                               initargs=(os.getpid(), ctx.Value("i", 0), n_gpus))
    try:
        pending = {pool.submit(_run_cell, fn, book.cells[i]): i for i in todo}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                i = pending.pop(fut)
                try:
                    outcome = fut.result()
                except BrokenProcessPool as exc:  # a worker was killed (out of memory, signal)
                    outcome = {"status": "failed", "error": f"worker process died ({exc})", "seconds": 0.0}
                book.record(i, outcome)
    except BaseException:  # Ctrl-C, a full disk: do not wait for the queued cells
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


# --- Ray ---------------------------------------------------------------------------------------
def _runtime_env() -> dict:
    """Ship the driver's dynsim package to the workers (its source, without caches)."""
    return {"py_modules": [str(Path(__file__).resolve().parent)], "excludes": ["__pycache__", "*.pyc"]}


def _connect_ray(ray, ray_address: str | None) -> bool:
    """Connect (or start a local instance); return True if this call did (so it disconnects)."""
    if ray.is_initialized():
        return False
    where = ray_address or os.environ.get("RAY_ADDRESS") or "a running cluster or a new local instance"
    try:
        # no num_cpus here: Ray refuses it when joining a cluster; each task asks for its resources
        ray.init(address=ray_address, include_dashboard=False, runtime_env=_runtime_env())
    except (ConnectionError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"could not connect to Ray at {where}: {first}") from None
    return True


def _check_gpus(ray, book: _Book, todo: list[int]) -> None:
    need = max((cell_resources(book.cells[i])["num_gpus"] for i in todo), default=0)
    have = ray.cluster_resources().get("GPU", 0)
    if need > have:
        raise ConfigError(
            f"the sweep's cells run on CUDA and ask for {need} GPU each, but the Ray cluster has {have:g} GPUs; "
            "add GPU nodes or run the cells with device=cpu"
        )


def _run_ray(book: _Book, fn, todo: list[int], workers: int | None, ray_address: str | None) -> None:
    try:
        import ray
    except ImportError:
        raise ConfigError("the ray backend needs Ray: pip install 'dynsim[ray]' (or use --backend local)") from None
    connected = _connect_ray(ray, ray_address)
    try:
        _check_gpus(ray, book, todo)
        task = ray.remote(_run_cell)
        fn_ref = ray.put(fn)  # one copy of the function in the object store, not one per task
        queue = list(todo)
        pending: dict[Any, int] = {}
        limit = workers or len(todo)
        while queue or pending:
            while queue and len(pending) < limit:
                i = queue.pop(0)
                ref = task.options(**cell_resources(book.cells[i]), max_retries=0).remote(fn_ref, book.cells[i])
                pending[ref] = i
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                i = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the worker died, the runtime env failed, ...
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    outcome = {"status": "failed", "error": f"{type(exc).__name__}: {first}", "seconds": 0.0}
                book.record(i, outcome)
    finally:
        if connected:
            ray.shutdown()
