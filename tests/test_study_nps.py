"""``dynsim study nps`` (issue 15): cells, summary (mean ± s.e.), table, CLI errors, a tiny end-to-end run."""

from __future__ import annotations

import json
import math

import pytest

from dynsim.cli import main
from dynsim.errors import ConfigError
from dynsim.studies.nps import PUBLISHED_MNIST_ERROR, NpsStudyConfig, summarise, table


def test_cells_are_nps_by_seed_smallest_first_with_one_readout_after_training():
    cells = NpsStudyConfig(nps=[16, 4], seeds=[0, 1], epochs=15).cells()
    assert [(c["nps"], c["seed"]) for c in cells] == [(4, 0), (4, 1), (16, 0), (16, 1)]
    assert all(c["eval_every"] == 15 and c["epochs"] == 15 and c["solver"] == "auto" for c in cells)


@pytest.mark.parametrize("nps,message", [([4, 0], "integers >= 1"), ([4, 4], "lists a value twice"),
                                         ([], "at least one")])
def test_bad_nps_lists_are_refused(nps, message):
    with pytest.raises(ConfigError, match=message):
        NpsStudyConfig(nps=nps).cells()


def _cell(nps, seed, acc, raw=0.84):
    return {"nps": nps, "seed": seed, "solver": "newton", "test_accuracy": acc, "raw_pixel_accuracy": raw,
            "mean_iterations": 3.0, "wall_seconds": 10.0 * nps, "train_seconds": 5.0, "eval_seconds": 4.0,
            "peak_rss_gib": 0.1 * nps + seed}


def test_summary_is_mean_and_standard_error_over_seeds():
    rows = summarise([_cell(8, 0, 0.80), _cell(4, 0, 0.70), _cell(8, 1, 0.84), _cell(8, 2, 0.88)])
    assert [r["nps"] for r in rows] == [4, 8]
    four, eight = rows
    assert four["test_accuracy"] == pytest.approx(0.70) and four["test_accuracy_se"] is None  # one seed
    assert eight["test_accuracy"] == pytest.approx(0.84)
    assert eight["test_accuracy_se"] == pytest.approx(0.04 / math.sqrt(3))  # sd 0.04 (ddof 1) / √3
    assert eight["peak_rss_gib"] == pytest.approx(2.8)  # the largest of the seeds
    assert four["published_mnist_error"] == 3.87 and eight["published_mnist_error"] == 2.41
    text = table(rows, "fashion-mnist")
    assert "| 4 | 1 | newton | 70.00 (one seed) | 84.00 |" in text
    assert "| 8 | 3 | newton | 84.00 ± 2.31 |" in text and text.rstrip().endswith("| 2.41 |")
    assert "fashion-mnist test acc. %" in text and "published MNIST error %" in text
    assert "| eval s | readout s | cell s |" in text and "| 3.0 | 5 | 4 | – | 80 |" in text  # none kept: –
    rows = summarise([{**_cell(8, 0, 0.8), "readout_seconds": 3.0}, {**_cell(8, 1, 0.8), "readout_seconds": 2.0}])
    assert rows[0]["readout_seconds"] == pytest.approx(2.5) and rows[0]["readout_seconds_cells"] == 2


def test_published_numbers_are_obeid_et_al():
    assert PUBLISHED_MNIST_ERROR == {4: 3.87, 8: 2.41, 16: 1.73, 32: 1.60, 64: 1.47, 100: 1.40}


def test_cli_rejects_bad_settings_before_running(tmp_path, capsys):
    code = main(["study", "nps", "--data", "digits", "--nps", "2,x", "--out", str(tmp_path / "n")])
    assert code == 2
    assert "--nps '2,x': 'x' is not an integer; each value must be an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()
    code = main(["study", "nps", "--data", "digits", "--epochs", "0", "--out", str(tmp_path / "n")])
    assert code == 2 and "--epochs must be" in capsys.readouterr().err


