"""``dynsim study deep``: the grid, the seed summary (mean ± s.e.), the table and the CLI."""

from __future__ import annotations

import math

import pytest

from dynsim.cli import main
from dynsim.errors import ConfigError
from dynsim.studies.deep import DeepStudyConfig, mean_se, summarise, table


def test_cells_cover_the_grid_with_per_layer_structure():
    cfg = DeepStudyConfig(layers=[1, 3], streams=[None, 10], caps=[10], seeds=[0, 1], gamma=0.1,
                          mult_factors=[1.0, 5.0, 7.0])
    cells = cfg.cells()
    assert len(cells) == 2 * 2 * 1 * 2
    one = next(c for c in cells if c["layers"] == 1)
    three = next(c for c in cells if c["layers"] == 3)
    assert (one["gamma"], one["mult_factors"], one["stride"]) == (0.0, 1.0, None)
    assert three["nps"] == [4, 4, 4] and three["stride"] == [None, 1, 1] and three["radius"] == [None, 2.0, 2.0]
    assert three["mult_factors"] == [1.0, 5.0, 7.0] and three["gamma"] == 0.1
    assert {c["stream_every"] for c in cells} == {None, 10} and {c["seed"] for c in cells} == {0, 1}


def test_factor_lists_must_cover_the_deepest_network():
    with pytest.raises(ConfigError, match="one value per layer of the deepest network"):
        DeepStudyConfig(layers=[2, 3], gains=[1.0, 0.5]).cells()


def test_mean_se_closed_form():
    m, se = mean_se([0.80, 0.82, 0.84])
    assert m == pytest.approx(0.82)
    assert se == pytest.approx(0.02 / math.sqrt(3))  # sd 0.02, n 3
    assert mean_se([0.5]) == (0.5, None)


def _cell(layers, seed, accs, raw=0.777, act=None):
    return {"cell": {"layers": layers, "stream_every": None, "max_steps": 3000, "seed": seed},
            "solver": "block", "layer_test_accuracy": accs, "raw_pixel_accuracy": raw,
            "mean_iterations": 4.0, "layer_mean_abs_rate": act}


def test_summarise_groups_seeds_and_table_prints_mean_pm_se():
    rows = summarise([_cell(2, 0, [0.80, 0.70], act=[0.3, 0.9]), _cell(2, 1, [0.82, 0.74], act=[0.5, 0.7]),
                      _cell(1, 0, [0.81])])
    assert [r["layers"] for r in rows] == [1, 2]
    two = rows[1]
    assert two["layer_accuracy"] == pytest.approx([0.81, 0.72])
    assert two["layer_accuracy_se"] == pytest.approx([0.01, 0.02])
    assert two["layer_mean_abs_rate"] == pytest.approx([0.4, 0.8])
    text = table(rows)
    assert "| 2 | reset | 3000 | block | 2 | 81.00 ± 1.00 | 72.00 ± 2.00 | 77.70 | 0.40, 0.80 | 4.0 |" in text
    assert "| 1 | reset | 3000 | block | 1 | 81.00 | – |" in text


def test_cli_rejects_bad_settings_before_running(tmp_path, capsys):
    code = main(["study", "deep", "--data", "digits", "--layers", "2", "--gains", "1,-1", "--epochs", "1",
                 "--out", str(tmp_path / "d.json")])
    assert code == 2
    assert "--gains: each value must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "d_cells").exists()


def test_study_runs_end_to_end_and_resumes_per_cell(tmp_path, capsys):
    import json

    argv = ["study", "deep", "--data", "digits", "--layers", "1,2", "--streams", "off", "--caps", "3000",
            "--seeds", "0", "--epochs", "1", "--images-per-epoch", "50", "--workers", "1", "--no-progress",
            "--out", str(tmp_path / "deep.json")]
    assert main(argv) == 0
    study = json.loads((tmp_path / "deep.json").read_text())
    assert (tmp_path / "deep.png").exists() and len(list((tmp_path / "deep_cells").glob("cell-*.json"))) == 2
    two = next(c for c in study["cells"] if c["cell"]["layers"] == 2)
    assert two["solver"] == "block,inner_tol=0.0001" and len(two["layer_test_accuracy"]) == 2
    assert len(two["layer_mean_abs_rate"]) == 2 and all(0 < v < 1 for v in two["layer_mean_abs_rate"])
    row = next(r for r in study["rows"] if r["layers"] == 2)
    assert row["layer_accuracy"] == two["layer_test_accuracy"]
    # the output is claimed (OutputSpec): a finished study is not replaced without a flag ...
    capsys.readouterr()
    assert main(argv) == 2
    assert f"--out {tmp_path / 'deep.json'} holds a finished result; give --resume" in capsys.readouterr().err
    # ... nor are unfinished cells: --resume reads the finished cells back (identical numbers)
    (tmp_path / "deep.json").unlink()
    assert main(argv) == 2
    assert "deep_cells holds an unfinished run of --out" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0
    again = json.loads((tmp_path / "deep.json").read_text())
    assert again["rows"] == study["rows"]
    # --overwrite deletes the old cells before it runs: a lock file is gone after the run
    assert main([*argv, "--overwrite", "--layers", "1"]) == 0
    assert len(list((tmp_path / "deep_cells").glob("cell-*.json"))) == 1
    assert not (tmp_path / "deep.json.lock").exists()


def test_study_deep_is_refused_while_another_process_writes_it(tmp_path, capsys):
    from dynsim.outputs import OutputLock

    out = tmp_path / "deep.json"
    with OutputLock(out):
        code = main(["study", "deep", "--data", "digits", "--layers", "1", "--streams", "off", "--caps", "10",
                     "--seeds", "0", "--epochs", "1", "--out", str(out)])
    assert code == 2
    assert "is being written by dynsim process" in capsys.readouterr().err
    assert not (tmp_path / "deep_cells").exists()
