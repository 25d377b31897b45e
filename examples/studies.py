"""The three studies from Python: solver benchmark, settling trajectories, convergence grid.

Each study is a config dataclass and a ``run_*`` function that returns the result dict (and
writes the JSON and plots when ``out`` is set); :func:`dynsim.results.load` turns a result into a
pandas table. The CLI commands ``dynsim bench solvers``, ``dynsim plot trajectories`` and
``dynsim study convergence`` are these calls.

Run: ``python examples/studies.py [--out runs/examples]`` (small settings on the embedded digits).
"""

from __future__ import annotations

import sys
from pathlib import Path

from dynsim.results import table
from dynsim.studies.bench import BenchConfig, run_bench
from dynsim.studies.convergence import ConvergenceConfig, run_convergence
from dynsim.studies.trajectories import TrajectoryConfig, run_trajectories


def main(quick: bool = False, out: str | None = None) -> dict:
    """Run the three studies on digits; return their tables (pandas DataFrames)."""
    folder = Path(out) if out else None
    path = (lambda name: str(folder / name)) if folder else (lambda name: None)

    bench = run_bench(BenchConfig(solvers=("euler,schedule=seed", "newton", "anderson,beta=0.5,memory=5"),
                                  n_inputs=10 if quick else 100, states=("init",), progress=False,
                                  out=path("bench.json")))
    trajectories = run_trajectories(TrajectoryConfig(solvers=("euler,schedule=seed", "rk4,schedule=constant:1.0"),
                                                     inputs=(0,), progress=False, out=path("trajectories.json")))
    convergence = run_convergence(ConvergenceConfig(
        thresholds=[1e-2, 1e-4], caps=[1, 100], streams=[None], epochs=1,
        images_per_epoch=50 if quick else 500, eval_train_size=200, eval_test_size=100, readout="svc",
        workers=1, progress=False, out=path("convergence.json")))
    tables = {"bench": table(bench), "trajectories": table(trajectories), "convergence": table(convergence)}
    print(tables["bench"][["state", "solver", "ms_per_input", "evals_per_input", "fraction_settled"]])
    print(tables["trajectories"][["input", "solver", "steps", "status"]])
    print(tables["convergence"].pivot_table("test_accuracy", "threshold", "max_steps"))
    return tables


if __name__ == "__main__":
    main(out=sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None)
