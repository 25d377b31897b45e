"""study repro: the report's settings as cells, summaries with standard errors, both figures."""

from __future__ import annotations

import numpy as np
import pytest

from dynsim.cli import main
from dynsim.errors import ConfigError
from dynsim.studies.repro import ReproConfig, run_repro


def test_cells_follow_the_report():
    cells = ReproConfig(seeds=[0]).cells()
    names = [c["setting"] for c in cells]
    assert names.count("T=1e-2") == 2  # the report ran seeds 0 and 1
    assert len(cells) == 8
    cfg = {c["setting"]: c["config"] for c in cells}
    assert all(c["solver"] == "euler" and c["epochs"] == 120 and c["eval_every"] == 15 for c in cfg.values())
    assert cfg["cap 1, stream 1"]["stream_every"] == 1 and cfg["cap 1, stream 1"]["stream_carry"] == "r"
    assert cfg["T=1e-2, batch 100"]["batch_size"] == 100
    assert cfg["T=1e-4"]["eval_solver"] == "newton" and "eval_solver" not in cfg["cap 10"]
    with pytest.raises(ConfigError, match="unknown repro setting"):
        ReproConfig(settings=["T=1e-3"]).cells()


def test_small_repro_writes_summary_and_figures(tmp_path):
    config = ReproConfig(data="digits", epochs=2, images_per_epoch=50, eval_every=1, eval_train_size=300,
                         eval_test_size=200, readout="ridge", settings=["T=1e-2", "cap 1, stream 1"],
                         workers=1, out=str(tmp_path / "repro"), progress=False)
    study = run_repro(config)
    s = study["settings"]["T=1e-2"]
    finals = s["final_per_seed"]
    assert s["seeds"] == [0, 1] and s["final_mean"] == pytest.approx(np.mean(finals))
    assert s["final_sem"] == pytest.approx(np.std(finals, ddof=1) / np.sqrt(2))
    cells = {c["setting"]: c for c in study["cells"] if c["seed"] == 0}
    assert len(cells["T=1e-2"]["iterations_per_input"]) == 100  # kept for Figure 2
    assert cells["cap 1, stream 1"]["mean_iterations_per_epoch"] == [1.0, 1.0]
    for key in ("result", "figure1", "figure2"):
        assert (tmp_path / "repro" / study["files"][key].split("/")[-1]).stat().st_size > 0


def test_cli_refuses_bad_values_before_work(tmp_path, capsys):
    assert main(["study", "repro", "--epochs", "0", "--out", str(tmp_path / "r")]) == 2
    assert "--epochs must be an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["study", "repro", "--seeds", "a", "--out", str(tmp_path / "r")]) == 2
    assert "--seeds must be integers" in capsys.readouterr().err
