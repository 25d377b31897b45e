"""Result files: written atomically and as a set, read back as tables.

* :func:`write_json_atomic`, :func:`save_figure_atomic`, :func:`save_torch_atomic`: one file,
  either the old one or the complete new one (temp file + rename; the temp files of a killed
  write are removed by the next write of that file).
* :func:`write_result`: a result JSON and its plots as **one set**: every file is written to a
  temp file first and only when all are complete are they renamed into place, the JSON last.
  A full disk or an I/O error raises :class:`~dynsim.errors.OutputError` naming the file, and
  leaves the previous result's files as they were (never a new JSON beside old PNGs).
* :func:`load`: result files (or a folder of them) as a pandas ``DataFrame``.

Files get the mode ``open`` would give them (``0o666`` minus the umask), not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynsim.errors import OutputError


def result_header(command: str, config: Any, **machine: Any) -> dict[str, Any]:
    """The head every result JSON starts with: the command, dynsim's and torch's
    versions, the machine (platform, torch threads, plus ``machine`` extras such as the
    device) and the full resolved config (a dataclass or a dict)."""
    from dynsim._version import __version__

    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return {
        "command": command,
        "dynsim_version": __version__,
        "torch_version": torch.__version__,
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), **machine},
        "config": cfg,
    }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Path):
        return str(obj)
    return obj


# temp files of a write in progress: ".<name>.<pid>.<random>.tmp" beside the target, so that a
# later write can tell the leftovers of a killed process (pid gone) from a live writer's
_TMP_SUFFIX = ".tmp"


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temp_files(path: str | Path) -> list[Path]:
    """Delete the temp files that a killed write of ``path`` left beside it (their writer's
    process no longer exists); return what was removed."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.*{_TMP_SUFFIX}"):
        pid_text = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def glob_escape(name: str) -> str:
    """``name`` with glob's special characters escaped."""
    import glob

    return glob.escape(name)


