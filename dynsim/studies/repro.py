"""The reproduction report's figures in one command: ``dynsim study repro``.

The reproduction report of Obeid et al. (2019) trained the structured similarity-matching
network with the seed's Euler schedule ``dt_n = max(0.2/(1+0.005 n), 0.05)`` for 120 epochs of
1000 images and read it out every 15 epochs. Its settings, each a cell here:

=====================  =====================================================================
``T=1e-4``             threshold 1e-4, cap 3000 (the reference run)
``T=1e-2``             threshold 1e-2, seeds 0 and 1 (the report ran both)
``T=1e-2, batch 100``  threshold 1e-2, 100 images settled together, the batch rule ``sum``
``cap 10``             threshold 1e-4, at most 10 steps per input
``cap 10, stream 10``  the same, input switched every 10 steps without a reset
``cap 1``              one step per input
``cap 1, stream 1``    one step per input, input switched every step
=====================  =====================================================================

Method (recorded in the JSON): training settles with the seed's Euler schedule (``solver
euler``), so Figure 2 counts the iterations the report counted; streaming carries the rates and
restarts ``u`` (``stream_carry r``, the report's code). The threshold runs (cap 3000) settle the
evaluation sets with ``eval_solver newton`` — the same residual test ``‖du/ds‖/‖u‖ < T``, reached
in a few Newton steps instead of thousands of Euler steps; the capped runs evaluate with their
own capped Euler dynamics. Readout: ``svc`` (LinearSVC's problem, exact) on all train/test images.

Figure 1: test accuracy vs epochs, two panels as in the report (thresholds and batching;
caps and streaming), mean ± s.e. where a setting has several seeds, raw pixels dashed.
Figure 2: iterations to settle for each training input, T = 1e-4 vs 1e-2 (log scale).
Each (setting, seed) is a cell of :func:`dynsim.sweeps.run_grid`: cells run in parallel and an
interrupted study resumes per cell (and within a cell from its checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dynsim.data import DATASETS
from dynsim.errors import ConfigError
from dynsim.readouts import READOUTS
from dynsim.results import result_header
from dynsim.settings import check_settings, setting
from dynsim.studies.seeds import mean_sem, parse_seeds

# (name, DSSM settings, seeds the report ran besides the user's)
REPORT_SETTINGS: tuple[tuple[str, dict[str, Any], tuple[int, ...]], ...] = (
    ("T=1e-4", {"threshold": 1e-4, "max_steps": 3000, "eval_solver": "newton"}, ()),
    ("T=1e-2", {"threshold": 1e-2, "max_steps": 3000, "eval_solver": "newton"}, (0, 1)),
    ("T=1e-2, batch 100", {"threshold": 1e-2, "max_steps": 3000, "eval_solver": "newton", "batch_size": 100}, ()),
    ("cap 10", {"threshold": 1e-4, "max_steps": 10}, ()),
    ("cap 10, stream 10", {"threshold": 1e-4, "max_steps": 10, "stream_every": 10, "stream_carry": "r"}, ()),
    ("cap 1", {"threshold": 1e-4, "max_steps": 1}, ()),
    ("cap 1, stream 1", {"threshold": 1e-4, "max_steps": 1, "stream_every": 1, "stream_carry": "r"}, ()),
)
PANELS = (("T=1e-4", "T=1e-2", "T=1e-2, batch 100"), ("cap 10", "cap 10, stream 10", "cap 1", "cap 1, stream 1"))
FIGURE2 = ("T=1e-4", "T=1e-2")  # settings whose per-input iteration counts are kept (seed 0 or the first)


def _parse_settings(value: str | list[str]) -> list[str]:
    """``--settings "T=1e-2; ..."`` (or a config file's list) -> names of the report's settings."""
    names = [s[0] for s in REPORT_SETTINGS]
    chosen = [v.strip() for v in (value.split(";") if isinstance(value, str) else value) if v.strip()]
    unknown = [v for v in chosen if v not in names]
    if unknown or not chosen:
        raise ConfigError(f"unknown repro setting(s) {unknown}; choose from {names}")
    return chosen


@dataclass
class ReproConfig:
    """Settings of ``dynsim study repro``; the defaults are the report's."""

    data: str = setting("fashion-mnist", help="data set", choices=DATASETS)
    data_dir: str | None = setting(None, help="directory of MNIST/CIFAR files", shown_default="None")
    seeds: list[int] = setting(default_factory=lambda: [0], parse=parse_seeds, metavar="LIST",
                               help="seeds for every setting (T=1e-2 always adds the report's 0,1)", shown_default="0")
    epochs: int = setting(120, help="epochs")
    images_per_epoch: int = setting(1000, help="training images drawn with replacement per epoch")
    eval_every: int = setting(15, help="epochs between readouts (and at the end; 0: at the end)")
    eval_train_size: int | None = setting(None, help="readout train images")
    eval_test_size: int | None = setting(None, help="readout test images")
    readout: str = setting("svc", choices=READOUTS, help="linear readout (see run dssm --help)")
    settings: list[str] | None = setting(None, parse=lambda v: _parse_settings(v), metavar="NAMES",
                                         help="a subset of the report's settings, separated by ';'",
                                         shown_default="all: " + "; ".join(s[0] for s in REPORT_SETTINGS))
    workers: int | None = setting(2, help="worker processes")
    backend: str = setting("local", choices=("local", "ray"), help="where cells run")
    ray_address: str | None = setting(None, help="Ray cluster address (implies --backend ray)", shown_default="None")
    out: str = setting("runs/repro", help="output directory")
    progress: bool = setting(True, help="no progress output")

    def validate(self) -> ReproConfig:
        """Raise :class:`ConfigError` naming the first bad value (the fields' descriptions,
        :func:`dynsim.settings.check_settings`)."""
        check_settings(self)
        return self

    def cells(self) -> list[dict[str, Any]]:
        names = [s[0] for s in REPORT_SETTINGS]
        chosen = self.settings or names
        unknown = [s for s in chosen if s not in names]
        if unknown:
            raise ConfigError(f"unknown repro setting(s) {unknown}; choose from {names}")
        if not self.seeds:
            raise ConfigError("give at least one seed")
        cells = []
        for name, settings, report_seeds in REPORT_SETTINGS:
            if name not in chosen:
                continue
            for seed in sorted(set(self.seeds) | set(report_seeds)):
                cfg = {
                    "data": self.data, "data_dir": self.data_dir, "solver": "euler", "schedule": "seed",
                    "epochs": self.epochs, "images_per_epoch": self.images_per_epoch, "eval_every": self.eval_every,
                    "eval_train_size": self.eval_train_size, "eval_test_size": self.eval_test_size,
                    "readout": self.readout, "seed": seed, "threads": 1, "progress": False, **settings,
                    "out": str(Path(self.out) / "cells" / f"{_slug(name)}_seed{seed}.json"),
                }
                cells.append({"setting": name, "config": cfg})
        return cells


def _slug(name: str) -> str:
    return name.replace("=", "").replace(", ", "_").replace(" ", "").replace(".", "p").replace("-", "m")


def repro_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """Train one (setting, seed) cell; top-level and picklable for the sweep runner."""
    from dynsim.checkpoint import checkpoint_path
    from dynsim.pipelines.dssm import DSSMConfig, run_dssm

    config = DSSMConfig.from_dict(cell["config"])
    result = run_dssm(config, resume=checkpoint_path(config.out).exists())
    its = np.asarray(result["iterations_per_input"])
    per_epoch = its.reshape(config.epochs, -1).mean(axis=1) if its.size % config.epochs == 0 else its
    out = {
        "setting": cell["setting"],
        "seed": config.seed,
        "file": config.out,
        "history": [{k: h[k] for k in ("epoch", "images_seen", "test_accuracy", "eval_mean_iterations") if k in h}
                    for h in result["history"] if "test_accuracy" in h],
        "final": result["final"],
        "mean_iterations_per_epoch": per_epoch.tolist(),
    }
    if cell["setting"] in FIGURE2:
        out["iterations_per_input"] = its.astype(int).tolist()
    return out


def summarize(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Per setting: accuracy per evaluation and final (mean ± s.e. over its seeds), the best
    evaluation and where it was, the drift from the best to the last, iterations, seconds."""
    by_setting: dict[str, list] = {}
    for c in cells:
        by_setting.setdefault(c["setting"], []).append(c)
    out = {}
    for name, runs in by_setting.items():
        epochs = [h["epoch"] + 1 for h in runs[0]["history"]]
        curves = np.array([[h["test_accuracy"] for h in r["history"]] for r in runs])
        mean = curves.mean(axis=0)
        sem = curves.std(axis=0, ddof=1) / np.sqrt(len(runs)) if len(runs) > 1 else None
        finals = [r["final"]["test_accuracy"] for r in runs]
        best = [float(np.max(c)) for c in curves]
        m, s = mean_sem(finals)
        bm, bs = mean_sem(best)
        dm, ds = mean_sem([b - f for b, f in zip(best, finals, strict=True)])
        out[name] = {
            "seeds": [r["seed"] for r in runs],
            "epochs": epochs,
            "test_accuracy_mean": mean.tolist(),
            "test_accuracy_sem": None if sem is None else sem.tolist(),
            "final_mean": m, "final_sem": s, "final_per_seed": finals,
            "best_mean": bm, "best_sem": bs,
            "best_epoch_per_seed": [epochs[int(np.argmax(c))] for c in curves],
            "drift_best_to_final_mean": dm, "drift_best_to_final_sem": ds,
            "raw_pixel_accuracy": runs[0]["final"]["raw_pixel_accuracy"],
            "mean_iterations": mean_sem([r["final"]["mean_iterations"] for r in runs])[0],
            "train_seconds_mean": mean_sem([r["final"]["train_seconds"] for r in runs])[0],
            "total_seconds_mean": mean_sem([r["final"]["total_seconds"] for r in runs])[0],
        }
    return out


def run_repro(config: ReproConfig) -> dict[str, Any]:
    """Run every cell, write ``<out>/repro.json`` and the two figures; return the result."""
    import time

    from dynsim.pipelines.dssm import DSSMConfig
    from dynsim.sweeps import run_grid

    cells = config.cells()
    for cell in cells:  # every bad setting fails here, before any training
        DSSMConfig.from_dict(cell["config"]).validate()
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; study repro writes a directory (e.g. runs/repro)")
    t0 = time.perf_counter()
    results = run_grid(cells, repro_cell, results_dir=out / "cells" / "done", workers=config.workers or 2,
                       backend=config.backend, ray_address=config.ray_address, progress=config.progress)
    study = {
        **result_header("study repro", config),
        "method": {"training_solver": "euler (seed schedule)", "stream_carry": "r",
                   "eval_solver": "newton for the threshold runs, the run's own capped Euler otherwise",
                   "readout": config.readout},
        "wall_seconds": time.perf_counter() - t0,
        "settings": summarize(results),
        "cells": results,
    }
    study["files"] = write_repro_outputs(study, out)
    return study


def write_repro_outputs(study: dict[str, Any], out: Path) -> dict[str, str]:
    """``<out>/repro.json`` and Figures 1 and 2 beside it, written as one set."""
    from dynsim.plots import plot_repro_accuracy, plot_repro_iterations
    from dynsim.results import write_result

    plots = {"figure1": ("_figure1_accuracy", plot_repro_accuracy(study, PANELS)),
             "figure2": ("_figure2_iterations", plot_repro_iterations(study, FIGURE2))}
    return write_result(out / "repro.json", study, plots)



