"""Nothing lost, no traceback (issue 19, items 1, 2, 3, 5): output paths are checked before any
work, a result is written as a set, a full disk names the file and keeps the previous result,
a finished result or an unfinished run is never replaced without --resume/--overwrite, two
processes cannot write one --out, and killed writes / foreign checkpoints / gzip bombs give one
line."""

from __future__ import annotations

import errno
import gzip
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from dynsim.checkpoint import checkpoint_path, load_checkpoint
from dynsim.cli import main
from dynsim.errors import DataError, OutputError

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--data", "digits", "--images-per-epoch", "20", "--max-steps", "50", "--eval-every", "0",
        "--eval-train-size", "100", "--eval-test-size", "50", "--no-progress"]
# one cheap invocation per command that writes; "{out}" is replaced by the path under test
COMMANDS = {
    "run dssm": ["run", "dssm", *FAST, "--epochs", "1"],
    "run ssl": ["run", "ssl", "--data", "digits", "--epochs", "1", "--n-train", "100", "--n-test", "50",
                "--batch-size", "50", "--probe-epochs", "1"],
    "study convergence": ["study", "convergence", "--thresholds", "1e-2", "--caps", "5", "--streams", "off",
                          "--epochs", "1", "--images-per-epoch", "20", "--workers", "1", "--no-progress"],
    "study ssl": ["study", "ssl", "--data", "digits", "--epochs", "3", "--n-train", "100", "--n-test", "50",
                  "--batch-size", "50", "--probe-epochs", "1"],
    "bench solvers": ["bench", "solvers", "--solvers", "euler", "--n-inputs", "2", "--states", "init",
                      "--no-progress"],
    "plot trajectories": ["plot", "trajectories", "--solvers", "euler", "--inputs", "0", "--no-progress"],
}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("dynsim: error:"), err
    return lines[0]


