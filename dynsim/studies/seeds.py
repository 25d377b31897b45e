"""Repeat a run over seeds and report mean ± standard error.

``run_dssm_seeds(config, seeds)`` runs :func:`dynsim.pipelines.dssm.run_dssm` once per seed
(the seed sets the initial weights, the image draws and the evaluation subsets), each seed a
cell of :func:`dynsim.sweeps.run_grid`, so seeds run in parallel and an interrupted run
resumes per seed (and within a seed from its checkpoint). The combined result keeps every
seed's numbers and adds, in ``final``:

- ``test_accuracy_mean``, ``test_accuracy_sem``, ``test_accuracy_per_seed``;
- ``gain_over_raw_mean``, ``gain_over_raw_sem``, ``gain_over_raw_per_seed``: the paired
  difference against the raw-pixel readout on the same images (on the full split the
  baseline does not depend on the seed; with ``eval_*_size`` subsets it is read out on each
  seed's subset, ``raw_pixel_accuracy_per_seed``);
- ``gain_over_raw_se_test_images``: per seed, the standard error of that difference over the
  test images (a paired comparison on the same M images), i.e. the test set's sampling noise.

The standard error is ``s / √n`` with ``s`` the sample standard deviation (ddof = 1) over the
``n`` seeds; with one seed it is ``None`` (say "one seed").
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from dynsim.errors import ConfigError
from dynsim.results import result_header


def mean_sem(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and standard error (ddof = 1) of ``values``; sem is None for fewer than two."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return None, None
    sem = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else None
    return float(v.mean()), sem


def parse_seeds(text: str | list[int]) -> list[int]:
    """``"0,1,2"`` or ``"0-4"`` (inclusive) or a list → distinct non-negative seeds, in order."""
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = []
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                try:
                    items.extend(range(int(lo), int(hi) + 1))
                except ValueError:
                    raise ConfigError(f"--seeds: {part!r} is not a range such as 0-4") from None
            else:
                items.append(part)
    seeds = []
    for s in items:
        try:
            value = int(s)
        except (TypeError, ValueError):
            raise ConfigError(f"--seeds must be integers such as 0,1,2 or 0-4, got {s!r}") from None
        if value < 0 or value >= 2**63:
            raise ConfigError(f"--seeds must be between 0 and 2**63 - 1, got {value}")
        seeds.append(value)
    if not seeds:
        raise ConfigError("--seeds is empty; give e.g. 0,1,2")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds has a repeated seed: {seeds}")
    return seeds


def seeds_dir(out: Path) -> Path:
    """Folder of the per-seed results and cells of ``--seeds`` runs: ``<out dir>/<out stem>_seeds``."""
    return out.with_name(out.stem + "_seeds")


def seed_out(out: Path, seed: int) -> Path:
    """Result file of one seed: ``<out dir>/<out stem>_seeds/seed<seed>.json``."""
    return seeds_dir(out) / f"seed{seed}.json"


def dssm_seed_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """One seed of a DSSM run (top-level, picklable for the sweep runner)."""
    from dynsim.checkpoint import checkpoint_path
    from dynsim.pipelines.dssm import DSSMConfig, run_dssm

    config = DSSMConfig.from_dict(cell["config"])
    out = Path(config.out)
    resume = checkpoint_path(config.out).exists()  # an interrupted seed continues where it stopped
    result = run_dssm(config, resume=resume)
    return {
        "seed": config.seed,
        "file": str(out),
        "final": result["final"],
        "history": [{k: h[k] for k in ("epoch", "images_seen", "test_accuracy") if k in h}
                    for h in result["history"] if "test_accuracy" in h],
    }


def summarize_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``final`` block over seeds (module docstring) from each seed's ``final``."""
    acc = [r["final"]["test_accuracy"] for r in per_seed]
    raw = [r["final"]["raw_pixel_accuracy"] for r in per_seed]
    gain = [a - b if a is not None and b is not None else None for a, b in zip(acc, raw, strict=True)]
    m, s = mean_sem(acc)
    gm, gs = mean_sem(gain)
    best_m, best_s = mean_sem([r["final"].get("best_test_accuracy") for r in per_seed])
    out = {
        "n_seeds": len(per_seed),
        "seeds": [r["seed"] for r in per_seed],
        "test_accuracy_mean": m,
        "test_accuracy_sem": s,
        "test_accuracy_per_seed": acc,
        "best_test_accuracy_mean": best_m,
        "best_test_accuracy_sem": best_s,
        "raw_pixel_accuracy": mean_sem(raw)[0],  # one value unless the readout subsets depend on the seed
        "raw_pixel_accuracy_per_seed": raw,
        "gain_over_raw_mean": gm,
        "gain_over_raw_sem": gs,
        "gain_over_raw_per_seed": gain,
        "gain_over_raw_se_test_images": [(r["final"].get("gain_over_raw") or {}).get("se_test_images")
                                         for r in per_seed],
    }
    for key in ("train_seconds", "eval_seconds", "total_seconds", "mean_iterations", "fraction_converged"):
        out[f"{key}_mean"] = mean_sem([r["final"].get(key) for r in per_seed])[0]
    return out


