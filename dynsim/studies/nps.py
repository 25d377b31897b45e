"""``dynsim study nps``: test accuracy vs neurons per site (NpS), the structured network's headline.

Obeid, Ramambason & Pehlevan (2019, NeurIPS, "Structured and deep similarity matching via
structured and deep Hebbian networks") report MNIST test error falling with NpS: 3.87 % at
NpS 4, 2.41 % at 8, 1.73 % at 16, 1.60 % at 32, 1.47 % at 64, 1.40 % at 100
(:data:`PUBLISHED_MNIST_ERROR`). This study trains one single-layer DSSM network per
(NpS, seed) cell — every other setting is ``run dssm``'s (stride 2, radius 4 on 28×28, T = 1e-4,
the solver ``auto`` picks for that NpS, the exact ``svc`` readout on all train/test images
after the last epoch) — and records per cell: test accuracy, the raw-pixel baseline with the
same readout on the same split, training and evaluation seconds, the wall seconds of the cell
and the peak resident memory of the worker process (``ru_maxrss``; a worker that ran a larger
cell before reports that cell's peak).

The raw-pixel baseline depends on neither NpS nor the network's seed, only on the data, the
readout and the readout sets: it is computed once per study, as its own cell
(:meth:`NpsStudyConfig.baseline_cells`; one per seed only when ``--eval-train-size`` /
``--eval-test-size`` subsample the sets, whose draws follow the seed), and the DSSM cells run
with ``raw_baseline = False``.

Cells run through :func:`dynsim.sweeps.run_grid`, each saved as it finishes (resumable). Per NpS
the seeds give mean ± standard error (:func:`dynsim.studies.seeds.mean_sem`; "one seed" when
there is one). The published numbers are MNIST; ours are whatever ``--data`` is, and every
table and plot says which.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynsim.data import DATASETS
from dynsim.errors import ConfigError
from dynsim.readouts import READOUTS
from dynsim.results import result_header
from dynsim.settings import check_settings, setting
from dynsim.studies.baseline import attach_baseline, baseline_cells, is_baseline, raw_pixel_cell
from dynsim.studies.seeds import mean_sem, parse_seeds

# Obeid et al. (2019), MNIST test error (%) of the single-layer structured network vs NpS
PUBLISHED_MNIST_ERROR: dict[int, float] = {4: 3.87, 8: 2.41, 16: 1.73, 32: 1.60, 64: 1.47, 100: 1.40}


@dataclass
class NpsStudyConfig:
    """Every setting of ``dynsim study nps``; training defaults are ``run dssm``'s except the
    number of epochs (15) and one readout after training."""

    data: str = setting("fashion-mnist", help="data set", choices=DATASETS)
    data_dir: str | None = setting(None, help="directory of MNIST/CIFAR files", shown_default="None")
    nps: list[int] = setting(default_factory=lambda: [4, 8, 16, 32, 64, 100], item="nps",
                             help="NpS values, comma-separated")
    seeds: list[int] = setting(default_factory=lambda: [0, 1, 2], parse=parse_seeds, metavar="LIST",
                               help="seeds, e.g. 0,1,2 or 0-4", shown_default="0,1,2")
    epochs: int = setting(15, help="epochs of training")
    images_per_epoch: int = setting(1000, help="training images drawn with replacement per epoch")
    threshold: float = setting(1e-4, help="field residual T")
    solver: str = setting("auto", help="solver spec", shown_default="auto = newton / newton-cg by NpS")
    readout: str = setting("svc", choices=READOUTS, help="linear readout")
    eval_train_size: int | None = setting(None, help="readout train images")
    eval_test_size: int | None = setting(None, help="readout test images")
    base: dict[str, Any] = field(default_factory=dict)  # --set KEY=VALUE: any other run-dssm setting, every cell
    workers: int | None = setting(None, help="worker processes")
    backend: str = setting("local", choices=("local", "ray"), help="where cells run")
    ray_address: str | None = setting(None, help="Ray cluster address (implies --backend ray)", shown_default="None")
    out: str | None = setting(None, help="output folder: nps.json, nps.png, cells/", shown_default="runs/nps")
    progress: bool = setting(True, help="no progress output")

    def validate(self) -> NpsStudyConfig:
        """Raise :class:`ConfigError` naming the first bad value (the fields' descriptions,
        :func:`dynsim.settings.check_settings`)."""
        check_settings(self, command="study nps")
        return self

    def baseline_cells(self) -> list[dict[str, Any]]:
        """The raw-pixel baseline's cells: one for the study (``seed`` None: the readout sets are
        all images), or one per seed when a readout set is a seeded subsample."""
        return baseline_cells(data=self.data, data_dir=self.data_dir, readout=self.readout,
                              eval_train_size=self.eval_train_size, eval_test_size=self.eval_test_size,
                              seeds=self.seeds, base=self.base)

    def cells(self) -> list[dict[str, Any]]:
        """One dict of DSSM settings per (NpS, seed), smallest NpS first (an interrupted study has
        the cheap cells finished)."""
        if not self.nps or not self.seeds:
            raise ConfigError("study nps needs at least one --nps value and one seed")
        for n in self.nps:
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(f"--nps values must be integers >= 1, got {n!r}")
        if len(set(self.nps)) != len(self.nps):
            raise ConfigError(f"--nps lists a value twice: {self.nps}")
        return [
            {
                "data": self.data, "data_dir": self.data_dir, "nps": n, "threshold": self.threshold,
                "solver": self.solver, "epochs": self.epochs, "images_per_epoch": self.images_per_epoch,
                "eval_every": self.epochs, "eval_train_size": self.eval_train_size,
                "eval_test_size": self.eval_test_size, "readout": self.readout, "seed": seed, **self.base,
            }
            for n in sorted(self.nps) for seed in self.seeds
        ]


def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """One cell of the study's grid (top level and picklable for :func:`run_grid`): the
    raw-pixel baseline (``kind = "raw_pixels"``) or a DSSM (NpS, seed) cell."""
    return raw_pixel_cell(cell) if is_baseline(cell) else train_cell(cell)


def train_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """Train and read out one (NpS, seed) cell, without the raw-pixel baseline (its own cell)."""
    from dynsim.pipelines.dssm import DSSMConfig, run_dssm

    # one torch thread per cell (cells run side by side on --workers) unless --set threads=N asked for more
    config = DSSMConfig.from_dict({"threads": 1, **cell, "progress": False, "out": None, "raw_baseline": False})
    start = time.perf_counter()
    result = run_dssm(config)
    wall = time.perf_counter() - start
    final = result["final"]
    return {
        "cell": cell,
        "nps": cell["nps"],
        "seed": cell["seed"],
        "solver": result["system"]["solver"],
        "neurons": result["system"].get("n_neurons"),
        "test_accuracy": final["test_accuracy"],
        "raw_pixel_accuracy": final.get("raw_pixel_accuracy"),
        "mean_iterations": final.get("mean_iterations"),
        "fraction_converged": final.get("fraction_converged"),
        "train_seconds": final.get("train_seconds"),
        "eval_seconds": final.get("eval_seconds"),
        "readout_seconds": final.get("last_readout_seconds"),  # of eval_seconds: the svc fit (the rest: settling)
        "wall_seconds": wall,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
    }


def summarise(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per NpS (ascending): accuracy mean ± s.e. over seeds, raw pixels, seconds, memory,
    and the published MNIST error at that NpS (None where the paper has none)."""
    groups: dict[int, list[dict]] = {}
    for c in cells:
        groups.setdefault(int(c["nps"]), []).append(c)
    rows = []
    for n, cs in sorted(groups.items()):
        acc, se = mean_sem([c["test_accuracy"] for c in cs])
        rows.append({
            "nps": n, "seeds": [c["seed"] for c in cs], "solver": cs[0]["solver"],
            "test_accuracy": acc, "test_accuracy_se": se,
            "raw_pixel_accuracy": mean_sem([c["raw_pixel_accuracy"] for c in cs])[0],
            "mean_iterations": mean_sem([c["mean_iterations"] for c in cs])[0],
            "wall_seconds": mean_sem([c["wall_seconds"] for c in cs])[0],
            "train_seconds": mean_sem([c["train_seconds"] for c in cs])[0],
            "eval_seconds": mean_sem([c["eval_seconds"] for c in cs])[0],
            # over the cells that kept it (cells made before it was kept have None)
            "readout_seconds": mean_sem([c.get("readout_seconds") for c in cs])[0],
            "readout_seconds_cells": sum(c.get("readout_seconds") is not None for c in cs),
            "peak_rss_gib": max(c["peak_rss_gib"] for c in cs),
            "published_mnist_error": PUBLISHED_MNIST_ERROR.get(n),
        })
    return rows


