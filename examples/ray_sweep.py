"""A parameter sweep, on local processes or on a Ray cluster.

:func:`dynsim.sweeps.run_grid` runs a top-level function once per cell (a dict of settings),
saves each finished cell's result at once (so an interrupted sweep resumes where it stopped)
and returns the results in cell order. ``backend="local"`` (the default here) uses worker
processes on this machine; ``backend="ray"`` sends each cell to Ray as a task (``pip install
'dynsim[ray]'``; ``ray_address`` joins a running cluster, else Ray starts locally).

The sweep: how many Euler steps (seed schedule) and per-site Newton steps a structured layer
needs to settle to each threshold T, on the same 20 digits.

Run: ``python examples/ray_sweep.py [--backend ray] [--out runs/sweep]``
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import dynsim
from dynsim.sweeps import run_grid


def settle_cell(cell: dict) -> dict:
    """One cell: settle 20 test digits with ``cell["solver"]`` to ``cell["threshold"]``."""
    from dynsim.data import center_per_image, load_digits

    torch.set_num_threads(1)
    x = torch.as_tensor(center_per_image(load_digits().x_test[:20]))
    layer = dynsim.HebbianLayer((1, 8, 8), nps=4, stride=2, radius=3.0, seed=0)
    stop = dynsim.RelativeChange(cell["threshold"]) | dynsim.MaxSteps(3000)
    with torch.no_grad():
        res = dynsim.settle(layer, x, solver=dynsim.make_solver(cell["solver"]), stop=stop)
    return {"mean_steps": float(res.steps.double().mean()), "settled": float(res.converged.double().mean())}


def main(quick: bool = False, backend: str = "local", out: str | None = None, workers: int | None = None) -> list:
    """Run the sweep; return one row per cell (its settings and result)."""
    cells = [{"solver": s, "threshold": t} for s in ("euler", "newton")
             for t in ((1e-2, 1e-4) if quick else (1e-2, 1e-3, 1e-4, 1e-5))]
    folder = Path(out) if out else Path(tempfile.mkdtemp(prefix="dynsim-sweep-"))
    results = run_grid(cells, settle_cell, results_dir=folder, backend=backend,
                       workers=1 if quick else workers, progress=not quick)
    rows = [{**c, **r} for c, r in zip(cells, results, strict=True)]
    for row in rows:
        print(f"{row['solver']:>7}  T = {row['threshold']:<7g} mean steps {row['mean_steps']:7.1f}  "
              f"settled {100 * row['settled']:.0f} %")
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="local", choices=("local", "ray"))
    p.add_argument("--out", default=None, help="folder of the per-cell results (default: a temp folder)")
    p.add_argument("--workers", type=int, default=None)
    a = p.parse_args()
    main(backend=a.backend, out=a.out, workers=a.workers)
