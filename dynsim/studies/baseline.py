"""The raw-pixel baseline of a study, computed once per study instead of once per cell.

A study's cells (``study nps``, ``study deep``) each train a network and read out its
representation with a linear readout; the baseline is that readout on the network's input,
the raw pixels (each image /255 minus its own mean), on the same readout sets. It depends only
on the data set, the readout and the readout sets — never on the network (NpS, layers,
streaming, cap) nor on the network's seed — so a study computes it in its own cell(s):

- one cell (``seed`` None) when the readout sets are all train / test images;
- one cell per seed when ``eval_train_size`` / ``eval_test_size`` subsample them, because the
  subsets are drawn with the run's seed (:func:`dynsim.builders.readout_sets`: seeds ``seed``
  and ``seed + 1``).

The network cells then run with ``raw_baseline = False`` (``run dssm`` skips its own baseline)
and :func:`attach_baseline` gives each its baseline's accuracy. A baseline cell is a sweep
cell like the others (:func:`dynsim.sweeps.run_grid`: saved as it finishes, resumable), marked
by ``kind = "raw_pixels"`` (:data:`RAW_PIXELS`).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from typing import Any

RAW_PIXELS = "raw_pixels"  # the ``kind`` of a baseline cell
READOUT_SETS = ("eval_train_size", "eval_test_size")  # the settings that choose the readout sets


def baseline_cells(*, data: str, data_dir: str | None, readout: str, eval_train_size: int | None,
                   eval_test_size: int | None, seeds: Sequence[int], base: dict[str, Any] | None = None
                   ) -> list[dict[str, Any]]:
    """The baseline's cells: ``[{"kind": "raw_pixels", data, data_dir, readout, eval_train_size,
    eval_test_size, [device,] [readout_tol,] seed}]`` — one with ``seed`` None when both readout
    sets are all images, else one per seed. ``base`` (a study's ``--set KEY=VALUE`` overrides,
    applied to every network cell) takes precedence for the readout-set sizes and gives the
    ``device`` and the readout's ``readout_tol`` (only when set: the cells of the default keep
    their keys)."""
    base = base or {}
    given = {"eval_train_size": eval_train_size, "eval_test_size": eval_test_size}
    sets = {k: base.get(k, given[k]) for k in READOUT_SETS}
    device = {k: base[k] for k in ("device", "readout_tol") if k in base}
    sampled = any(v is not None for v in sets.values())
    return [{"kind": RAW_PIXELS, "data": data, "data_dir": data_dir, "readout": readout, **sets, **device,
             "seed": seed} for seed in (seeds if sampled else [None])]


def is_baseline(cell: dict[str, Any]) -> bool:
    """Whether a sweep cell is a raw-pixel baseline cell (:data:`RAW_PIXELS`)."""
    return cell.get("kind") == RAW_PIXELS


def raw_pixel_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """The readout on the raw pixels of the readout sets ``run dssm`` would use with these
    settings (:func:`dynsim.builders.prepare_data`, :func:`dynsim.builders.readout_sets`):
    ``{"kind", "cell", "seed", "raw_pixel_accuracy", "readout_seconds", "readout_converged",
    "wall_seconds", "peak_rss_gib"}`` (top level and picklable for :func:`dynsim.sweeps.run_grid`)."""
    import torch

    from dynsim.builders import prepare_data, readout_sets
    from dynsim.pipelines.dssm import DSSMConfig
    from dynsim.readouts import readout_accuracy

    settings = {k: v for k, v in cell.items() if k != "kind"}
    config = DSSMConfig.from_dict({**settings, "seed": cell["seed"] or 0, "progress": False, "out": None})
    torch.set_num_threads(1)
    start = time.perf_counter()
    ds, x_train, x_test = prepare_data(config)
    xtr, ytr, xte, yte = readout_sets(config, ds, x_train, x_test)
    out = readout_accuracy(config.readout, xtr, ytr, xte, yte, device=config.device, tol=config.readout_tol)
    return {
        "kind": RAW_PIXELS, "cell": cell, "seed": cell["seed"], "raw_pixel_accuracy": out["accuracy"],
        "readout_seconds": out["readout_seconds"], "readout_converged": out["readout_converged"],
        "wall_seconds": time.perf_counter() - start,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
    }


def attach_baseline(cells: list[dict[str, Any]], baselines: list[dict[str, Any]], *,
                    seed_of: Callable[[dict[str, Any]], Any] = lambda c: c["seed"]) -> list[dict[str, Any]]:
    """Each network cell's result with the raw-pixel accuracy of its readout sets: the study's one
    baseline (``seed`` None), or its seed's (``seed_of(result)``) when the sets are seeded
    subsamples. A result that computed its own (cell files written before the baseline was a cell
    of its own) keeps it."""
    by_seed = {b["seed"]: b["raw_pixel_accuracy"] for b in baselines}
    return [c if c.get("raw_pixel_accuracy") is not None else
            {**c, "raw_pixel_accuracy": by_seed.get(seed_of(c), by_seed.get(None))} for c in cells]
