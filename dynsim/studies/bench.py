"""``dynsim bench solvers``: every solver on the same network and the same inputs.

For each network state (at init, and after a short training run with the seed's Euler
settings) a tightly converged reference fixed point ``u*`` is computed for every input
(float64, Euler dt = 0.2 to ``‖F(u)‖/‖u‖ < ref_tol``). Then every solver setting settles
the same inputs (float32, as in training) to the same field residual ``T`` and we record
wall time, field evaluations, steps, the residual at stop and the distance
``‖u − u*‖/‖u*‖``. All settings run in one process, in one run, so the ratios against
Euler with the seed's schedule are comparable.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynsim.data import DATASETS
from dynsim.errors import ConfigError
from dynsim.results import result_header
from dynsim.settings import setting
from dynsim.settle import relative_norm, settle
from dynsim.solvers import ConstantStep, make_solver, solver_from_spec
from dynsim.stopping import MaxSteps, ResidualBelow, Status

DEFAULT_SETTINGS = (
    "euler,schedule=seed",
    "euler,schedule=constant:0.5",
    "heun,schedule=seed",
    "heun,schedule=constant:0.8",
    "rk4,schedule=seed",
    "rk4,schedule=constant:1.0",
    "dopri5,rtol=1e-4,atol=1e-6",
    "dopri5,rtol=1e-5,atol=1e-7",
    "anderson,beta=0.1,memory=5",
    "anderson,beta=0.2,memory=5",
    "anderson,beta=0.5,memory=5",
    "anderson,beta=1.0,memory=5",
    "anderson,beta=0.5,memory=10",
    "newton",
    "torchdiffeq,method=dopri5,rtol=1e-5,atol=1e-7,window=2.0",
    "torchode,method=dopri5,rtol=1e-5,atol=1e-7,window=2.0",
)
BASELINE = "euler,schedule=seed"
logger = logging.getLogger(__name__)


def missing_adapters() -> set[str]:
    """The optional adapter libraries (torchdiffeq, torchode: ``dynsim[adapters]``) not installed."""
    import importlib.util

    return {name for name in ("torchdiffeq", "torchode") if importlib.util.find_spec(name) is None}


def available_settings(specs: tuple[str, ...] = DEFAULT_SETTINGS) -> tuple[str, ...]:
    """``specs`` without the library adapters whose library is not installed: the default of
    ``--solvers`` (the built-in list, adapters where installed)."""
    missing = missing_adapters()
    return tuple(s for s in specs if s.split(",", 1)[0] not in missing)


def _states(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``--states init,trained`` (or a config file's list) -> the network states measured."""
    states = tuple(v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip())
    if not states or set(states) - {"init", "trained"}:
        raise ConfigError(f"--states must be among init, trained; got {states}")
    return states


