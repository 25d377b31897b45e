"""Results people analyse and publish (issue 19, item 9): results.load -> pandas, --format csv,
--plot-format png/pdf/svg, one colour-blind-safe style with fonts >= 8 pt and no overlapping
text, error bands over seeds, the convergence heat map."""

from __future__ import annotations

import io
import json
from itertools import combinations

import matplotlib
import pandas as pd
import pytest

from dynsim import plots
from dynsim.cli import main
from dynsim.results import load

FAST = ["--data", "digits", "--images-per-epoch", "30", "--max-steps", "100", "--eval-every", "1",
        "--eval-train-size", "150", "--eval-test-size", "60", "--no-progress"]
CONV = ["study", "convergence", "--thresholds", "1e-2,1e-4", "--caps", "5,100", "--streams", "off,10",
        "--epochs", "1", "--images-per-epoch", "20", "--eval-train-size", "150", "--eval-test-size", "60",
        "--workers", "1", "--no-progress"]


@pytest.fixture(scope="module")
def run_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r.json"
    assert main(["run", "dssm", *FAST, "--epochs", "2", "--out", str(out), "--plot-format", "png,pdf,svg"]) == 0
    return out


@pytest.fixture(scope="module")
def study_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "c.json"
    assert main([*CONV, "--out", str(out)]) == 0
    return out


def test_load_a_run_one_row_per_epoch(run_result):
    df = load(run_result)
    result = json.loads(run_result.read_text())
    assert isinstance(df, pd.DataFrame) and len(df) == 2
    assert list(df["epoch"]) == [0, 1] and list(df["images_seen"]) == [30, 60]
    assert list(df["test_accuracy"]) == [h["test_accuracy"] for h in result["history"]]
    assert (df["seed"] == 0).all() and (df["data"] == "digits").all() and (df["nps"] == 4).all()


def test_load_a_study_and_a_folder(study_result):
    df = load(study_result)
    assert len(df) == 8  # 2 T x 2 caps x 2 streaming settings
    assert set(zip(df["threshold"], df["max_steps"], strict=True)) == {(1e-2, 5), (1e-2, 100), (1e-4, 5), (1e-4, 100)}
    assert df["test_accuracy"].between(0, 1).all()
    cells = load(study_result.parent / "c_cells")  # the per-cell files of the sweep
    assert len(cells) == 8 and "file" in cells
    assert sorted(cells["test_accuracy"]) == sorted(df["test_accuracy"])


def test_load_several_seeds_one_block_per_seed(run_result):
    one = json.loads(run_result.read_text())
    two = {**one, "config": {**one["config"], "seed": 1}}
    df = load_dict({"command": "run dssm", "seeds": [one, two]})
    assert list(df["seed"]) == [0, 0, 1, 1]


def load_dict(result):
    from dynsim.results import table

    return table(result)


def test_format_csv_prints_only_the_table(study_result, capsys):
    assert main([*CONV, "--out", str(study_result), "--resume", "--format", "csv"]) == 0
    captured = capsys.readouterr()
    df = pd.read_csv(io.StringIO(captured.out))
    assert len(df) == 8 and {"threshold", "max_steps", "stream_every", "test_accuracy"} <= set(df.columns)


def test_plot_formats(run_result):
    files = json.loads(run_result.read_text())["files"]
    assert files["accuracy_plot"].endswith("_accuracy.png")
    heads = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<?xml"}
    for key in ("accuracy_plot", "iterations_plot"):
        for fmt, head in heads.items():
            path = files[key] if fmt == "png" else files[f"{key}_{fmt}"]
            assert path.endswith(f".{fmt}") and open(path, "rb").read(5).startswith(head)


def test_bad_plot_format_is_refused(tmp_path, capsys):
    assert main(["run", "dssm", *FAST, "--epochs", "1", "--out", str(tmp_path / "r.json"), "--plot-format", "jpg"]) == 2
    assert "--plot-format jpg: choose one or more of png, pdf, svg" in capsys.readouterr().err


