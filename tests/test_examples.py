"""The scripts in examples/ run (small settings) and give the numbers they promise."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, **kwargs):
    return runpy.run_path(str(EXAMPLES / f"{name}.py"))["main"](quick=True, **kwargs)


def test_every_example_is_tested():
    tested = {"own_system", "plasticity_callback", "studies", "ssl_local_rule", "ray_sweep"}
    assert {p.stem for p in EXAMPLES.glob("*.py")} == tested


def test_own_system_settles_to_the_closed_form_fixed_point():
    out = run_example("own_system")
    for solver in out.values():
        assert solver["status"] == ["SETTLED"] * 8
        assert solver["max_relative_error"] < 1e-4
    assert max(out["anderson"]["steps"]) < min(out["euler dt=0.5"]["steps"])


def test_plasticity_callback_learns_the_first_principal_component():
    out = run_example("plasticity_callback")
    assert out["cosine"] > 0.99
    assert out["norm"] == pytest.approx(1.0, abs=0.05)  # Oja's rule normalises w


def test_three_studies_from_python(tmp_path):
    tables = run_example("studies", out=str(tmp_path))
    bench = tables["bench"]
    assert list(bench["solver"]) == ["euler,schedule=seed", "newton", "anderson,beta=0.5,memory=5"]
    assert (bench["fraction_settled"] == 1.0).all()
    newton = bench.set_index("solver").loc["newton", "evals_per_input"]
    assert newton < bench.set_index("solver").loc["euler,schedule=seed", "evals_per_input"]
    assert set(tables["trajectories"]["status"]) == {"SETTLED"}
    conv = tables["convergence"]
    assert sorted(zip(conv["threshold"], conv["max_steps"], strict=True)) == [(1e-4, 1), (1e-4, 100), (1e-2, 1),
                                                                               (1e-2, 100)]
    assert conv["test_accuracy"].between(0.1, 1.0).all()
    for name in ("bench.json", "trajectories.json", "convergence.json", "convergence_heatmap.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_ssl_with_a_local_rule():
    final = run_example("ssl_local_rule")
    assert 0.3 < final["test_accuracy"] <= 1.0  # 10 classes: chance is 0.1
    assert final["random_encoder_accuracy"] is not None and final["images_seen"] > 0


def test_sweep_runs_on_the_local_backend_by_default(tmp_path):
    rows = run_example("ray_sweep", out=str(tmp_path))
    assert [(r["solver"], r["threshold"]) for r in rows] == [("euler", 1e-2), ("euler", 1e-4), ("newton", 1e-2),
                                                             ("newton", 1e-4)]
    assert all(r["settled"] == 1.0 for r in rows)
    steps = {(r["solver"], r["threshold"]): r["mean_steps"] for r in rows}
    assert steps[("euler", 1e-4)] > steps[("euler", 1e-2)] >= steps[("newton", 1e-2)]
    assert len(list(tmp_path.glob("cell-*.json"))) == 4  # one saved result per cell: resumable
    again = run_example("ray_sweep", out=str(tmp_path))  # read back, not recomputed
    assert again == rows