@dataclass
class BenchConfig:
    """Settings of ``dynsim bench solvers``, each described once (flags, ``--help``, config-file
    keys and validation come from the field metadata, :mod:`dynsim.settings`)."""

    data: str = setting("digits", help="data set", choices=DATASETS)
    data_dir: str | None = setting(None, help="directory with the data files", shown_default="None")
    nps: int = setting(4, help="neurons per site")
    solvers: tuple[str, ...] = setting(
        default_factory=available_settings, nargs="+", metavar="SPEC", help="solver specs 'name,key=value,...'",
        shown_default=f"a built-in list of {len(DEFAULT_SETTINGS)} settings, newton included; the torchdiffeq/"
                      "torchode adapters only where installed")
    threshold: float = setting(1e-4, help="field residual T")
    max_steps: int = setting(3000, help="step cap")
    n_inputs: int = setting(100, help="test inputs settled")
    batch_size: int = setting(1, help="inputs settled together (1: online)")
    train_images: int = setting(1000, help="images of the short training run")
    train_threshold: float = setting(1e-4, cli=False, help="field residual T of the short training run")
    states: tuple[str, ...] = setting(("init", "trained"), parse=_states, metavar="STATES",
                                      help="network states to measure, comma-separated", shown_default="init,trained")
    ref_tol: float = setting(1e-9, help="residual of the float64 reference fixed point")
    repeats: int = setting(1, help="time each setting this many times, keep the best")
    accuracy_solvers: tuple[str, ...] = setting((), flag="--accuracy", nargs="+", metavar="SPEC",
                                                help="also train a DSSM network with each of these solvers and "
                                                     "report test accuracy", shown_default="none")
    accuracy_eval_train: int = setting(2000, help="readout train images")
    accuracy_eval_test: int = setting(1000, help="readout test images")
    seed: int = setting(0, help="seed of the weights and the image order")
    threads: int = setting(1, help="torch CPU threads")
    out: str | None = setting(None, help="result JSON path", shown_default="runs/bench-solvers-<data>-<time>.json")
    progress: bool = setting(True, help="no progress output")
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> BenchConfig:
        """Raise :class:`ConfigError` naming the first bad value (the fields' descriptions,
        :func:`dynsim.settings.check_settings`; each solver spec parsed)."""
        from dynsim.settings import check_settings

        if not self.solvers:
            raise ConfigError("give at least one solver setting (--solvers)")
        check_settings(self)
        for name in ("threshold", "max_steps", "train_threshold"):
            if getattr(self, name) is None:
                raise ConfigError(f"--{name.replace('_', '-')} none: bench solvers settles to a fixed threshold "
                                  "and step cap; give a number")
        for spec in (*self.solvers, *self.accuracy_solvers):
            solver_from_spec(spec)
        return self


def reference_fixed_points(layer, x: torch.Tensor, *, tol: float, max_steps: int = 100_000):
    """Tightly converged fixed points in float64 (Euler, dt = 0.2; batched)."""
    ref_layer = copy.deepcopy(layer).double()
    res = settle(
        ref_layer,
        x.double(),
        solver=make_solver("euler", schedule=ConstantStep(0.2)),
        stop=ResidualBelow(tol) | MaxSteps(max_steps),
    )
    return res.u, res


def train_layer(config: BenchConfig, layer, x_train: torch.Tensor) -> dict[str, Any]:
    """A short online training run (Euler, seed schedule, T = ``train_threshold``)."""
    from dynsim.builders import build_dssm, epoch_batches
    from dynsim.configs.dssm import DSSMConfig
    from dynsim.engine import Engine

    # the seed's method and learning rates (DSSMConfig's defaults), Euler at T = train_threshold
    train = DSSMConfig(solver="euler", threshold=config.train_threshold, max_steps=3000, on_divergence="skip")
    net = build_dssm(train, system=layer)
    engine = Engine(net.settler, [net.rule], progress=config.progress, desc="bench: train")
    t0 = time.perf_counter()
    with torch.no_grad():
        engine.fit(
            epoch_batches(x_train, images=config.train_images, batch_size=1, seed=config.seed),
            1,
            images_per_epoch=config.train_images,
        )
    return {"images": config.train_images, "seconds": time.perf_counter() - t0}