def table(rows: list[dict[str, Any]], data: str) -> str:
    """Markdown table of :func:`summarise`'s rows; accuracy in %, mean ± s.e. (or "one seed")."""
    head = ["NpS", "seeds", "solver", f"{data} test acc. %", "raw pixels %", "steps/input", "train s", "eval s",
            "readout s", "cell s", "peak GiB", "published MNIST error %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in rows:
        acc = f"{100 * r['test_accuracy']:.2f}" + (
            " (one seed)" if r["test_accuracy_se"] is None else f" ± {100 * r['test_accuracy_se']:.2f}")
        pub = "–" if r["published_mnist_error"] is None else f"{r['published_mnist_error']:.2f}"
        lines.append("| " + " | ".join([
            str(r["nps"]), str(len(r["seeds"])), str(r["solver"]), acc, f"{100 * r['raw_pixel_accuracy']:.2f}",
            f"{r['mean_iterations']:.1f}", f"{r['train_seconds']:.0f}", f"{r['eval_seconds']:.0f}",
            "–" if r["readout_seconds"] is None else f"{r['readout_seconds']:.0f}", f"{r['wall_seconds']:.0f}",
            f"{r['peak_rss_gib']:.2f}", pub]) + " |")
    return "\n".join(lines)


def run_nps_study(config: NpsStudyConfig) -> dict[str, Any]:
    """Run the (NpS × seed) grid (resumable per cell); write JSON + PNG if ``config.out``."""
    from dynsim.pipelines.dssm import DSSMConfig
    from dynsim.sweeps import run_grid

    cells = config.cells()
    for cell in cells:  # every bad setting is refused before any worker starts
        DSSMConfig.from_dict({**cell, "progress": False}).validate()
    baselines = config.baseline_cells()
    folder = Path(config.out) if config.out else None  # <out>/nps.json, <out>/nps.png, <out>/cells/
    out = folder / "nps.json" if folder else None
    results_dir = folder / "cells" if folder else Path("runs") / "nps_cells"
    done = run_grid(baselines + cells, run_cell, results_dir=results_dir, workers=config.workers,
                    backend=config.backend, ray_address=config.ray_address, progress=config.progress)
    raw, results = done[: len(baselines)], attach_baseline(done[len(baselines) :], done[: len(baselines)])
    rows = summarise(results)
    study = {**result_header("study nps", config), "cells_dir": str(results_dir), "data": config.data,
             "published": {"data": "mnist", "source": "Obeid, Ramambason & Pehlevan 2019",
                           "test_error_percent": {str(k): v for k, v in PUBLISHED_MNIST_ERROR.items()}},
             "rows": rows, "table": table(rows, config.data), "cells": results, "raw_pixel_cells": raw}
    if out:
        from dynsim.plots import plot_nps_study
        from dynsim.results import write_result

        study["files"] = write_result(out, study, {"plot": ("", plot_nps_study(study))})
    return study