def _file_mode() -> int:
    """The mode a newly created file gets (0o666 minus the umask), as ``open`` would give it;
    ``mkstemp`` creates 0o600, which would hide results from the user's group."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _write_temp(path: Path, write) -> Path:
    """Write ``path``'s content to a complete, synced temp file beside it; return the temp path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _file_mode())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _atomic_write(path: Path, write) -> Path:
    path = Path(path)
    tmp = _write_temp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def dumps_compact(obj: Any, indent: int = 1, _level: int = 0) -> str:
    """JSON with one key per line, but every list of plain values (a per-input array, a
    per-seed list) on a single line: readable and diffable without one number per line."""
    pad, inner = " " * (indent * _level), " " * (indent * (_level + 1))
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(str(k))}: {dumps_compact(v, indent, _level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if all(not isinstance(v, (dict, list)) for v in obj):
            return json.dumps(obj, separators=(",", ":"), allow_nan=False)
        return "[\n" + ",\n".join(inner + dumps_compact(v, indent, _level + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj, allow_nan=False)


def write_json_atomic(path: str | Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as JSON to ``path`` via a temp file + rename (tensors/arrays become lists;
    lists of plain values on one line, :func:`dumps_compact`)."""
    text = dumps_compact(_jsonable(data))
    return _atomic_write(Path(path), lambda fh: fh.write(text.encode()))


def save_figure_atomic(fig, path: str | Path, **kwargs: Any) -> Path:
    """Save a matplotlib figure to ``path`` (format from the suffix) atomically."""
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    return _atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, **{"dpi": 120, **kwargs}))


def save_torch_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically (checkpoints)."""
    return _atomic_write(Path(path), lambda fh: torch.save(obj, fh))


# --- a result and its plots, written as one set --------------------------------------------
PLOT_FORMATS = ("png", "pdf", "svg")
_plot_formats: ContextVar[tuple[str, ...]] = ContextVar("dynsim_plot_formats", default=("png",))


def check_plot_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """``formats`` as a tuple, each one of :data:`PLOT_FORMATS`; ConfigError otherwise."""
    from dynsim.errors import ConfigError

    formats = tuple(f.strip().lower().lstrip(".") for f in formats if f.strip())
    bad = [f for f in formats if f not in PLOT_FORMATS]
    if bad or not formats:
        raise ConfigError(f"--plot-format {','.join(formats) or repr('')}: choose one or more of "
                          f"{', '.join(PLOT_FORMATS)} (comma-separated), e.g. png,pdf")
    return tuple(dict.fromkeys(formats))


@contextmanager
def plot_formats(formats: Sequence[str]) -> Iterator[tuple[str, ...]]:
    """Within this block :func:`write_result` saves every plot in each of ``formats``
    (``"png"``, ``"pdf"``, ``"svg"``; default PNG only): ``--plot-format png,pdf``."""
    token = _plot_formats.set(check_plot_formats(formats))
    try:
        yield _plot_formats.get()
    finally:
        _plot_formats.reset(token)


def _json_bytes(data: dict[str, Any]) -> bytes:
    return json.dumps(_jsonable(data), indent=1, allow_nan=False).encode()


def _writer(path: Path, content: Any):
    if isinstance(content, dict):
        text = _json_bytes(content)
        return lambda fh: fh.write(text)
    if isinstance(content, (bytes, str)):
        data = content.encode() if isinstance(content, str) else content
        return lambda fh: fh.write(data)
    fmt = path.suffix.lstrip(".") or "png"  # a matplotlib Figure
    return lambda fh: content.savefig(fh, format=fmt, dpi=120)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def write_files_as_set(files: dict[str | Path, Any]) -> list[Path]:
    """Write ``{path: content}`` as one set (content: a dict -> JSON, a matplotlib Figure ->
    the format of the path's suffix, bytes or str -> as is); return the paths.

    All files are written to synced temp files first; only when every one is complete are they
    renamed into place, ``.json`` files last. On an ``OSError`` (disk full, I/O error) the temp
    files are removed, nothing is renamed, and :class:`OutputError` names the file and the
    reason: the previous files stay as they were.
    """
    items = sorted(((Path(p), c) for p, c in files.items()), key=lambda pc: pc[0].suffix == ".json")
    temps: list[tuple[Path, Path]] = []
    try:
        for path, content in items:
            try:
                temps.append((_write_temp(path, _writer(path, content)), path))
            except OSError as exc:
                kept = [str(p) for p, _ in items if p.exists()]
                previous = f"; the previous {', '.join(kept)} kept unchanged" if kept else ""
                raise OutputError(f"could not write {path}: {_reason(exc)}; none of this result's "
                                  f"{len(items)} files was written{previous}") from None
        done: list[Path] = []
        for tmp, path in temps:
            try:
                os.replace(tmp, path)
            except OSError as exc:
                left = [str(p) for _, p in temps if p not in done]
                raise OutputError(f"could not move {path} into place: {_reason(exc)}; written: "
                                  f"{', '.join(map(str, done)) or 'none'}; not written: {', '.join(left)}") from None
            done.append(path)
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
    return [p for p, _ in items]


def write_result(out: str | Path, result: dict[str, Any], plots: dict[str, tuple[str, Any]] | None = None,
                 extra: dict[str, tuple[str | Path, Any]] | None = None) -> dict[str, str]:
    """Write result JSON ``out`` and its plots as one set (:func:`write_files_as_set`).

    ``plots``: ``{key: (suffix, figure)}``; each figure is saved as ``<out stem><suffix>.<fmt>``
    for every format of :func:`plot_formats` and closed. ``extra``: more ``{key: (path, content)}``.
    ``result["files"]`` becomes ``{"result": out, key: path, ...}`` (``key`` is the first
    format's file, ``key_<fmt>`` the others) and is returned.
    """
    import matplotlib.pyplot as plt

    out = Path(out)
    stem = str(out.with_suffix(""))
    formats = _plot_formats.get()
    files: dict[str, str] = {"result": str(out)}
    contents: dict[Path, Any] = {}
    for key, (suffix, fig) in (plots or {}).items():
        for i, fmt in enumerate(formats):
            path = f"{stem}{suffix}.{fmt}"
            files[key if i == 0 else f"{key}_{fmt}"] = path
            contents[Path(path)] = fig
    for key, (path, content) in (extra or {}).items():
        files[key] = str(path)
        contents[Path(path)] = content
    result["files"] = files
    contents[out] = result
    try:
        write_files_as_set(contents)
    finally:
        for _, fig in (plots or {}).values():
            plt.close(fig)
    return files


# --- reading results back as tables ------------------------------------------------------------
def _scalars(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The scalar (non-list, non-dict) entries of ``d``; lists of scalars become strings."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            continue
        if isinstance(v, (list, tuple)):
            if all(not isinstance(x, (list, tuple, dict)) for x in v) and len(v) <= 16:
                out[prefix + k] = ",".join(map(str, v))
            continue
        out[prefix + k] = v
    return out


def _with_settings(row: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """``row`` plus the scalar ``settings`` it does not already have (a clash gets ``config.``)."""
    out = dict(row)
    for k, v in _scalars(settings).items():
        out[k if k not in out else f"config.{k}"] = v
    return out


def table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of one result dict (see :func:`load`)."""
    command = result.get("command", "")
    config = result.get("config", {}) if isinstance(result.get("config"), dict) else {}
    if "cell" in result and "result" in result and "command" not in result:  # a sweep's cell file
        inner = result["result"] if isinstance(result["result"], dict) else {}
        final = inner.get("final", {}) if isinstance(inner.get("final"), dict) else {}
        return [_with_settings({**_scalars(inner), **_scalars(final), "seconds": result.get("seconds")},
                               result["cell"])]
    if command == "study convergence":
        return [_with_settings({**_scalars(c["final"]), "train_evals": c.get("train_evals")}, c["cell"])
                for c in result.get("cells", [])]
    if command == "bench solvers":
        return [{"state": state, **_scalars(r)} for state, block in result.get("states", {}).items()
                for r in block["rows"]]
    if command == "study ssl":
        return [_with_settings(_scalars(r), config) for r in result.get("rows", [])]
    if command == "plot trajectories":
        from dynsim.stopping import Status

        return [{"input": item["index"], "label": item["label"], "solver": run["solver"],
                 "steps": run["steps"][-1], "status": Status(run["status"]).name, "n_evals": run["n_evals"],
                 "final_residual": run["residual"][-1]}
                for item in result.get("inputs", []) for run in item["runs"]]
    for key in ("seeds", "runs"):  # several runs in one file: one block of rows per run
        if isinstance(result.get(key), list) and all(isinstance(r, dict) and "history" in r for r in result[key]):
            return [row for r in result[key] for row in table_rows({"command": command, **r})]
    if isinstance(result.get("history"), list):  # one run: one row per epoch
        seed = {"seed": config.get("seed")} if "seed" in config else {}
        return [_with_settings({**seed, **_scalars(h)}, config) for h in result["history"]]
    if isinstance(result.get("final"), dict):
        return [_with_settings(_scalars(result["final"]), config)]
    return []


def table(result: dict[str, Any]):
    """One result dict as a pandas ``DataFrame`` (see :func:`load`)."""
    import pandas as pd

    return pd.DataFrame(table_rows(result))


def load(path: str | Path, *, pattern: str = "*.json"):
    """Result file(s) as one pandas ``DataFrame``.

    ``path``: a result JSON, or a folder whose JSON files (``pattern``, searched recursively,
    e.g. a study's cells) are read and stacked, with a ``file`` column. Rows:

    * ``run dssm`` / ``run ssl``: one per epoch (the history: images seen, iterations,
      accuracy when evaluated, ...) with the run's settings as columns (``seed``, ``data``, ...);
      a file holding several runs (``seeds``/``runs``) gives one block per run;
    * ``study convergence``: one per cell (T, cap, streaming, ..., final accuracy, train time,
      field evaluations); a sweep's cell file: one row (its settings and final block);
    * ``bench solvers``: one per (network state, solver setting);
    * ``study ssl``: one per table row; ``plot trajectories``: one per (input, solver).

    >>> df = load("runs/conv.json")                             # doctest: +SKIP
    >>> df.pivot_table("test_accuracy", "threshold", "max_steps")  # doctest: +SKIP
    """
    import pandas as pd

    from dynsim.errors import DataError

    path = Path(path)
    if path.is_dir():
        frames = []
        for file in sorted(path.rglob(pattern)):
            try:
                data = json.loads(file.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue  # not a (complete) result: a folder may hold other files
            rows = table_rows(data) if isinstance(data, dict) else []
            if rows:
                frames.append(pd.DataFrame(rows).assign(file=str(file)))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no such result file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not a readable result JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a dynsim result (a JSON object with a history, cells or rows)")
    return table(data)
