"""``dynsim study convergence``: how long must the dynamics run for what accuracy?

A grid over the threshold ``T`` (stop at ``‖du/ds‖/‖u‖ < T``), the step cap and streaming
input (off, or the input switching every k steps without a state reset). Each cell
trains a DSSM network from the same seed (:func:`dynsim.pipelines.dssm.run_dssm`) and
records test accuracy per evaluation, training time, field evaluations and iterations
per input. Cells run through :func:`dynsim.sweeps.run_grid` (local processes, or Ray),
each cell's result saved as it finishes, so an interrupted study resumes.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynsim.data import DATASETS
from dynsim.errors import ConfigError
from dynsim.readouts import READOUTS
from dynsim.results import result_header
from dynsim.settings import setting

ITERATIONS_KEPT = 20_000  # iterations-per-input entries kept per cell in the study JSON


def _seeds(text: Any) -> list[int]:
    from dynsim.studies.seeds import parse_seeds

    return parse_seeds(text)


@dataclass
class ConvergenceConfig:
    """The settings of ``dynsim study convergence``, each described once (flags, ``--help``,
    config-file keys and validation come from the field metadata, :mod:`dynsim.settings`).

    The grid is ``thresholds × caps × streams`` (× ``seeds``); every other setting is the
    same in every cell (``base``: any other DSSM setting, from ``--set KEY=VALUE``).
    """

    data: str = setting("digits", help="data set", choices=DATASETS)
    data_dir: str | None = setting(None, help="directory with the data files", shown_default="None")
    nps: int = setting(4, help="neurons per site")
    thresholds: list[float] = setting(default_factory=lambda: [1e-1, 1e-2, 1e-3, 1e-4, 1e-5], item="threshold",
                                      help="comma-separated T values")
    caps: list[int | None] = setting(default_factory=lambda: [1, 10, 100, 3000], item="max_steps",
                                     help="comma-separated step caps ('none': no cap)")
    streams: list[int | None] = setting(default_factory=lambda: [None, 10], item="stream_every",
                                        help="streaming: 'off' or steps per input k, comma-separated",
                                        shown_default="off,10")
    solver: str = setting("euler", help="solver spec (seed schedule)")
    epochs: int = setting(3, help="epochs per cell")
    images_per_epoch: int = setting(1000, help="training images drawn with replacement per epoch")
    eval_every: int = setting(1, help="epochs between readouts (and at the end; 0: at the end)")
    eval_train_size: int | None = setting(None, help="readout train images")
    eval_test_size: int | None = setting(None, help="readout test images")
    readout: str = setting("svc", choices=READOUTS, help="linear readout (see run dssm --help)")
    base: dict[str, Any] = field(default_factory=dict)  # --set KEY=VALUE (hand-written flag)
    workers: int | None = setting(None, help="worker processes")
    backend: str = setting("local", choices=("local", "ray"), help="where cells run")
    ray_address: str | None = setting(None, help="Ray cluster address (implies --backend ray)", shown_default="None")
    seed: int = setting(0, help="seed of the weights and the image order")
    seeds: list[int] | None = setting(None, parse=_seeds, metavar="LIST",
                                      help="a seed axis, e.g. 0,1,2: every setting once per seed, mean ± s.e. "
                                           "(default: --seed alone)")
    out: str | None = setting(None, help="result JSON path", shown_default="runs/convergence-<data>-<time>.json")
    progress: bool = setting(True, help="no progress output")

    def validate(self) -> ConvergenceConfig:
        """Raise :class:`ConfigError` naming the first bad value (the fields' descriptions,
        :func:`dynsim.settings.check_settings`)."""
        from dynsim.settings import check_settings

        check_settings(self)
        return self

    def cells(self) -> list[dict[str, Any]]:
        """One dict of DSSM settings per grid cell (T × cap × streaming)."""
        if not (self.thresholds and self.caps and self.streams):
            raise ConfigError(
                "the grid needs at least one threshold, one cap and one streaming setting"
            )
        base = {k: _parse_value(v) for k, v in self.base.items()}
        common = {
            "data": self.data,
            "data_dir": self.data_dir,
            "nps": self.nps,
            "solver": self.solver,
            "epochs": self.epochs,
            "images_per_epoch": self.images_per_epoch,
            "eval_every": self.eval_every,
            "eval_train_size": self.eval_train_size,
            "eval_test_size": self.eval_test_size,
            "readout": self.readout,
            "seed": self.seed,
            **base,
        }
        seeds = self.seeds or [self.seed]
        return [
            {**common, "threshold": t, "max_steps": cap, "stream_every": stream, "seed": seed}
            for t, cap, stream, seed in itertools.product(self.thresholds, self.caps, self.streams, seeds)
        ]


def _parse_value(v: Any) -> Any:
    if not isinstance(v, str):
        return v
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def cell_config(cell: dict[str, Any]):
    """The :class:`~dynsim.configs.dssm.DSSMConfig` a cell trains with (quiet, no files, one thread)."""
    from dynsim.pipelines.dssm import DSSMConfig

    return DSSMConfig.from_dict(
        {
            **cell,
            "progress": False,
            "out": None,
            "threads": 1,
            "on_divergence": cell.get("on_divergence", "skip"),
        }
    )


def resolve_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """A cell's settings with every default filled in (hashed into its result file)."""
    import dataclasses

    return dataclasses.asdict(cell_config(cell))


