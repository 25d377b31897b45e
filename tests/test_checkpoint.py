"""Checkpoints and resume: a killed run, resumed, ends exactly where an uninterrupted one does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from result_utils import without_timings

from dynsim.checkpoint import Checkpoint, checkpoint_path, get_rng_state, load_checkpoint, set_rng_state
from dynsim.cli import main
from dynsim.errors import ConfigError
from dynsim.results import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--data", "digits", "--images-per-epoch", "40", "--max-steps", "150", "--eval-every", "0",
        "--eval-train-size", "100", "--eval-test-size", "50", "--no-progress", "--checkpoint-every", "1"]


def numbers(result: dict) -> dict:
    """A result without wall-clock timings, paths and the resume marker."""
    keep = {k: v for k, v in result.items() if k in ("history", "final", "iterations_per_input", "baseline")}
    return without_timings(keep)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["modules"]["system"]


def test_checkpoint_path_beside_result():
    assert checkpoint_path("runs/a.json") == Path("runs/a.ckpt.pt")


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = get_rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]


def test_checkpoint_must_be_last():
    from dynsim.engine import Engine
    from dynsim.monitors import SettlingMonitor

    engine = Engine(lambda b, h: None, [Checkpoint("x.pt"), SettlingMonitor()], progress=False)
    with pytest.raises(ConfigError, match="last"):
        engine.fit(lambda e: [], 1)


def test_truncated_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "run.ckpt.pt"
    bad.write_bytes(b"PK\x03\x04 not a whole file")
    with pytest.raises(ConfigError, match="not a readable dynsim checkpoint"):
        load_checkpoint(bad)


def test_interrupted_run_resumes_to_the_same_numbers(tmp_path, monkeypatch, capsys):
    """In-process version of the kill test: Ctrl-C at the end of epoch 2, then --resume."""
    from dynsim.monitors import SettlingMonitor

    args = ["run", "dssm", *FAST, "--epochs", "3", "--stream-every", "50"]
    ref, out = tmp_path / "ref.json", tmp_path / "cut.json"
    assert main([*args, "--out", str(ref)]) == 0
    original = SettlingMonitor.on_epoch_end

    def interrupt(self, engine, epoch):
        original(self, engine, epoch)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(SettlingMonitor, "on_epoch_end", interrupt)
    assert main([*args, "--out", str(out)]) == 130
    assert "with --resume" in capsys.readouterr().err
    assert load_checkpoint(checkpoint_path(out))["completed_epochs"] == 1 and not out.exists()
    monkeypatch.setattr(SettlingMonitor, "on_epoch_end", original)
    assert main([*args, "--out", str(out), "--resume"]) == 0
    resumed = json.loads(out.read_text())
    assert resumed["resumed_from_epoch"] == 1
    assert numbers(resumed) == numbers(json.loads(ref.read_text()))
    w_res, w_ref = weights(checkpoint_path(out)), weights(checkpoint_path(ref))
    assert all(torch.equal(w_res[k], w_ref[k]) for k in w_ref)
    streamed = load_checkpoint(checkpoint_path(out))["engine"]["settler"]["state"]
    assert streamed is not None and streamed.shape == (1, 64)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_numbers(tmp_path):
    """The real thing: SIGKILL a run in a subprocess after its first checkpoint, resume it."""
    epochs = "8"
    ref = tmp_path / "ref.json"
    assert main(["run", "dssm", *FAST, "--epochs", epochs, "--out", str(ref)]) == 0

    out = tmp_path / "killed.json"
    ckpt = checkpoint_path(out)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dynsim", "run", "dssm", *FAST, "--epochs", epochs,
                             "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed_mid_run = proc.poll() is None
    proc.send_signal(signal.SIGKILL) if killed_mid_run else None
    proc.wait()
    assert ckpt.exists(), proc.stderr.read().decode()
    assert killed_mid_run, "the run ended before it could be killed; make it longer"
    assert not out.exists()  # no half-written (or any) result from the killed run
    done = load_checkpoint(ckpt)["completed_epochs"]
    assert 1 <= done < int(epochs)

    assert main(["run", "dssm", *FAST, "--epochs", epochs, "--out", str(out), "--resume"]) == 0
    resumed, reference = json.loads(out.read_text()), json.loads(ref.read_text())
    assert resumed["resumed_from_epoch"] >= done
    assert numbers(resumed) == numbers(reference)
    w_res, w_ref = weights(ckpt), weights(checkpoint_path(ref))
    assert w_res.keys() == w_ref.keys()
    for k in w_ref:
        assert torch.equal(w_res[k], w_ref[k]), k


def test_resume_refuses_other_settings(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["run", "dssm", *FAST, "--epochs", "1", "--out", str(out)]) == 0
    argv = ["run", "dssm", *FAST, "--epochs", "2", "--nps", "2", "--out", str(out), "--resume"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "nps=4 (now 2)" in err and "new --out" in err


def test_resume_extends_a_finished_run(tmp_path):
    out = tmp_path / "r.json"
    assert main(["run", "dssm", *FAST, "--epochs", "1", "--out", str(out)]) == 0
    assert main(["run", "dssm", *FAST, "--epochs", "2", "--out", str(out), "--resume"]) == 0
    res = json.loads(out.read_text())
    assert [h["epoch"] for h in res["history"]] == [0, 1] and res["resumed_from_epoch"] == 1


def test_resume_needs_out(capsys):
    assert main(["run", "dssm", *FAST, "--epochs", "1", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err


def test_json_write_is_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves the previous complete file and no temp file."""
    path = tmp_path / "r.json"
    write_json_atomic(path, {"a": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic(path, {"a": 2, "big": list(range(10000))})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def _toy_engine(path, seed=0):
    """A library-level training loop (no CLI): layer, settler, plasticity, monitor, checkpoint."""
    from dynsim import Euler, HebbianLayer, MaxSteps, RelativeChange
    from dynsim.builders import epoch_batches
    from dynsim.engine import DynamicsSettler, Engine
    from dynsim.monitors import SettlingMonitor
    from dynsim.plasticity import SimilarityMatchingRule

    layer = HebbianLayer((1, 4, 4), nps=2, stride=2, radius=2.0, seed=seed)
    settler = DynamicsSettler(layer, Euler(), RelativeChange(1e-4) | MaxSteps(100), stream_every=20)
    monitor = SettlingMonitor()
    ckpt = Checkpoint(path, every=2, modules={"system": layer}, meta={"seed": seed})
    engine = Engine(settler, [SimilarityMatchingRule(layer), monitor, ckpt], progress=False)
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(1))
    return engine, layer, monitor, epoch_batches(x, images=12, batch_size=2, seed=seed)


def test_engine_fit_resume_matches_straight_run(tmp_path):
    straight, layer_a, mon_a, batches = _toy_engine(tmp_path / "a.pt")
    with torch.no_grad():
        straight.fit(batches, 5)

    first, _, _, batches = _toy_engine(tmp_path / "b.pt")
    with torch.no_grad():
        first.fit(batches, 3)  # checkpoints after epochs 2 and 3 (the end)
    again, layer_b, mon_b, batches = _toy_engine(tmp_path / "b.pt")
    with torch.no_grad():
        again.fit(batches, 5, resume=True)
    assert again.history[0]["epoch"] == 0 and [h["epoch"] for h in again.history] == list(range(5))
    assert mon_a.iterations.size == 5 * 12 and again.images_seen == straight.images_seen
    assert np.array_equal(mon_b.iterations, mon_a.iterations) and np.array_equal(mon_b.status, mon_a.status)
    assert torch.equal(layer_a.ff.weight, layer_b.ff.weight)
    assert torch.equal(layer_a.lateral.weight, layer_b.lateral.weight)

    other, _, _, batches = _toy_engine(tmp_path / "b.pt", seed=1)
    with pytest.raises(ConfigError, match="seed=0 \\(now 1\\)"):
        other.fit(batches, 5, resume=True)


def test_numpy_values_in_history_survive_a_checkpoint(tmp_path):
    import numpy as np

    engine, layer, _, batches = _toy_engine(tmp_path / "n.pt")

    from dynsim.callbacks import Callback

    class LogsNumpy(Callback):
        def on_epoch_end(self, engine, epoch):
            engine.log(score=np.float32(0.5), counts=np.arange(3))

    engine.callbacks.insert(0, LogsNumpy())
    with torch.no_grad():
        engine.fit(batches, 1)
    history = load_checkpoint(tmp_path / "n.pt")["engine"]["history"]
    assert history[0]["score"] == 0.5 and history[0]["counts"].tolist() == [0, 1, 2]


def test_generator_states_resume_private_streams(tmp_path):
    """A pipeline that reshuffles with its own generator each epoch resumes the same stream."""
    from dynsim.checkpoint import GeneratorStates
    from dynsim.engine import Batch, Engine

    def run(epochs, resume):
        gen = torch.Generator().manual_seed(3)
        seen = []

        def batches(epoch):
            idx = torch.randperm(10, generator=gen)[:4]
            seen.append(idx.tolist())
            yield Batch(x=torch.zeros(4, 1), y=None, index=idx, epoch=epoch, number=0)

        engine = Engine(lambda b, h: None, [GeneratorStates(order=gen), Checkpoint(tmp_path / "g.pt")],
                        progress=False)
        engine.fit(batches, epochs, resume=resume)
        return seen

    straight = run(4, resume=False)
    (tmp_path / "g.pt").unlink()
    first = run(2, resume=False)
    rest = run(4, resume=True)
    assert first + rest == straight


def test_settling_monitor_checkpoints_per_input_arrays_as_tensors_and_reads_old_lists():
    """The per-input record is saved as two tensors (a save per epoch then costs O(inputs) copies, not a
    Python list of every input seen so far); states written as lists by older versions still load."""
    from dynsim.monitors import SettlingMonitor

    mon = SettlingMonitor()
    mon.record([3, 5, 7], [0, 0, 1])
    state = mon.state_dict()
    assert isinstance(state["iterations"], torch.Tensor) and state["iterations"].tolist() == [3, 5, 7]
    assert state["status"].tolist() == [0, 0, 1]
    mon.record([9], [0])  # the saved state is a copy, not a view of the growing buffer
    assert state["iterations"].tolist() == [3, 5, 7]
    for saved in (state, {"iterations": [3, 5, 7], "status": [0, 0, 1]}):
        other = SettlingMonitor()
        other.load_state_dict(saved)
        assert other.iterations.tolist() == [3, 5, 7] and other.status.tolist() == [0, 0, 1]


def test_resume_records_a_changed_auto_solver(tmp_path, monkeypatch):
    """A checkpoint written while `auto` resolved to another solver resumes with a warning, and the
    result records the change (``solver_changed_on_resume``); an unchanged one records None."""
    from dynsim.configs.dssm import DSSMConfig

    out = tmp_path / "r.json"
    real = DSSMConfig.resolved_solver
    monkeypatch.setattr(DSSMConfig, "resolved_solver", lambda self: "newton,picard_start=false")
    assert main(["run", "dssm", *FAST, "--epochs", "1", "--out", str(out)]) == 0
    monkeypatch.setattr(DSSMConfig, "resolved_solver", real)
    changed = "ran as 'newton,picard_start=false' before the checkpoint and runs as 'newton'"
    with pytest.warns(UserWarning, match=changed):
        assert main(["run", "dssm", *FAST, "--epochs", "2", "--out", str(out), "--resume"]) == 0
    res = json.loads(out.read_text())
    assert res["solver_changed_on_resume"] == {"checkpoint": "newton,picard_start=false", "now": "newton"}
    assert main(["run", "dssm", *FAST, "--epochs", "3", "--out", str(out), "--resume"]) == 0
    assert json.loads(out.read_text())["solver_changed_on_resume"] is None
