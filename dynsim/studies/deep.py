"""``dynsim study deep``: what do deeper layers of the similarity-matching network learn?

A grid over the number of layers (Obeid, Ramambason & Pehlevan 2019, eq. 15), streaming
input (off, or the input switching every k steps without a state reset) and the step cap,
repeated over seeds. Each cell is one :func:`dynsim.pipelines.dssm.run_dssm` run (layer 1:
NpS 4 and the data set's geometry, stride 2 and radius 4 on 28×28; layers
above: NpS 4, stride 1, radius 2) and records every layer's
readout accuracy, the mean ``|r_p|`` of each layer over training (1 = saturated), iterations
to settle and per-layer residuals.
The settings of every cell are the run's own settings (``DSSMConfig``); the readout is a
setting (``readout``, by name, through :mod:`dynsim.evaluation`).

The raw-pixel baseline (the same readout on the same images' pixels) depends on neither the
network nor its seed: it is computed once per study, as its own cell
(:meth:`DeepStudyConfig.baseline_cells`, :mod:`dynsim.studies.baseline`; one per seed only when
``--eval-train-size`` / ``--eval-test-size`` subsample the readout sets), the network cells run
with ``raw_baseline = False``, and each row and cell carries its baseline's accuracy.

Cells run through :func:`dynsim.sweeps.run_grid`, each cell's result saved as it finishes,
so an interrupted study resumes. :func:`summarise` groups the seeds: mean ± standard error
(``s.e. = sd/√n``, or "one seed").
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynsim.data import DATASETS
from dynsim.errors import ConfigError
from dynsim.readouts import READOUTS
from dynsim.results import result_header
from dynsim.settings import check_settings, setting
from dynsim.studies.baseline import attach_baseline, baseline_cells, is_baseline, raw_pixel_cell
from dynsim.studies.seeds import mean_sem as mean_se  # mean and s.e. (ddof 1) over seeds
from dynsim.studies.seeds import parse_seeds


@dataclass
class DeepStudyConfig:
    """Every setting of ``dynsim study deep``. Network and training defaults are ``run dssm``'s
    (the authors': γ = 0, gains 1, mult factors 1, every layer's residual below T)."""

    data: str = setting("fashion-mnist", help="data set", choices=DATASETS)
    data_dir: str | None = setting(None, help="directory with the data files", shown_default="None")
    layers: list[int] = setting(default_factory=lambda: [1, 2, 3], item="layers", help="layer counts, comma-separated")
    streams: list[int | None] = setting(default_factory=lambda: [None, 10], item="stream_every",
                                        help="training input: 'off' (reset) or switch every k steps, comma-separated",
                                        shown_default="off,10")
    caps: list[int | None] = setting(default_factory=lambda: [10, 3000], item="max_steps",
                                     help="comma-separated step caps ('none': no cap)")
    seeds: list[int] = setting(default_factory=lambda: [0, 1, 2], parse=parse_seeds, metavar="LIST",
                               help="seeds, e.g. 0,1,2 or 0-4", shown_default="0,1,2")
    nps: int = setting(4, help="neurons per site in every layer")
    gamma: float = setting(0.0, help="feedback strength γ (0: the authors')")
    gains: list[float] | None = setting(None, item="gains", shown_default="all 1",
                                        help="g_p per layer of the deepest network (authors' tanh_factors)")
    mult_factors: list[float] | None = setting(None, item="mult_factors", shown_default="all 1",
                                               help="m_p per layer of the deepest network (authors' mult_factors)")
    threshold: float = setting(1e-4, help="field residual T")
    solver: str = setting("auto", help="solver spec", shown_default="auto = block/newton/euler")
    epochs: int = setting(120, help="epochs")
    images_per_epoch: int = setting(1000, help="training images drawn with replacement per epoch")
    eval_every: int = setting(0, help="epochs between readouts (and at the end; 0: after training only)")
    eval_train_size: int | None = setting(None, help="readout train images")
    eval_test_size: int | None = setting(None, help="readout test images")
    readout: str = setting("svc", choices=READOUTS, help="linear readout (see run dssm --help)")
    base: dict[str, Any] = field(default_factory=dict)  # --set KEY=VALUE: any other run-dssm setting, every cell
    workers: int | None = setting(None, help="worker processes")
    backend: str = setting("local", choices=("local", "ray"), help="where cells run")
    ray_address: str | None = setting(None, help="Ray cluster address (implies --backend ray)", shown_default="None")
    out: str | None = setting(None, help="study JSON (cells beside it in <out>_cells/; PNG beside it)",
                              shown_default="runs/deep-<data>-<time>.json")
    progress: bool = setting(True, help="no progress output")

    def _factors(self, name: str, n_layers: int) -> list[float] | float:
        values = getattr(self, name)
        if values is None:
            return 1.0
        if len(values) < max(self.layers):
            raise ConfigError(f"--{name.replace('_', '-')} needs one value per layer of the deepest network "
                              f"({max(self.layers)}), got {len(values)}")
        return list(values[:n_layers]) if n_layers > 1 else 1.0

    def baseline_cells(self) -> list[dict[str, Any]]:
        """The raw-pixel baseline's cells (:func:`dynsim.studies.baseline.baseline_cells`): one
        for the whole grid, or one per seed when a readout set is a seeded subsample."""
        return baseline_cells(data=self.data, data_dir=self.data_dir, readout=self.readout,
                              eval_train_size=self.eval_train_size, eval_test_size=self.eval_test_size,
                              seeds=self.seeds, base=self.base)

    def cells(self) -> list[dict[str, Any]]:
        """One dict of DSSM settings per cell: layers × streaming × cap × seed. (Its keys name the
        cell's result file, :func:`dynsim.sweeps.cell_key`: a new key makes every finished cell
        of earlier studies unreachable by ``--resume``.)"""
        if not (self.layers and self.streams and self.caps and self.seeds):
            raise ConfigError("the grid needs at least one layer count, streaming setting, cap and seed")
        bad = [n for n in self.layers if not isinstance(n, int) or n < 1]
        if bad:
            raise ConfigError(f"--layers must be integers >= 1, got {bad[0]!r}")
        out = []
        for n, stream, cap, seed in itertools.product(self.layers, self.streams, self.caps, self.seeds):
            cell = {
                "data": self.data,
                "data_dir": self.data_dir,
                "layers": n,
                "nps": [self.nps] * n if n > 1 else self.nps,
                "stride": [None] + [1] * (n - 1) if n > 1 else None,  # layer 1: the data set's default
                "radius": [None] + [2.0] * (n - 1) if n > 1 else None,
                "gamma": self.gamma if n > 1 else 0.0,
                "gains": self._factors("gains", n),
                "mult_factors": self._factors("mult_factors", n),
                "threshold": self.threshold,
                "max_steps": cap,
                "stream_every": stream,
                "solver": self.solver,
                "epochs": self.epochs,
                "images_per_epoch": self.images_per_epoch,
                "eval_every": self.eval_every,
                "eval_train_size": self.eval_train_size,
                "eval_test_size": self.eval_test_size,
                "readout": self.readout,
                "seed": seed,
                **self.base,
            }
            out.append(cell)
        return out


def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """One cell of the study's grid (top level and picklable for :func:`run_grid`): the raw-pixel
    baseline (``kind = "raw_pixels"``) or a network cell."""
    return raw_pixel_cell(cell) if is_baseline(cell) else train_cell(cell)


def train_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """Train and read out one network cell, without the raw-pixel baseline (its own cell; the
    result's ``raw_pixel_accuracy`` is None until :func:`attach_baseline`)."""
    from dynsim.pipelines.dssm import DSSMConfig, run_dssm

    config = DSSMConfig.from_dict({"threads": 1, **cell, "progress": False, "out": None, "raw_baseline": False,
                                   "on_divergence": cell.get("on_divergence", "skip")})
    result = run_dssm(config)
    final, hist = result["final"], result["history"]
    last = hist[-1] if hist else {}
    accs = final.get("layer_test_accuracy") or [final["test_accuracy"]]
    return {
        "cell": cell,
        "solver": result["system"]["solver"],
        "layer_test_accuracy": accs,
        "raw_pixel_accuracy": final.get("raw_pixel_accuracy"),
        "mean_iterations": final.get("mean_iterations"),
        "fraction_converged": final.get("fraction_converged"),
        "layer_mean_abs_rate": last.get("layer_mean_abs_rate"),
        "layer_mean_residual": last.get("layer_mean_residual"),
        "layer_mean_iterations": last.get("layer_mean_iterations"),
        "train_seconds": final.get("train_seconds"),
        "eval_seconds": final.get("eval_seconds"),
        "history": [{k: h.get(k) for k in ("epoch", "images_seen", "mean_iterations", "layer_mean_abs_rate",
                                           "layer_mean_residual", "layer_w_norm", "layer_l_norm",
                                           "layer_test_accuracy", "test_accuracy")} for h in hist],
    }


def summarise(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group finished cells by (layers, streaming, cap) over seeds: per-layer accuracy and |r|
    as mean ± s.e., raw pixels, iterations."""
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        key = (c["cell"]["layers"], c["cell"]["stream_every"], c["cell"]["max_steps"])
        groups.setdefault(key, []).append(c)
    rows = []
    for (n, stream, cap), cs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2] or 0)):
        per_layer = [mean_se([c["layer_test_accuracy"][p] for c in cs]) for p in range(n)]
        rates = [c["layer_mean_abs_rate"] for c in cs if c.get("layer_mean_abs_rate")]
        rows.append({
            "layers": n, "stream_every": stream, "cap": cap, "seeds": [c["cell"]["seed"] for c in cs],
            "solver": cs[0].get("solver"),
            "layer_accuracy": [m for m, _ in per_layer], "layer_accuracy_se": [s for _, s in per_layer],
            "raw_pixel_accuracy": mean_se([c["raw_pixel_accuracy"] for c in cs])[0],
            "layer_mean_abs_rate": [sum(r[p] for r in rates) / len(rates) for p in range(n)] if rates else None,
            "mean_iterations": mean_se([c["mean_iterations"] for c in cs])[0],
        })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`summarise`'s rows (accuracy in %, mean ± s.e. over seeds)."""
    depth = max(r["layers"] for r in rows)

    def pm(m, s):
        return f"{100 * m:.2f}" + ("" if s is None else f" ± {100 * s:.2f}")

    head = ["layers", "input", "cap", "solver", "seeds"] + [f"layer {p + 1} %" for p in range(depth)]
    head += ["raw pixels %", "mean abs(r) per layer", "steps/input"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        accs = [pm(m, s) for m, s in zip(r["layer_accuracy"], r["layer_accuracy_se"], strict=True)]
        accs += ["–"] * (depth - r["layers"])
        act = "–" if not r["layer_mean_abs_rate"] else ", ".join(f"{v:.2f}" for v in r["layer_mean_abs_rate"])
        lines.append("| " + " | ".join([
            str(r["layers"]), "reset" if not r["stream_every"] else f"stream {r['stream_every']}", str(r["cap"]),
            str(r["solver"]), str(len(r["seeds"])), *accs, f"{100 * r['raw_pixel_accuracy']:.2f}", act,
            f"{r['mean_iterations']:.1f}"]) + " |")
    return "\n".join(lines)


def cells_dir(out: str | Path) -> Path:
    """The folder of the per-cell results of a study writing ``out``: ``<stem>_cells`` beside it."""
    out = Path(out)
    return out.with_suffix("").with_name(out.stem + "_cells")


def validate(config: DeepStudyConfig) -> list[dict[str, Any]]:
    """Every cell's settings checked (``DSSMConfig.validate``), before any output is claimed or
    worker started; returns the cells."""
    from dynsim.pipelines.dssm import DSSMConfig

    check_settings(config)
    cells = config.cells()
    for cell in cells:
        DSSMConfig.from_dict({**cell, "progress": False}).validate()
    return cells


def run_deep_study(config: DeepStudyConfig) -> dict[str, Any]:
    """Run the grid (resumable per cell); write JSON + PNG if ``config.out``; return the study.

    The CLI claims ``config.out`` first (:class:`~dynsim.outputs.OutputSpec`: lock, refused if it
    holds a result or unfinished cells without ``--resume``/``--overwrite``)."""
    from dynsim.sweeps import run_grid

    cells = validate(config)
    baselines = config.baseline_cells()
    out = Path(config.out) if config.out else None
    results_dir = cells_dir(out) if out else Path("runs") / "deep_cells"
    done = run_grid(baselines + cells, run_cell, results_dir=results_dir, workers=config.workers,
                    backend=config.backend, ray_address=config.ray_address, progress=config.progress)
    raw = done[: len(baselines)]
    results = attach_baseline(done[len(baselines):], raw, seed_of=lambda c: c["cell"]["seed"])
    rows = summarise(results)
    study = {**result_header("study deep", config), "cells_dir": str(results_dir), "rows": rows,
             "table": table(rows), "cells": results, "raw_pixel_cells": raw}
    if out:
        study["files"] = write_deep_outputs(study, out)
    return study


def write_deep_outputs(study: dict[str, Any], out: Path) -> dict[str, str]:
    """The study JSON and its plot, written as one set."""
    from dynsim.plots import plot_deep_study
    from dynsim.results import write_result

    return write_result(out, study, {"plot": ("", plot_deep_study(study))})