def _figures(run_path, study_path):
    run = json.loads(run_path.read_text())
    study = json.loads(study_path.read_text())
    bench = {"config": {"threshold": 1e-4, "batch_size": 1}, "data": {"name": "digits", "n_inputs": 3},
             "states": {s: {"rows": [{"solver": spec, "ms_per_input": 1.0 + i, "evals_per_input": 10.0 * (i + 1),
                                      "distance_max": 1e-3 / (i + 1), "fraction_settled": 1.0 - 0.5 * (i == 2)}
                                     for i, spec in enumerate(("euler,schedule=seed", "newton", "anderson,beta=0.5",
                                                               "dopri5,rtol=1e-5"))]}
                        for s in ("init", "trained")}}
    from dynsim.studies.ssl import plot_study
    from dynsim.studies.trajectories import TrajectoryConfig, run_trajectories

    traj = run_trajectories(TrajectoryConfig(solvers=("euler", "rk4,schedule=constant:1.0", "anderson,beta=0.5"),
                                             inputs=(0, 1), progress=False))
    ssl_rows = [{"learning": learning, "update": update, "accuracy": 80.0 + i, "published": 70.0 - i}
                for i, (learning, update) in enumerate([("E2E", "BP"), ("E2E", "RF"), ("GLL", "URF"),
                                                        ("RLL", "DTP"), ("random encoder", "")])]
    return {
        "trajectories": plots.plot_trajectories(traj),
        "ssl_study": plot_study(ssl_rows),
        "accuracy": plots.plot_accuracy(run),
        "iterations": plots.plot_iterations(run),
        "conv_accuracy": plots.plot_convergence_accuracy(study),
        "conv_heatmap": plots.plot_convergence_heatmap(study),
        "conv_iterations": plots.plot_convergence_iterations(study),
        "conv_pareto": plots.plot_convergence_pareto(study),
        "bench": plots.plot_solver_pareto(bench),
    }


def _texts(fig):
    """Every text the renderer actually draws (tick labels outside the view are not), with its box."""
    drawn = []
    original = matplotlib.text.Text.draw

    def record(self, renderer):
        if self.get_visible() and self.get_text().strip():
            drawn.append(self)
        return original(self, renderer)

    matplotlib.text.Text.draw = record
    try:
        fig.canvas.draw()
    finally:
        matplotlib.text.Text.draw = original
    renderer = fig.canvas.get_renderer()
    return [(t, t.get_window_extent(renderer)) for t in drawn]


def test_every_figure_fonts_at_least_8pt_and_no_overlapping_text(run_result, study_result):
    for name, fig in _figures(run_result, study_result).items():
        texts = _texts(fig)
        assert texts, name
        small = [(t.get_text(), t.get_fontsize()) for t, _ in texts if t.get_fontsize() < plots.MIN_FONT_PT]
        assert small == [], (name, small)
        overlaps = [(a.get_text(), b.get_text()) for (a, ba), (b, bb) in combinations(texts, 2)
                    if ba.overlaps(bb) and ba.width * bb.width > 0 and not _same_legend(a, b)]
        assert overlaps == [], (name, overlaps[:5])
        matplotlib.pyplot.close(fig)


def _same_legend(a, b):
    return False


def test_colour_blind_safe_palette(run_result):
    fig = plots.plot_accuracy(json.loads(run_result.read_text()))
    line = fig.axes[0].get_lines()[0]
    assert matplotlib.colors.to_hex(line.get_color()) == plots.OKABE_ITO[0].lower()
    matplotlib.pyplot.close(fig)


def test_error_band_over_seeds(run_result):
    one = json.loads(run_result.read_text())
    two = json.loads(run_result.read_text())
    for h in two["history"]:
        h["test_accuracy"] = h["test_accuracy"] - 0.1
    fig = plots.plot_accuracy([one, two])
    ax = fig.axes[0]
    mean = ax.get_lines()[0].get_ydata()
    expected = [100 * (h["test_accuracy"] - 0.05) for h in one["history"]]
    assert list(mean) == pytest.approx(expected)
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    # standard error of two values 0.1 apart: 0.1 / 2 -> 5 points either side of the mean
    assert band.max() - band.min() >= 10 - 1e-6
    assert "mean ± SE, 2 seeds" in ax.get_legend().get_texts()[0].get_text()
    matplotlib.pyplot.close(fig)


def test_convergence_heat_map(study_result):
    study = json.loads(study_result.read_text())
    fig = plots.plot_convergence_heatmap(study)
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert [ax.get_title() for ax in panels] == ["streaming off", "streaming every 10 steps"]
    grid = panels[0].get_images()[0].get_array()
    assert grid.shape == (2, 2)  # T x cap
    acc = {(c["cell"]["threshold"], c["cell"]["max_steps"]): 100 * c["final"]["test_accuracy"]
           for c in study["cells"] if not c["cell"]["stream_every"]}
    assert grid[0, 0] == pytest.approx(acc[(1e-2, 5)]) and grid[1, 1] == pytest.approx(acc[(1e-4, 100)])
    matplotlib.pyplot.close(fig)
    assert json.loads(study_result.read_text())["files"]["heatmap_plot"].endswith("_heatmap.png")
