"""``dynsim study deep``: the grid, the raw-pixel baseline cell(s), the seed summary (mean ± s.e.),
the table and the CLI."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    files = sorted((tmp_path / "deep_cells").glob("cell-*.json"))
    assert (tmp_path / "deep.png").exists() and len(files) == 3  # two network cells and the raw-pixel cell
    saved = [json.loads(f.read_text())["result"] for f in files]
    assert sorted(r.get("kind", "net") for r in saved) == ["net", "net", "raw_pixels"]
    assert [r["raw_pixel_accuracy"] for r in saved if "kind" not in r] == [None, None]  # not recomputed per cell
    (raw,) = study["raw_pixel_cells"]
    assert raw["seed"] is None and 0.5 < raw["raw_pixel_accuracy"] <= 1
    assert [c["raw_pixel_accuracy"] for c in study["cells"]] == [raw["raw_pixel_accuracy"]] * 2
    assert [r["raw_pixel_accuracy"] for r in study["rows"]] == [raw["raw_pixel_accuracy"]] * 2
    assert f"| {100 * raw['raw_pixel_accuracy']:.2f} |" in study["table"]
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
    assert len(list((tmp_path / "deep_cells").glob("cell-*.json"))) == 2  # one network cell, the raw-pixel cell
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


# --- the raw-pixel baseline: one cell per study ----------------------------------------------

RAW = 0.777  # a fake baseline accuracy, to follow it from its cell into every row


def _fake_grid(calls):
    """A stand-in for :func:`dynsim.sweeps.run_grid` that records the cells and returns results as
    the cells would: the baseline's accuracy (RAW, + 0.01 per seed), network cells without one."""

    def run_grid(cells, fn, **kwargs):
        calls.append((cells, fn))
        return [{"kind": "raw_pixels", "cell": c, "seed": c["seed"],
                 "raw_pixel_accuracy": RAW + 0.01 * (c["seed"] or 0)} if c.get("kind") == "raw_pixels"
                else {**_cell(c["layers"], c["seed"], [0.8] * c["layers"], raw=None), "cell": c} for c in cells]

    return run_grid


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layers=st.lists(st.integers(1, 3), min_size=1, max_size=3, unique=True),
       streams=st.lists(st.sampled_from([None, 1, 10]), min_size=1, max_size=3, unique=True),
       caps=st.lists(st.sampled_from([None, 1, 10, 3000]), min_size=1, max_size=3, unique=True),
       seeds=st.lists(st.integers(0, 9), min_size=1, max_size=3, unique=True))
def test_any_grid_has_exactly_one_raw_pixel_cell_and_every_cell_takes_its_accuracy(
        layers, streams, caps, seeds, monkeypatch):
    from dynsim.studies import deep

    calls = []
    monkeypatch.setattr("dynsim.sweeps.run_grid", _fake_grid(calls))
    study = deep.run_deep_study(DeepStudyConfig(layers=layers, streams=streams, caps=caps, seeds=seeds,
                                                progress=False))
    ((grid, fn),) = calls
    raw = [c for c in grid if c.get("kind") == "raw_pixels"]
    assert raw == [{"kind": "raw_pixels", "data": "fashion-mnist", "data_dir": None, "readout": "svc",
                    "eval_train_size": None, "eval_test_size": None, "seed": None}]
    assert len(grid) == 1 + len(layers) * len(streams) * len(caps) * len(seeds) and fn is deep.run_cell
    assert [c["raw_pixel_accuracy"] for c in study["cells"]] == [RAW] * (len(grid) - 1)
    assert {r["raw_pixel_accuracy"] for r in study["rows"]} == {RAW}
    assert study["raw_pixel_cells"][0]["raw_pixel_accuracy"] == RAW
    assert all(line.count(" | 77.70 | ") == 1 for line in study["table"].splitlines()[2:])