def train_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """Train one DSSM cell (top-level and picklable for :func:`run_grid`)."""
    from dynsim.pipelines.dssm import run_dssm

    result = run_dssm(cell_config(cell))
    its = result["iterations_per_input"]
    stride = max(1, -(-len(its) // ITERATIONS_KEPT))
    return {
        "cell": cell,
        "history": result["history"],
        "final": result["final"],
        "baseline": result["baseline"],
        "train_evals": int(sum(h.get("n_evals", 0) for h in result["history"])),
        "iterations_per_input": its[::stride],
        "iterations_stride": stride,
    }


def cells_dir(out: Path) -> Path:
    """The folder of the per-cell result files of a study writing ``out``: ``<stem>_cells``."""
    out = Path(out)
    return out.with_suffix("").with_name(out.stem + "_cells")


def run_convergence(config: ConvergenceConfig) -> dict[str, Any]:
    """Run the grid; write the study JSON and plots if ``config.out``; return the result."""
    from dynsim.sweeps import run_grid

    config.validate()
    cells = config.cells()
    for cell in cells:  # fail fast on bad settings, before any worker starts
        from dynsim.pipelines.dssm import DSSMConfig

        DSSMConfig.from_dict({**cell, "progress": False}).validate()
    out = Path(config.out) if config.out else None
    results_dir = cells_dir(out) if out else Path("runs") / "convergence_cells"
    results = run_grid(
        cells,
        train_cell,
        results_dir=results_dir,
        workers=config.workers,
        backend=config.backend,
        ray_address=config.ray_address,
        progress=config.progress,
        resolve=resolve_cell,
    )
    study = {
        **result_header("study convergence", config),
        "cells_dir": str(results_dir),
        "summary": summarize_over_seeds(results),
        "cells": results,
    }
    if out:
        study["files"] = write_convergence_outputs(study, out)
    return study


def setting_key(cell: dict[str, Any]) -> tuple:
    """(T, cap, streaming): a grid setting, whatever the seed."""
    return cell["threshold"], cell["max_steps"], cell.get("stream_every")


def summarize_over_seeds(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per setting: final test accuracy mean ± s.e. over its seeds, and mean iterations."""
    from dynsim.studies.seeds import mean_sem

    groups: dict[tuple, list] = {}
    for r in results:
        groups.setdefault(setting_key(r["cell"]), []).append(r)
    rows = []
    for (t, cap, stream), runs in groups.items():
        m, s = mean_sem([r["final"]["test_accuracy"] for r in runs])
        rows.append({"threshold": t, "max_steps": cap, "stream_every": stream,
                     "seeds": [r["cell"].get("seed") for r in runs], "test_accuracy_mean": m,
                     "test_accuracy_sem": s, "mean_iterations": mean_sem([r["final"]["mean_iterations"]
                                                                          for r in runs])[0]})
    return rows


def write_convergence_outputs(study: dict[str, Any], out: Path) -> dict[str, str]:
    """The study JSON and its four plots, written as one set."""
    from dynsim.plots import (
        plot_convergence_accuracy,
        plot_convergence_heatmap,
        plot_convergence_iterations,
        plot_convergence_pareto,
    )
    from dynsim.results import write_result

    plots = {
        "accuracy_plot": ("_accuracy", plot_convergence_accuracy(study)),
        "heatmap_plot": ("_heatmap", plot_convergence_heatmap(study)),
        "iterations_plot": ("_iterations", plot_convergence_iterations(study)),
        "pareto_plot": ("_pareto", plot_convergence_pareto(study)),
    }
    return write_result(out, study, plots)