# --- item 1: output paths checked before any work ----------------------------------------------
@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("where", ["under a file", "read-only place", "is a directory"])
def test_bad_out_is_refused_in_a_second(command, where, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    directory = command == "study ssl"
    out, message = {
        "under a file": (blocker / "sub" / "r.json", f"lies under {blocker}, which is a file"),
        "read-only place": (Path("/proc/dynsim-test/r.json"), "cannot"),
        "is a directory": ((blocker if directory else tmp_path), "is a file" if directory else "is a directory"),
    }[where]
    t0 = time.perf_counter()
    # the default epochs (120 for run dssm) would take minutes if the check came after training
    argv = [a for a in COMMANDS[command] if a != "1"] if command == "run dssm" else COMMANDS[command]
    argv = [*argv[: argv.index("--epochs")], *argv[argv.index("--epochs") + 2 :]] if command == "run dssm" else argv
    assert main([*argv, "--out", str(out)]) == 2
    assert time.perf_counter() - t0 < 5
    line = one_line_error(capsys)
    assert message in line and str(out) in line


# --- item 2: a result and its plots as one set; disk full ---------------------------------------
def test_disk_full_while_plotting_keeps_the_previous_result(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.json"
    assert main(["run", "dssm", *FAST, "--epochs", "1", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert {"r.json", "r_accuracy.png", "r_iterations.png", "r.ckpt.pt"} <= set(before)

    from matplotlib.figure import Figure

    def full(self, fh, **kwargs):
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full)
    capsys.readouterr()
    assert main(["run", "dssm", *FAST, "--epochs", "2", "--out", str(out), "--overwrite"]) == 2
    line = one_line_error(capsys)
    assert "could not write" in line and "No space left on device" in line and "kept unchanged" in line
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "r.ckpt.pt"}
    # the previous JSON and PNGs, untouched; no temp file left behind
    assert after == {k: v for k, v in before.items() if k != "r.ckpt.pt"}
    # the new run's final checkpoint holds its training: --resume finishes it
    assert load_checkpoint(checkpoint_path(out))["completed_epochs"] == 2


def test_disk_full_while_checkpointing_names_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.json"
    real_save, calls = torch.save, []

    def save(obj, fh, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, fh, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert main(["run", "dssm", *FAST, "--epochs", "3", "--out", str(out)]) == 2
    line = one_line_error(capsys)
    assert f"could not write checkpoint {checkpoint_path(out)} after epoch 2: No space left on device" in line
    assert f"the last good checkpoint {checkpoint_path(out)} (after epoch 1) is kept" in line
    assert load_checkpoint(checkpoint_path(out))["completed_epochs"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.ckpt.pt"]


def test_write_files_as_set_renames_nothing_when_one_file_fails(tmp_path, monkeypatch):
    from dynsim import results

    (tmp_path / "a.json").write_text("old")
    (tmp_path / "a.png").write_bytes(b"old")
    real = results._write_temp

    def failing(path, write):
        if path.suffix == ".json":
            raise OSError(errno.EIO, "Input/output error")
        return real(path, write)

    monkeypatch.setattr(results, "_write_temp", failing)
    with pytest.raises(OutputError, match=r"could not write .*a\.json: Input/output error"):
        results.write_files_as_set({tmp_path / "a.json": {"x": 1}, tmp_path / "a.png": b"new"})
    assert (tmp_path / "a.json").read_text() == "old" and (tmp_path / "a.png").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.png"]


# --- item 3: no silent loss --------------------------------------------------------------------
def test_finished_result_and_unfinished_run_are_not_replaced_silently(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["run", "dssm", *FAST, "--epochs", "1", "--out", str(out)]
    assert main(argv) == 0
    first = out.read_bytes()
    capsys.readouterr()
    assert main(argv) == 2
    assert "holds a finished result; give --resume to continue it, --overwrite to replace it" in one_line_error(capsys)
    assert out.read_bytes() == first

    out.unlink()  # as if the run had been killed after its first checkpoint
    assert main(argv) == 2
    line = one_line_error(capsys)
    assert f"{checkpoint_path(out)} holds an unfinished run" in line and "(1 epoch(s) done)" in line

    assert main([*argv, "--resume", "--overwrite"]) == 2
    assert "not both" in one_line_error(capsys)
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads(out.read_text())["resumed_from_epoch"] is None


def test_overwrite_of_a_study_recomputes_its_cells(tmp_path, capsys):
    out = tmp_path / "c.json"
    argv = [*COMMANDS["study convergence"], "--out", str(out)]
    assert main(argv) == 0
    cells = list((tmp_path / "c_cells").iterdir())
    assert len(cells) == 1
    (tmp_path / "c.json").unlink()  # interrupted before the study file
    capsys.readouterr()
    assert main(argv) == 2
    assert "c_cells holds an unfinished run" in one_line_error(capsys)
    stamp = cells[0].stat().st_mtime_ns
    assert main([*argv, "--overwrite", "--images-per-epoch", "0"]) == 2  # a bad setting deletes nothing
    assert "--images-per-epoch must be" in one_line_error(capsys) and cells[0].exists()
    assert main([*argv, "--overwrite"]) == 0
    assert cells[0].stat().st_mtime_ns != stamp  # recomputed, not reused


def test_two_processes_cannot_write_one_out(tmp_path, capsys):
    out = tmp_path / "r.json"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from dynsim.outputs import OutputLock; "
         f"lock = OutputLock({str(out)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["run", "dssm", *FAST, "--epochs", "1", "--out", str(out)]) == 2
        line = one_line_error(capsys)
        assert f"--out {out} is being written by dynsim process {holder.pid}" in line
        assert not out.exists()
    finally:
        holder.kill()  # SIGKILL: the lock dies with its process
        holder.wait()
    assert main(["run", "dssm", *FAST, "--epochs", "1", "--out", str(out)]) == 0
    assert not Path(str(out) + ".lock").exists()


# --- item 5: processes and files -----------------------------------------------------------------
def test_gzip_is_read_with_a_size_limit(tmp_path):
    from dynsim.data import read_idx

    header = bytes([0, 0, 8, 3]) + np.asarray([1, 28, 28], ">u4").tobytes()
    bomb = tmp_path / "bomb-idx3-ubyte.gz"
    bomb.write_bytes(gzip.compress(header + bytes(784) + bytes(64 << 20), mtime=0))  # ~65 KB -> 64 MiB
    assert bomb.stat().st_size < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="decompresses to more than the 800 bytes its header says"):
            read_idx(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20  # never inflated to 64 MiB


def test_idx_file_with_no_images_is_refused(tmp_path):
    from dynsim.data import load_idx_dataset, write_idx

    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(0, np.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(2, np.uint8))
    with pytest.raises(DataError, match="holds 0 images"):
        load_idx_dataset("mnist", tmp_path)


def test_temp_files_of_a_killed_write_are_removed(tmp_path):
    from dynsim.results import write_json_atomic

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".r.json.{dead.pid}.abc123.tmp"
    stale.write_text("half a result")
    live = tmp_path / f".r.json.{os.getpid()}.def456.tmp"  # a write in progress in a live process
    live.write_text("being written")
    write_json_atomic(tmp_path / "r.json", {"a": 1})
    assert not stale.exists() and live.exists()
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}


def test_foreign_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "r.json"

    class Payload:
        def __reduce__(self):
            return (print, ("this would run",))

    torch.save({"format": 1, "x": Payload()}, checkpoint_path(out))
    assert main(["run", "dssm", *FAST, "--epochs", "1", "--out", str(out), "--resume"]) == 2
    line = one_line_error(capsys)
    assert "is not a readable dynsim checkpoint" in line and "weights_only" not in line


def test_result_files_are_group_readable(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "r.json"
        assert main(["run", "dssm", *FAST, "--epochs", "1", "--out", str(out)]) == 0
    finally:
        os.umask(old)
    for name in ("r.json", "r_accuracy.png", "r_iterations.png", "r.ckpt.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_bad_settings_are_reported_before_the_output_is_touched(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["run", "dssm", *FAST, "--epochs", "1", "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv, "--overwrite", "--nps", "0"]) == 2
    assert "--nps must be" in one_line_error(capsys)  # the setting, not "holds a finished result"
    assert checkpoint_path(out).exists() and out.exists()  # --overwrite deleted nothing
