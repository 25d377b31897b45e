"""Writing results atomically: a file is either the old one or the complete new one."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def result_header(command: str, config: Any, **machine: Any) -> dict[str, Any]:
    """The head every result JSON starts with (DESIGN §4): the command, dynsim's and torch's
    versions, the machine (platform, torch threads, plus ``machine`` extras such as the
    device) and the full resolved config (a dataclass or a dict)."""
    import dynsim

    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return {
        "command": command,
        "dynsim_version": dynsim.__version__,
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


def _atomic_write(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