def test_seeded_readout_subsets_give_one_baseline_per_seed_matched_by_seed(monkeypatch):
    from dynsim.studies import deep

    calls = []
    monkeypatch.setattr("dynsim.sweeps.run_grid", _fake_grid(calls))
    cfg = DeepStudyConfig(layers=[1, 2], streams=[None], caps=[10], seeds=[0, 3], eval_test_size=500, progress=False)
    study = deep.run_deep_study(cfg)
    raw = [c for c in calls[0][0] if c.get("kind") == "raw_pixels"]
    assert [(c["seed"], c["eval_train_size"], c["eval_test_size"]) for c in raw] == [(0, None, 500), (3, None, 500)]
    got = {(c["cell"]["layers"], c["cell"]["seed"]): c["raw_pixel_accuracy"] for c in study["cells"]}
    assert got == {(1, 0): RAW, (1, 3): pytest.approx(RAW + 0.03), (2, 0): RAW, (2, 3): pytest.approx(RAW + 0.03)}
    # --set overrides the readout sets of every cell, so of the baseline's too
    via_set = DeepStudyConfig(seeds=[4], base={"eval_train_size": 100, "device": "cpu"}).baseline_cells()
    assert [(c["seed"], c["eval_train_size"], c["device"]) for c in via_set] == [(4, 100, "cpu")]


def test_network_cells_keep_their_keys_so_old_cell_files_are_still_found():
    """The cell dict names the cell's file (sha1 of its JSON): these keys are those of the cells
    written before the baseline became a cell of its own."""
    from dynsim.sweeps import cell_key

    cells = DeepStudyConfig(data="digits", layers=[1, 2], streams=[None], caps=[3000], seeds=[0], epochs=1,
                            images_per_epoch=50).cells()
    assert [cell_key(c) for c in cells] == ["176d6e2d661129c2", "62b943a36b8008dc"]
    assert all("raw_baseline" not in c and "kind" not in c for c in cells)


def test_resume_reuses_an_old_cell_file_that_computed_its_own_baseline(tmp_path):
    """A cell file written by the old study (raw pixels computed inside the cell) is read back by
    ``--resume`` (not recomputed) and keeps its own baseline; only the baseline cell runs."""
    import json

    from dynsim._version import __version__
    from dynsim.builders import prepare_data, readout_sets
    from dynsim.pipelines.dssm import DSSMConfig
    from dynsim.readouts import readout_accuracy
    from dynsim.sweeps import CELL_FORMAT, cell_path, config_hash

    (cell,) = DeepStudyConfig(data="digits", layers=[1], streams=[None], caps=[3000], seeds=[0], epochs=1,
                              images_per_epoch=50).cells()
    old = {**_cell(1, 0, [0.123], raw=0.456), "cell": cell}
    path = cell_path(tmp_path / "deep_cells", cell)
    path.parent.mkdir()
    path.write_text(json.dumps({"format": CELL_FORMAT, "dynsim_version": __version__,
                                "config_hash": config_hash(cell), "cell": cell, "status": "done",
                                "seconds": 1.0, "result": old}))
    argv = ["study", "deep", "--data", "digits", "--layers", "1", "--streams", "off", "--caps", "3000",
            "--seeds", "0", "--epochs", "1", "--images-per-epoch", "50", "--workers", "1", "--no-progress",
            "--out", str(tmp_path / "deep.json"), "--resume"]
    assert main(argv) == 0
    study = json.loads((tmp_path / "deep.json").read_text())
    (got,) = study["cells"]
    assert got["layer_test_accuracy"] == [0.123] and got["raw_pixel_accuracy"] == 0.456  # reused as it was
    (raw,) = study["raw_pixel_cells"]
    config = DSSMConfig.from_dict({**cell, "progress": False})
    xtr, ytr, xte, yte = readout_sets(config, *prepare_data(config))
    assert raw["raw_pixel_accuracy"] == readout_accuracy("svc", xtr, ytr, xte, yte)["accuracy"]  # run dssm's own
