"""Device handling, tested on the CPU: CUDA is touched only by runs that use it, random
states restore on a machine with fewer GPUs (or none), tensors follow the run's device.

CUDA itself is faked (the calls a GPU run would make are replaced by recorders); the tests
marked ``cuda`` run only where a GPU is present (``benchmarks/gpu_check.py`` covers the rest).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynsim.checkpoint import Checkpoint, get_rng_state, load_checkpoint, set_rng_state
from dynsim.sweeps import run_grid

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _touched(*_a, **_k):
    raise AssertionError("a CPU run touched CUDA")


def test_a_cpu_run_saves_no_cuda_state_and_does_not_initialise_cuda(monkeypatch):
    """On a GPU machine a CPU run has not initialised CUDA: the checkpoint must not do it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    for name in ("get_rng_state_all", "get_rng_state", "device_count"):
        monkeypatch.setattr(torch.cuda, name, _touched)
    state = get_rng_state()
    assert "cuda" not in state and set(state) == {"torch", "numpy", "python"}


def test_a_gpu_run_saves_one_cuda_state_per_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda i: torch.full((16,), i, dtype=torch.uint8))
    state = get_rng_state()
    assert [int(s[0]) for s in state["cuda"]] == [0, 1]


def _fake_gpus(monkeypatch, n: int) -> list[int]:
    """Pretend this process uses CUDA on ``n`` GPUs; return the list of devices whose RNG was set."""
    restored: list[int] = []

    def set_state(state, device=0):
        if int(device) >= n:
            raise RuntimeError(f"CUDA error: invalid device ordinal {device}")
        restored.append(int(device))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_state)  # what set_rng_state_all calls
    return restored


def test_resume_on_a_machine_with_fewer_gpus_restores_the_first_ones(monkeypatch):
    state = {**get_rng_state(), "cuda": [torch.zeros(16, dtype=torch.uint8)] * 4}  # written on 4 GPUs
    restored = _fake_gpus(monkeypatch, 1)
    with pytest.warns(UserWarning, match="CUDA random states of 4 GPUs, this machine has 1"):
        set_rng_state(state)
    assert restored == [0]


def test_resume_of_a_gpu_checkpoint_in_a_cpu_run_leaves_cuda_alone(monkeypatch):
    torch.manual_seed(3)
    state = {**get_rng_state(), "cuda": [torch.zeros(16, dtype=torch.uint8)] * 2}
    expected = torch.rand(3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_rng_state", _touched)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", _touched)
    set_rng_state(state)
    torch.testing.assert_close(torch.rand(3), expected)  # the CPU stream is restored


def test_checkpoint_tensors_load_on_the_cpu_and_follow_the_module(tmp_path, monkeypatch):
    """``load_checkpoint`` maps every tensor to the CPU (a GPU run's file loads anywhere)."""
    seen = {}
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_load(*args, **kwargs)

    layer = torch.nn.Linear(2, 2)
    ck = Checkpoint(tmp_path / "a.ckpt.pt", modules={"system": layer})

    class _Engine:
        callbacks = [ck]
        history = [{"epoch": 0}]

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    ck.save(_Engine(), 1)
    monkeypatch.setattr(torch, "load", spy)
    ckpt = load_checkpoint(ck.path)
    assert seen["map_location"] == "cpu" and seen["weights_only"] is True
    assert all(t.device.type == "cpu" for t in ckpt["modules"]["system"].values())


def test_dtp_inverses_probe_the_encoder_on_its_own_device():
    """build_inverses passes its probe image on the encoder's device (it was a CPU tensor,
    which fails for an encoder on a GPU)."""
    from dynsim.ssl.rules import build_inverses
    from dynsim.ssl.stages import build_encoder

    encoder = build_encoder("tiny", (1, 8, 8)).to("meta")
    devices = []
    encoder.stages[0].register_forward_pre_hook(lambda mod, args: devices.append(args[0].device))
    inverses = build_inverses(encoder, (1, 8, 8))
    assert devices == [torch.device("meta")]
    assert inverses["s1"].out_shape == (16, 8, 8)


def test_the_evaluator_fits_the_readout_on_the_run_device(monkeypatch):
    from dynsim import evaluation
    from dynsim.solvers import Heun
    from dynsim.stopping import MaxSteps
    from dynsim.systems.hebbian import HebbianLayer

    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("device"))
        return {"accuracy": 0.5, "train_accuracy": 0.5, "readout_converged": True, "readout_iterations": 1,
                "test_predictions": np.zeros(6, dtype=np.int8), "weights": torch.zeros(2, 2)}

    monkeypatch.setattr(evaluation, "readout_accuracy", spy)
    layer = HebbianLayer((1, 4, 4), nps=1, stride=2, radius=1.0)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 16)).astype(np.float32), np.array([0, 1] * 3)
    ev = evaluation.Evaluator(layer, x_train=x, y_train=y, x_test=x, y_test=y, solver=Heun(), stop=MaxSteps(3),
                              every=1, epochs=1, readout="svc", device="cpu", progress=False)
    ev.evaluate()
    assert calls == ["cpu"]


_FLAG = "as imported"


def read_flag(cell: dict) -> dict:
    return {"flag": _FLAG}


def test_the_local_pool_spawns_fresh_workers(tmp_path):
    """Workers are spawned, not forked: they do not inherit the parent's state (a forked
    child of a process that has initialised CUDA cannot use CUDA)."""
    global _FLAG
    _FLAG = "changed in the parent"
    try:
        out = run_grid([{"x": 0}, {"x": 1}], read_flag, results_dir=tmp_path, workers=2, progress=False)
    finally:
        _FLAG = "as imported"
    assert out == [{"flag": "as imported"}] * 2


@cuda
def test_a_gpu_checkpoint_resumes_on_the_cpu(tmp_path):
    layer = torch.nn.Linear(3, 2).cuda()
    ck = Checkpoint(tmp_path / "g.ckpt.pt", modules={"system": layer})

    class _Engine:
        callbacks = [ck]

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    ck.save(_Engine(), 1)
    cpu_layer = torch.nn.Linear(3, 2)
    Checkpoint(ck.path, modules={"system": cpu_layer}).restore(_Engine())
    torch.testing.assert_close(cpu_layer.weight, layer.weight.cpu())


def _gpu_check():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_runs_on_the_cpu(tmp_path, capsys):
    import json

    out = tmp_path / "g.json"
    assert _gpu_check().main(["--device", "cpu", "--only", "solver:euler,solver:newton", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["check"], r["ok"]) for r in rows] == [("solver:euler", True), ("solver:newton", True)]
    assert "64/64 settled" in rows[1]["device"]["detail"] and "2/2 checks passed" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_refuses_cuda_where_there_is_none(tmp_path, capsys):
    assert _gpu_check().main(["--out", str(tmp_path / "g.json")]) == 2
    assert "CUDA is not available here; run with --device cpu" in capsys.readouterr().err
