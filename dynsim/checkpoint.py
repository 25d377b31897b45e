"""Checkpoints: save a training run at epoch boundaries and resume it exactly.

A checkpoint holds everything the event loop needs to continue as if it had never
stopped: the weights of the registered modules (``module.state_dict()``), the engine's
counters and history, every callback's ``state_dict()`` (plasticity, monitors,
evaluators), the settler's carried state (streaming input) and the RNG states of torch,
NumPy and Python. It is written atomically (temp file + rename), so the file on disk is
always the last *complete* checkpoint.

>>> ckpt = Checkpoint("runs/a.ckpt.pt", every=5, modules={"system": layer})  # doctest: +SKIP
>>> engine = Engine(settler, [rule, monitor, ckpt])                          # doctest: +SKIP
>>> engine.fit(batches, epochs=100, resume=True)  # continues from runs/a.ckpt.pt if present  # doctest: +SKIP

Resuming reproduces an uninterrupted run bit for bit when the batches of epoch ``e``
depend only on ``(seed, e)`` (as :func:`dynsim.builders.epoch_batches` does).
"""

from __future__ import annotations

import pickle
import random
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dynsim.callbacks import Callback
from dynsim.errors import ConfigError, OutputError
from dynsim.results import save_torch_atomic

if TYPE_CHECKING:  # pragma: no cover
    from dynsim.engine import Engine

FORMAT = 1


def check_resume(resume: bool, out: str | Path | None) -> None:
    """Refuse ``resume`` without ``out``: a run is continued from what lies beside its result
    (the checkpoint ``<out>.ckpt.pt``, or a study's cells). The one place this is said."""
    if resume and not out:
        from dynsim.errors import ConfigError

        raise ConfigError("--resume needs --out PATH: the result of the run to continue "
                          "(its checkpoint <out>.ckpt.pt, or a study's cells, lie beside it)")


def checkpoint_path(out: str | Path) -> Path:
    """The checkpoint that belongs to result file ``out``: ``runs/x.json`` -> ``runs/x.ckpt.pt``."""
    out = Path(out)
    return out.with_name(out.stem + ".ckpt.pt")


def _cuda_in_use() -> bool:
    """True when this process has initialised CUDA (a run on a GPU); asking does not initialise it."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def get_rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU, and CUDA per device when this process uses CUDA), NumPy's
    global generator and Python's ``random``. A CPU run never touches CUDA here, even on a
    machine with GPUs (initialising it costs seconds and memory on every GPU)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if _cuda_in_use():
        state["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned, on a machine with any number of GPUs.

    The CUDA generators are restored only when this process uses CUDA (a CPU resume of a GPU
    run leaves CUDA alone), and only for the devices both machines have: resuming on fewer
    GPUs restores the first ones and warns that the others' streams start afresh.
    """
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    saved = list(state.get("cuda") or [])
    if saved and _cuda_in_use():
        have = torch.cuda.device_count()
        for i, s in enumerate(saved[:have]):
            torch.cuda.set_rng_state(s, i)
        if len(saved) > have:
            warnings.warn(f"the checkpoint holds CUDA random states of {len(saved)} GPUs, this machine has {have}: "
                          f"restored the first {have}; the others' random streams start afresh", stacklevel=2)


def _plain(obj: Any) -> Any:
    """NumPy scalars/arrays -> Python numbers/tensors, so the file loads with ``weights_only``."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    return obj


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file (tensors and plain Python values only: ``weights_only``).

    Every tensor is loaded onto the CPU (``map_location="cpu"``), whatever device wrote it, so
    a checkpoint of a GPU run loads on a machine with fewer GPUs or none; the modules copy
    their weights to their own device in ``load_state_dict``.
    """
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"no checkpoint at {path}; start the run without --resume") from None
    except pickle.UnpicklingError:  # torch's refusal of objects other than tensors (six lines of advice)
        raise ConfigError(f"{path} is not a readable dynsim checkpoint (it holds objects other than tensors and "
                          "plain values, which are not loaded because loading them could run code); "
                          "delete it to start over") from None
    except Exception as exc:  # truncated or foreign file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{path} is not a readable dynsim checkpoint ({reason}); delete it to start over") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a dynsim checkpoint of format {FORMAT}; delete it to start over")
    return ckpt


