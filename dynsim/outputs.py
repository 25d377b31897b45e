"""Output paths: checked before any work starts, and guarded against silent loss.

Every command that writes a result claims its ``--out`` first (:func:`claim_output`):

1. **the place** (:func:`check_place`): ``--out`` must not be a directory (or, for commands whose
   output is a folder, a file), must not lie under a file, and its folder must be creatable and
   writable (a probe file is created and removed) with some free space. Each failure is one line,
   in a second, instead of an ``OSError`` after minutes of training;
2. **one writer** (:class:`OutputLock`): ``<out>.lock`` is locked (``flock``) for the whole run
   and names the process; a second process writing the same ``--out`` is refused with that
   name. The lock dies with its process, so a killed run never blocks the next one;
3. **no silent loss** (:func:`check_previous`): an ``--out`` that holds a finished result, or
   whose checkpoint (or sweep cells) hold an unfinished run, is refused unless ``resume``
   (continue it) or ``overwrite`` (replace it: its checkpoint / cells are deleted) is given.

>>> with claim_output("runs/a.json", related=[checkpoint_path("runs/a.json")]):  # doctest: +SKIP
...     run_dssm(config)
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynsim.errors import OutputError

MIN_FREE_BYTES = 1 << 20  # refuse a place with less than 1 MiB free: not even a result JSON fits


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def check_place(out: str | Path, *, flag: str = "--out", directory: bool = False) -> Path:
    """Check that ``out`` can be written (see the module docstring); create its folder.

    ``directory``: the output is a folder (``study ssl``) rather than a file.
    Raises :class:`OutputError` naming the path and the problem.
    """
    out = Path(out)
    if not str(out) or str(out) in (".", ".."):
        raise OutputError(f"{flag} {str(out)!r} is not a file name; give e.g. runs/run.json")
    if not directory and out.is_dir():
        raise OutputError(f"{flag} {out} is a directory; give a file name such as {out / 'run.json'}")
    if directory and out.exists() and not out.is_dir():
        raise OutputError(f"{flag} {out} is a file; this command writes a folder: give a folder name")
    folder = out if directory else out.parent
    for ancestor in (folder, *folder.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise OutputError(f"{flag} {out} lies under {ancestor}, which is a file, not a folder")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{flag} {out}: cannot create the folder {folder}: {_reason(exc)}") from None
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".dynsim-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{flag} {out}: cannot write in {folder}: {_reason(exc)}") from None
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_BYTES:
        raise OutputError(f"{flag} {out}: only {free} bytes free in {folder}; free some space first")
    return out


def _describe_checkpoint(path: Path) -> str:
    try:
        from dynsim.checkpoint import load_checkpoint

        return f" ({load_checkpoint(path)['completed_epochs']} epoch(s) done)"
    except Exception:  # unreadable: say nothing more; resume will name the problem
        return ""


def check_previous(out: str | Path, *, related: Sequence[str | Path] = (), resume: bool = False,
                   overwrite: bool = False, flag: str = "--out", can_resume: bool = True) -> None:
    """Refuse to replace a finished result or an unfinished run without ``resume``/``overwrite``.

    ``related``: the files/folders that hold an unfinished run of ``out`` (its checkpoint, a
    sweep's cells). With ``overwrite`` they are deleted here, so a later ``--resume`` cannot
    continue the old run; the old result itself is replaced only when the new one is complete.
    """
    out = Path(out)
    if resume and overwrite:
        raise OutputError("give --resume (continue the run in --out) or --overwrite (replace it), not both")
    how = "--resume to continue it, --overwrite to replace it" if can_resume else "--overwrite to replace it"
    if not (resume or overwrite):
        if out.exists():
            raise OutputError(f"{flag} {out} holds a finished result; give {how}, or choose another {flag}")
        for path in map(Path, related):
            if path.exists() and (path.is_file() or any(path.iterdir())):
                what = _describe_checkpoint(path) if path.is_file() else ""
                raise OutputError(f"{path} holds an unfinished run of {flag} {out}{what}; give {how}, "
                                  f"or choose another {flag}")
    if overwrite:
        for path in map(Path, related):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def lock_path(out: str | Path) -> Path:
    """``runs/a.json`` -> ``runs/a.json.lock``."""
    out = Path(out)
    return out.with_name(out.name + ".lock")


class OutputLock:
    """An exclusive lock on ``<out>.lock`` held while one process writes ``out``.

    The lock is an ``flock`` on the file, so the system releases it when the process dies
    (even by SIGKILL); the file's text names the holder (pid, host, command, start time) for
    the message another process gets. Re-entrant use within one process is refused too.
    """

    def __init__(self, out: str | Path, *, flag: str = "--out"):
        self.out = Path(out)
        self.path = lock_path(out)
        self.flag = flag
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise OutputError(f"{self.flag} {self.out} is being written by {holder}; wait for it to "
                                  f"finish or choose another {self.flag}") from None
            # the file may have been unlinked by its previous holder between open and flock
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        command = " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:3]) if sys.argv else "python"
        text = (f"dynsim process {os.getpid()} on {socket.gethostname()} ({command}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')})")
        os.ftruncate(fd, 0)
        os.write(fd, text.encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def claim_output(out: str | Path, *, related: Sequence[str | Path] = (), resume: bool = False,
                 overwrite: bool = False, directory: bool = False, result: str | Path | None = None,
                 flag: str = "--out", can_resume: bool = True) -> Iterator[Path]:
    """Check ``out``'s place, lock it, and check (or, with ``overwrite``, clear) what it holds;
    the lock is held until the block ends. ``result``: the file whose presence means a
    finished result (default ``out``; a folder output names its summary file). See the module
    docstring."""
    out = check_place(out, flag=flag, directory=directory)
    with OutputLock(out, flag=flag):
        check_previous(out if result is None else result, related=related, resume=resume,
                       overwrite=overwrite, flag=flag, can_resume=can_resume)
        yield out


@dataclass(frozen=True)
class OutputSpec:
    """How a command writes its output, for :func:`claim_output`.

    default : ``args -> path`` used when ``--out`` is not given.
    related : ``out -> paths`` that hold an unfinished run of ``out`` (checkpoint, sweep cells).
    result : ``out -> the file whose presence means a finished result`` (default: ``out``).
    directory : the output is a folder.
    can_resume : the command takes ``--resume``.
    plots : the command draws plots (it takes ``--plot-format``).
    validate : ``args -> None``, raising on bad settings; run before the output is claimed, so a
        bad setting is reported first and ``--overwrite`` deletes nothing for a run that cannot start.
    """

    default: Callable[[Any], str]
    related: Callable[[Path], Sequence[Path]] = lambda out: ()
    result: Callable[[Path], Path] | None = None
    directory: bool = False
    can_resume: bool = False
    plots: bool = True
    validate: Callable[[Any], None] | None = None

    def claim(self, args: Any):
        """``claim_output`` for parsed CLI ``args`` (sets ``args.out`` to the default if unset),
        after ``validate(args)``."""
        if self.validate is not None:
            self.validate(args)
        if not getattr(args, "out", None):
            from dynsim.checkpoint import check_resume

            check_resume(bool(getattr(args, "resume", False)), None)
            args.out = self.default(args)
        out = Path(args.out)
        return claim_output(out, related=self.related(out), resume=bool(getattr(args, "resume", False)),
                            overwrite=bool(getattr(args, "overwrite", False)), directory=self.directory,
                            result=self.result(out) if self.result else None, can_resume=self.can_resume)


def timestamped(kind: str, *fields: str, suffix: str = ".json") -> Callable[[Any], str]:
    """A default ``--out``: ``runs/<kind>-<args.field>...-<YYYYmmdd-HHMMSS><suffix>``."""

    def default(args: Any) -> str:
        parts = [kind, *(str(getattr(args, f)) for f in fields), time.strftime("%Y%m%d-%H%M%S")]
        return str(Path("runs") / ("-".join(parts) + suffix))

    return default