def run_setting(
    layer, x: torch.Tensor, u_ref: torch.Tensor, spec: str, config: BenchConfig
) -> dict[str, Any]:
    """Settle ``x`` with one solver setting; measure it against ``u_ref``."""
    stop = ResidualBelow(config.threshold) | MaxSteps(config.max_steps)
    # one untimed warm-up settle: the first call of a code path pays one-off costs (compiled
    # kernels loaded or compiled, caches filled) that would otherwise inflate its row
    settle(layer, x[: config.batch_size], solver=solver_from_spec(spec), stop=stop)
    best = None
    for _ in range(config.repeats):
        solver = solver_from_spec(spec)
        us, steps, status, evals = [], [], [], 0
        t0 = time.perf_counter()
        for start in range(0, x.shape[0], config.batch_size):
            res = settle(layer, x[start : start + config.batch_size], solver=solver, stop=stop)
            us.append(res.u)
            steps.append(res.steps)
            status.append(res.status)
            evals += res.n_evals
        seconds = time.perf_counter() - t0
        best = seconds if best is None else min(best, seconds)
    u = torch.cat(us)
    steps_t, status_t = torch.cat(steps).double(), torch.cat(status)
    drive = layer.drive(x)
    residual = relative_norm(layer.field(u, drive), u).double()
    dist = torch.linalg.vector_norm(u.double() - u_ref, dim=1) / torch.linalg.vector_norm(
        u_ref, dim=1
    )
    n = x.shape[0]
    return {
        "solver": spec,
        "seconds": best,
        "ms_per_input": 1e3 * best / n,
        "evals_per_input": evals / n,
        "mean_steps": float(steps_t.mean()),
        "max_steps": int(steps_t.max()),
        "fraction_settled": float((status_t == Status.SETTLED).double().mean()),
        "diverged": int((status_t == Status.DIVERGED).sum()),
        "residual_median": float(residual.median()),
        "residual_max": float(residual.max()),
        "distance_median": float(dist.median()),
        "distance_max": float(dist.max()),
    }


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Run the benchmark; write JSON + Pareto plot if ``config.out``; return the result."""
    from dynsim.builders import build_layer, prepare_data
    from dynsim.configs.dssm import DSSMConfig

    config.validate()
    missing = missing_adapters()
    if missing and tuple(config.solvers) == available_settings():
        logger.info("bench solvers: %s not installed, left out (pip install 'dynsim[adapters]')",
                    " and ".join(sorted(missing)))
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    dcfg = DSSMConfig(data=config.data, data_dir=config.data_dir, nps=config.nps, seed=config.seed).validate()
    ds, x_train, x_test = prepare_data(dcfg)
    layer = build_layer(dcfg, ds.image_shape)
    rng = np.random.default_rng(config.seed)
    idx = np.sort(rng.choice(len(x_test), size=min(config.n_inputs, len(x_test)), replace=False))
    x = torch.as_tensor(x_test[idx])
    result: dict[str, Any] = {
        **result_header("bench solvers", config),
        "data": {"name": ds.name, "n_inputs": int(x.shape[0]), "n_neurons": layer.state_size},
        "baseline": BASELINE,
        "states": {},
    }
    for state in ("init", "trained"):
        if state == "trained":
            if "trained" not in config.states:
                break
            result["training"] = train_layer(config, layer, torch.as_tensor(x_train))
        if state not in config.states:
            continue
        with torch.no_grad():
            u_ref, ref = reference_fixed_points(layer, x, tol=config.ref_tol)
            rows = []
            for spec in config.solvers:
                row = run_setting(layer, x, u_ref, spec, config)
                rows.append(row)
                if config.progress:
                    logger.info("  [%s] %s", state, format_row(row))
        base = next((r for r in rows if r["solver"] == BASELINE), None)
        for row in rows:
            if base is not None:
                row["speedup_vs_baseline"] = base["seconds"] / row["seconds"]
                row["evals_ratio_vs_baseline"] = base["evals_per_input"] / max(
                    row["evals_per_input"], 1e-12
                )
        result["states"][state] = {
            "reference": {
                "tol": config.ref_tol,
                "settled": float(ref.converged.double().mean()),
                "mean_steps": float(ref.steps.double().mean()),
            },
            "rows": rows,
        }
    if config.accuracy_solvers:
        result["accuracy"] = downstream_accuracy(config)
    if config.out:
        result["files"] = write_bench_outputs(result, Path(config.out))
    return result


def downstream_accuracy(config: BenchConfig) -> list[dict[str, Any]]:
    """Train a DSSM network with each of ``accuracy_solvers`` (``train_images`` images, the
    bench's T and cap, same seed) and read it out; one :func:`run_grid` cell per solver."""
    import tempfile

    from dynsim.studies.convergence import resolve_cell, train_cell
    from dynsim.sweeps import run_grid

    cells = [
        {
            "data": config.data,
            "data_dir": config.data_dir,
            "nps": config.nps,
            "solver": spec,
            "threshold": config.threshold,
            "max_steps": config.max_steps,
            "epochs": 1,
            "images_per_epoch": max(config.train_images, 1),
            "eval_every": 1,
            "eval_train_size": config.accuracy_eval_train,
            "eval_test_size": config.accuracy_eval_test,
            "seed": config.seed,
        }
        for spec in config.accuracy_solvers
    ]
    if config.out:
        out = Path(config.out)
        cells_dir = out.with_name(out.stem + "_accuracy_cells")
    else:
        cells_dir = Path(tempfile.mkdtemp(prefix="dynsim-bench-"))
    rows = []
    for cell, res in zip(
        cells,
        run_grid(cells, train_cell, results_dir=cells_dir, workers=1, progress=config.progress,
                 resolve=resolve_cell),
        strict=True,
    ):
        f = res["final"]
        rows.append(
            {
                "solver": cell["solver"],
                "test_accuracy": f["test_accuracy"],
                "raw_pixel_accuracy": f["raw_pixel_accuracy"],
                "train_seconds": f["train_seconds"],
                "eval_seconds": f["eval_seconds"],
                "train_evals": res["train_evals"],
                "mean_iterations": f["mean_iterations"],
                "fraction_converged": f["fraction_converged"],
            }
        )
    return rows


def format_row(row: dict[str, Any]) -> str:
    return (
        f"{row['solver']:<58} {row['ms_per_input']:9.2f} ms {row['evals_per_input']:9.1f} ev "
        f"{row['mean_steps']:8.1f} st  res {row['residual_max']:.1e}  "
        f"dist {row['distance_max']:.1e}  "
        f"settled {100 * row['fraction_settled']:5.1f}%"
    )


def format_table(result: dict[str, Any]) -> str:
    """Markdown table of every state and setting."""
    lines = []
    for state, block in result["states"].items():
        lines.append(
            f"\n{state} network ({result['data']['name']}, {result['data']['n_inputs']} inputs, "
            f"batch {result['config']['batch_size']}, T = {result['config']['threshold']}):\n"
        )
        lines.append(
            "| solver | ms/input | evals/input | steps | settled | max residual | max dist to u* "
            "| speed-up vs Euler seed |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in block["rows"]:
            lines.append(
                f"| `{r['solver']}` | {r['ms_per_input']:.2f} | {r['evals_per_input']:.1f} | "
                f"{r['mean_steps']:.1f} | {100 * r['fraction_settled']:.0f} % | "
                f"{r['residual_max']:.1e} | "
                f"{r['distance_max']:.1e} | {r.get('speedup_vs_baseline', float('nan')):.2f}× |"
            )
    if result.get("accuracy"):
        c = result["config"]
        lines.append(
            f"\ndownstream accuracy: DSSM trained on {c['train_images']} images with each solver "
            f"(T = {c['threshold']}), LinearSVC on "
            f"{c['accuracy_eval_train']}/{c['accuracy_eval_test']} "
            "train/test images:\n"
        )
        lines.append(
            "| solver | test accuracy | train s | evals in training | mean steps | converged |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|")
        for r in result["accuracy"]:
            lines.append(
                f"| `{r['solver']}` | {100 * r['test_accuracy']:.2f} % | "
                f"{r['train_seconds']:.1f} | "
                f"{r['train_evals']} | {r['mean_iterations']:.1f} | "
                f"{100 * r['fraction_converged']:.0f} % |"
            )
    return "\n".join(lines)


def write_bench_outputs(result: dict[str, Any], out: Path) -> dict[str, str]:
    """The bench JSON and its Pareto plot, written as one set."""
    from dynsim.plots import plot_solver_pareto
    from dynsim.results import write_result

    return write_result(out, result, {"pareto_plot": ("_pareto", plot_solver_pareto(result))})