def test_study_runs_end_to_end_and_resumes_per_cell(tmp_path):
    argv = ["study", "nps", "--data", "digits", "--nps", "2,3", "--seeds", "0", "--epochs", "1",
            "--images-per-epoch", "30", "--eval-train-size", "200", "--eval-test-size", "100", "--workers", "1",
            "--no-progress", "--out", str(tmp_path / "nps")]
    assert main(argv) == 0
    study = json.loads((tmp_path / "nps" / "nps.json").read_text())
    assert (tmp_path / "nps" / "nps.png").exists()
    files = sorted((tmp_path / "nps" / "cells").glob("cell-*.json"))
    assert len(files) == 3  # two (NpS, seed) cells and the raw-pixel baseline's
    saved = [json.loads(f.read_text())["result"] for f in files]
    assert sorted(r.get("kind", "dssm") for r in saved) == ["dssm", "dssm", "raw_pixels"]
    assert all(r["raw_pixel_accuracy"] is None for r in saved if "kind" not in r)  # not recomputed per cell
    (raw,) = study["raw_pixel_cells"]
    assert raw["seed"] == 0 and all(c["raw_pixel_accuracy"] == raw["raw_pixel_accuracy"] for c in study["cells"])
    assert [r["nps"] for r in study["rows"]] == [2, 3] and study["data"] == "digits"
    for row, cell in zip(study["rows"], sorted(study["cells"], key=lambda c: c["nps"]), strict=True):
        assert row["test_accuracy"] == cell["test_accuracy"] and row["test_accuracy_se"] is None
        assert cell["neurons"] == 16 * cell["nps"] and cell["solver"] == "newton"  # 4×4 sites on 8×8 digits
        assert 0.5 < cell["test_accuracy"] <= 1 and 0.5 < cell["raw_pixel_accuracy"] <= 1
        assert cell["wall_seconds"] >= cell["train_seconds"] > 0 and cell["peak_rss_gib"] > 0
        assert cell["eval_seconds"] > cell["readout_seconds"] > 0  # settling + the readout's fit
    assert study["published"]["data"] == "mnist" and study["published"]["test_error_percent"]["100"] == 1.40
    # finished: refused without --resume; with it, the cells are read back and give the same rows
    assert main(argv) == 2
    assert main([*argv, "--resume"]) == 0
    again = json.loads((tmp_path / "nps" / "nps.json").read_text())
    assert again["rows"] == study["rows"]


def test_raw_pixel_baseline_is_one_cell_unless_the_readout_sets_are_seeded():
    one = NpsStudyConfig(nps=[4, 8], seeds=[0, 1, 2]).baseline_cells()
    assert len(one) == 1 and one[0]["seed"] is None and one[0]["kind"] == "raw_pixels"
    per_seed = NpsStudyConfig(nps=[4], seeds=[0, 1], eval_test_size=500).baseline_cells()
    assert [c["seed"] for c in per_seed] == [0, 1] and per_seed[0]["eval_test_size"] == 500
    via_set = NpsStudyConfig(nps=[4], seeds=[3], base={"eval_train_size": 100}).baseline_cells()
    assert [c["seed"] for c in via_set] == [3] and via_set[0]["eval_train_size"] == 100


def test_raw_pixel_cell_is_run_dssms_own_baseline():
    """The study's baseline cell reads out the same sets as ``run dssm`` would: the same accuracy."""
    from dynsim.pipelines.dssm import DSSMConfig, run_dssm
    from dynsim.studies.nps import attach_baseline, raw_pixel_cell

    study = NpsStudyConfig(data="digits", nps=[2], seeds=[1], epochs=1, images_per_epoch=10,
                           eval_train_size=300, eval_test_size=200)
    (base,) = study.baseline_cells()
    (cell,) = study.cells()
    own = run_dssm(DSSMConfig.from_dict({**cell, "progress": False}))["final"]["raw_pixel_accuracy"]
    got = raw_pixel_cell(base)
    assert got["raw_pixel_accuracy"] == own and 0.5 < own <= 1
    skipped = run_dssm(DSSMConfig.from_dict({**cell, "progress": False, "raw_baseline": False}))["final"]
    assert skipped["raw_pixel_accuracy"] is None and skipped["gain_over_raw"] is None
    (row,) = attach_baseline([{"seed": 1, "raw_pixel_accuracy": None}], [got])
    assert row["raw_pixel_accuracy"] == own


def test_readout_tol_set_for_the_study_reaches_its_baseline_cell():
    """``--set readout_tol=…`` applies to the raw-pixel cell as to the network cells (a cell key of
    its own); without it the baseline cell keeps its old key (no ``readout_tol`` entry)."""
    default = NpsStudyConfig(nps=[4], seeds=[0]).baseline_cells()
    tight = NpsStudyConfig(nps=[4], seeds=[0], base={"readout_tol": 1e-6}).baseline_cells()
    assert "readout_tol" not in default[0]
    assert tight == [{**default[0], "readout_tol": 1e-6}]


@pytest.mark.parametrize("threads", [None, 2])
def test_a_cell_runs_on_one_thread_unless_set(monkeypatch, threads):
    """``--set threads=N`` reaches each cell's run (it used to be overridden by 1); without it a
    cell runs on one thread (cells run side by side on --workers)."""
    import dynsim.pipelines.dssm as dssm
    from dynsim.studies import deep, nps

    seen = []

    def fake_run(config):
        seen.append(config.threads)
        raise RuntimeError("stop here")

    monkeypatch.setattr(dssm, "run_dssm", fake_run)
    base = {} if threads is None else {"threads": threads}
    cell = NpsStudyConfig(data="digits", nps=[4], seeds=[0], epochs=1, base=base).cells()[0]
    with pytest.raises(RuntimeError, match="stop here"):
        nps.train_cell(cell)
    with pytest.raises(RuntimeError, match="stop here"):
        deep.train_cell({**cell, "layers": 1})
    assert seen == [threads or 1] * 2