def history_bands(per_seed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per evaluated epoch: images seen, test accuracy mean and s.e. over the seeds that have it."""
    by_epoch: dict[int, list] = {}
    for r in per_seed:
        for h in r["history"]:
            by_epoch.setdefault(h["epoch"], []).append(h)
    rows = []
    for epoch in sorted(by_epoch):
        hs = by_epoch[epoch]
        m, s = mean_sem([h["test_accuracy"] for h in hs])
        rows.append({"epoch": epoch, "images_seen": hs[0]["images_seen"], "test_accuracy_mean": m,
                     "test_accuracy_sem": s, "n_seeds": len(hs)})
    return rows


def run_dssm_seeds(config, seeds: list[int], *, workers: int | None = None, backend: str = "local",
                   ray_address: str | None = None) -> dict[str, Any]:
    """Run ``config`` once per seed (cells of a sweep) and combine; write ``config.out`` and a
    plot with mean ± s.e. bands beside it. Each seed's own result lies in ``<out>_seeds/``."""
    from dynsim.sweeps import run_grid

    if not config.out:
        raise ConfigError("--seeds needs --out PATH: each seed's result and checkpoint lie beside it")
    config.validate()
    out = Path(config.out)
    cells = []
    for seed in seeds:
        cfg = {**asdict(config), "seed": seed, "out": str(seed_out(out, seed)), "progress": False}
        cells.append({"config": cfg})
    per_seed = run_grid(cells, dssm_seed_cell, results_dir=out.with_name(out.stem + "_seeds") / "cells",
                        workers=workers or min(len(seeds), 2), backend=backend, ray_address=ray_address,
                        progress=config.progress)
    result = {
        **result_header("run dssm", config),
        "seeds": seeds,
        "per_seed": per_seed,
        "history_mean": history_bands(per_seed),
        "final": summarize_seeds(per_seed),
    }
    from dynsim.plots import plot_seed_accuracy
    from dynsim.results import write_result

    write_result(out, result, {"accuracy_plot": ("_accuracy", plot_seed_accuracy(result))})
    return result


def ssl_seed_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """One seed of an SSL run (top-level, picklable for the sweep runner)."""
    from dynsim.checkpoint import checkpoint_path
    from dynsim.pipelines.ssl import SSLConfig, run_ssl

    config = SSLConfig(**cell["config"])
    result = run_ssl(config, progress=False, resume=checkpoint_path(config.out).exists())
    return {"seed": config.seed, "file": config.out, "final": result["final"]}


def run_ssl_seeds(config, seeds: list[int], *, workers: int | None = None) -> dict[str, Any]:
    """``run ssl --seeds``: one cell per seed; the trained encoder's probe accuracy, the random
    encoder's, and their paired difference, each as mean ± s.e. over the seeds."""
    from dynsim.results import write_result
    from dynsim.sweeps import run_grid

    if not config.out:
        raise ConfigError("--seeds needs --out PATH: each seed's result and checkpoint lie beside it")
    out = Path(config.out)
    cells = [{"config": {**asdict(config), "seed": s, "out": str(seed_out(out, s))}} for s in seeds]
    per_seed = run_grid(cells, ssl_seed_cell, results_dir=out.with_name(out.stem + "_seeds") / "cells",
                        workers=workers or min(len(seeds), 2), progress=True)
    acc = [r["final"]["test_accuracy"] for r in per_seed]
    rnd = [r["final"].get("random_encoder_accuracy") for r in per_seed]
    gain = [a - b if b is not None else None for a, b in zip(acc, rnd, strict=True)]
    m, s = mean_sem(acc)
    rm, rs = mean_sem(rnd)
    gm, gs = mean_sem(gain)
    result = {
        **result_header("run ssl", config),
        "seeds": seeds,
        "per_seed": per_seed,
        "final": {"n_seeds": len(seeds), "test_accuracy_mean": m, "test_accuracy_sem": s,
                  "test_accuracy_per_seed": acc, "random_encoder_accuracy_mean": rm,
                  "random_encoder_accuracy_sem": rs, "random_encoder_accuracy_per_seed": rnd,
                  "gain_over_random_mean": gm, "gain_over_random_sem": gs, "gain_over_random_per_seed": gain},
    }
    write_result(out, result)
    return result
