"""The three study commands end to end on digits with tiny settings; assertions on the JSON."""

from __future__ import annotations

import json

import pytest
import torch

from dynsim.cli import main
from dynsim.errors import ConfigError
from dynsim.monitors import TrajectoryMonitor
from dynsim.pipelines.dssm import DSSMConfig
from dynsim.solvers import Anderson, Dopri5, parse_solver_spec, solver_from_spec

torch.set_num_threads(1)


def test_bench_solvers_command(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(
        [
            "bench",
            "solvers",
            "--n-inputs",
            "4",
            "--train-images",
            "20",
            "--no-progress",
            "--solvers",
            "euler,schedule=seed",
            "anderson,beta=0.5",
            "dopri5,rtol=1e-5,atol=1e-7",
            "torchdiffeq,rtol=1e-5,atol=1e-7",
            "--out",
            str(out),
            "--accuracy",
            "euler",
            "anderson,beta=0.5",
            "--accuracy-eval-train",
            "150",
            "--accuracy-eval-test",
            "60",
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert set(result["states"]) == {"init", "trained"}
    assert result["training"]["images"] == 20
    for block in result["states"].values():
        rows = {r["solver"]: r for r in block["rows"]}
        assert len(rows) == 4
        assert rows["euler,schedule=seed"]["speedup_vs_baseline"] == pytest.approx(1.0)
        for r in rows.values():
            assert r["fraction_settled"] == 1.0
            assert r["residual_max"] < 1e-4
            # T = 1e-4 on the field residual puts every solver within ~1e-3 of u*
            assert r["distance_max"] < 1e-3
            assert r["evals_per_input"] >= r["mean_steps"]
    assert [r["solver"] for r in result["accuracy"]] == ["euler", "anderson,beta=0.5"]
    euler_acc, anderson_acc = result["accuracy"]
    assert 0.5 < euler_acc["test_accuracy"] <= 1
    assert abs(euler_acc["test_accuracy"] - anderson_acc["test_accuracy"]) < 0.1
    assert anderson_acc["train_evals"] < euler_acc["train_evals"]
    assert (tmp_path / "bench_pareto.png").stat().st_size > 0
    assert "speed-up vs Euler seed" in capsys.readouterr().out


def test_plot_trajectories_command(tmp_path):
    out = tmp_path / "traj.json"
    rc = main(
        [
            "plot",
            "trajectories",
            "--inputs",
            "0,3",
            "--units",
            "3",
            "--no-progress",
            "--solvers",
            "euler",
            "anderson,beta=0.5",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert [item["index"] for item in result["inputs"]] == [0, 3]
    for item in result["inputs"]:
        assert len(item["units"]) == 3
        euler, anderson = item["runs"]
        assert euler["status"] == anderson["status"] == 1
        assert euler["steps"][0] == 0 and euler["steps"] == sorted(euler["steps"])
        assert len(euler["u"]) == len(euler["steps"]) == len(euler["residual"])
        assert euler["residual"][-1] < 1e-4
        torch.testing.assert_close(
            torch.tensor(euler["u"][-1]), torch.tensor(item["u_ref"]), atol=1e-3, rtol=0
        )
        assert anderson["n_evals"] < euler["n_evals"]
    assert (tmp_path / "traj.png").stat().st_size > 0


def test_study_convergence_command_and_resume(tmp_path, capsys):
    out = tmp_path / "conv.json"
    argv = [
        "study",
        "convergence",
        "--thresholds",
        "1e-2,1e-4",
        "--caps",
        "5,3000",
        "--streams",
        "off",
        "--epochs",
        "1",
        "--images-per-epoch",
        "30",
        "--eval-train-size",
        "150",
        "--eval-test-size",
        "60",
        "--workers",
        "1",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    study = json.loads(out.read_text())
    cells = study["cells"]
    assert [(c["cell"]["threshold"], c["cell"]["max_steps"]) for c in cells] == [
        (1e-2, 5),
        (1e-2, 3000),
        (1e-4, 5),
        (1e-4, 3000),
    ]
    for c in cells:
        assert len(c["iterations_per_input"]) == 30
        assert max(c["iterations_per_input"]) <= c["cell"]["max_steps"]
        assert 0 <= c["final"]["test_accuracy"] <= 1
        assert c["history"][0]["test_accuracy"] == c["final"]["test_accuracy"]
        assert c["train_evals"] > 0
    its = {
        (c["cell"]["threshold"], c["cell"]["max_steps"]): sum(c["iterations_per_input"])
        for c in cells
    }
    assert its[(1e-4, 3000)] > its[(1e-2, 3000)] > its[(1e-2, 5)]
    for name in ("accuracy", "heatmap", "iterations", "pareto"):
        assert (tmp_path / f"conv_{name}.png").stat().st_size > 0
    # the same command again is refused: --out holds a finished result
    capsys.readouterr()
    assert main(argv) == 2
    assert "holds a finished result; give --resume" in capsys.readouterr().err
    # resume: the cells are read back, not recomputed
    assert main([*argv, "--resume"]) == 0
    assert json.loads(out.read_text())["cells"] == cells


def test_trajectory_monitor_keeps_its_memory_budget():
    mon = TrajectoryMonitor([0, 1], max_values=60)
    mon.start(2)
    for n in range(1, 200):
        mon.on_step(None, n, torch.full((2, 5), float(n)), torch.ones(2))
    arr = mon.as_arrays()
    assert arr["u"].numel() + arr["residual"].numel() <= 60
    assert mon.stride > 1 and all(int(s) % mon.stride == 0 for s in arr["steps"])
    assert int(arr["steps"][-1]) >= 199 - mon.stride
    mon.on_step(None, 200, torch.zeros(1, 5), torch.ones(1))  # a sample stopped: trajectory over
    assert mon._rows is None


def test_solver_specs():
    assert parse_solver_spec("euler,schedule=decaying:0.2,0.005,0.05")[1]["schedule"].dt0 == 0.2
    assert isinstance(solver_from_spec("anderson,beta=0.2,memory=3"), Anderson)
    assert isinstance(solver_from_spec("dopri5,rtol=1e-5,atol=1e-7"), Dopri5)
    assert parse_solver_spec("rk4", schedule="constant:0.5")[1]["schedule"].dt == 0.5
    with pytest.raises(ConfigError, match="rtol"):
        solver_from_spec("dopri5")
    with pytest.raises(ConfigError, match="unknown solver"):
        solver_from_spec("euler2")
    assert DSSMConfig(solver="anderson,beta=0.3").validate().solver_options() == {"beta": 0.3}


def test_convergence_seed_axis_and_summary():
    from dynsim.studies.convergence import ConvergenceConfig, summarize_over_seeds

    cells = ConvergenceConfig(thresholds=[1e-2], caps=[10], streams=[None, 10], seeds=[0, 1, 2]).cells()
    assert len(cells) == 6 and sorted({c["seed"] for c in cells}) == [0, 1, 2]
    fake = [{"cell": c, "final": {"test_accuracy": 0.8 + 0.01 * c["seed"], "mean_iterations": 10.0}} for c in cells]
    rows = summarize_over_seeds(fake)
    assert len(rows) == 2
    assert rows[0]["test_accuracy_mean"] == pytest.approx(0.81)
    assert rows[0]["test_accuracy_sem"] == pytest.approx(0.01 / 3**0.5)  # sd 0.01 over 3 seeds