class GeneratorStates(Callback):
    """Carries private ``torch.Generator`` states through checkpoints.

    Pipelines that draw from their own generators (sample order, augmentations, negatives)
    add this callback, before the :class:`Checkpoint`, so a resumed run continues their
    streams exactly: ``GeneratorStates(order=order_gen, aug=gen)``.
    """

    def __init__(self, **generators: torch.Generator):
        self.generators = generators

    def state_dict(self) -> dict[str, Any]:
        return {name: g.get_state() for name, g in self.generators.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = sorted(set(self.generators) - set(state))
        if missing:
            raise ConfigError(f"checkpoint has no state for generator(s) {', '.join(missing)}")
        for name, g in self.generators.items():
            g.set_state(state[name])


class Checkpoint(Callback):
    """Write a checkpoint every ``every`` epochs and when training ends.

    Parameters
    ----------
    path : file to (over)write; only the latest checkpoint is kept.
    every : epochs between checkpoints (``0``: only at the end).
    modules : ``{name: nn.Module}`` whose ``state_dict()`` is saved (the system's weights).
    meta : settings that must match on resume (e.g. the training config); a checkpoint
        written with different values is refused with a :class:`ConfigError` naming them.
    recorded : values saved for the record only (e.g. the solver that ``auto`` resolved to, which
        may differ between versions); after :meth:`restore` the checkpoint's are in
        ``restored_record`` (``{}`` for a checkpoint written without them), for the caller to compare.

    Put it **last** in the engine's callback list, so that every other callback has
    finished its ``on_epoch_end`` when the state is saved.

    Attributes
    ----------
    last_saved_epoch : number of completed epochs in the file on disk (``None``: none yet).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        every: int = 1,
        modules: dict[str, torch.nn.Module] | None = None,
        meta: dict[str, Any] | None = None,
        recorded: dict[str, Any] | None = None,
    ):
        if not isinstance(every, int) or isinstance(every, bool) or every < 0:
            raise ConfigError(f"checkpoint every must be an integer >= 0 epochs, got {every!r}")
        self.path = Path(path)
        self.every = every
        self.modules = dict(modules or {})
        self.meta = dict(meta or {})
        self.recorded = dict(recorded or {})
        self.restored_record: dict[str, Any] = {}
        self.last_saved_epoch: int | None = None

    # --- saving ---------------------------------------------------------------------
    def save(self, engine: Engine, completed_epochs: int) -> Path:
        """Write the checkpoint now, recording ``completed_epochs`` as done."""
        payload = {
            "format": FORMAT,
            "completed_epochs": completed_epochs,
            "meta": self.meta,
            "recorded": self.recorded,
            "engine": _plain(engine.state_dict()),
            "modules": {name: m.state_dict() for name, m in self.modules.items()},
            "rng": get_rng_state(),
        }
        try:
            save_torch_atomic(payload, self.path)
        except OSError as exc:  # disk full, I/O error: the previous checkpoint file is intact
            if self.last_saved_epoch:
                kept = (f"the last good checkpoint {self.path} (after epoch {self.last_saved_epoch}) is kept; "
                        "free some space and rerun with --resume")
            else:
                kept = "no earlier checkpoint of this run exists"
            raise OutputError(f"could not write checkpoint {self.path} after epoch {completed_epochs}: "
                              f"{exc.strerror or exc}; {kept}") from None
        self.last_saved_epoch = completed_epochs
        return self.path

    def on_fit_start(self, engine):
        if engine.callbacks[-1] is not self:
            raise ConfigError("put the Checkpoint callback last in the engine's callbacks, "
                              "so that it saves the state after every other callback's on_epoch_end")

    def on_epoch_end(self, engine, epoch):
        if self.every and (epoch + 1) % self.every == 0:
            self.save(engine, epoch + 1)

    def on_fit_end(self, engine):
        done = len(engine.history) and engine.history[-1]["epoch"] + 1
        if done and self.last_saved_epoch != done:
            self.save(engine, done)

    # --- restoring ------------------------------------------------------------------
    def restore(self, engine: Engine, path: str | Path | None = None) -> int:
        """Load the checkpoint into ``engine`` and the modules; return the next epoch to run.

        Returns 0 (and changes nothing) when there is no checkpoint file yet.
        """
        path = Path(path) if path is not None else self.path
        if not path.exists():
            return 0
        ckpt = load_checkpoint(path)
        stored = ckpt.get("meta", {})
        diff = sorted(k for k in set(stored) | set(self.meta) if stored.get(k) != self.meta.get(k))
        if diff:
            pairs = ", ".join(f"{k}={stored.get(k)!r} (now {self.meta.get(k)!r})" for k in diff)
            raise ConfigError(f"checkpoint {path} was written with different settings: {pairs}; "
                              "resume with the same settings, or choose a new --out to start afresh")
        missing = sorted(set(self.modules) - set(ckpt["modules"]))
        if missing:
            raise ConfigError(f"checkpoint {path} has no weights for {', '.join(missing)}")
        for name, module in self.modules.items():
            module.load_state_dict(ckpt["modules"][name])
        engine.load_state_dict(ckpt["engine"])
        set_rng_state(ckpt["rng"])
        self.restored_record = dict(ckpt.get("recorded", {}))
        self.last_saved_epoch = ckpt["completed_epochs"]
        return int(ckpt["completed_epochs"])
