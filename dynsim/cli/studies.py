"""CLI of the solver studies: ``dynsim bench solvers``, ``dynsim study convergence``,
``dynsim plot trajectories`` and ``dynsim sweep`` (registered by :func:`register`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dynsim.outputs import OutputSpec, timestamped


def cells_dir(out: Path) -> Path:
    """The per-cell result folder of a convergence study writing ``out``."""
    from dynsim.studies.convergence import cells_dir as study_cells_dir

    return study_cells_dir(out)


def _default_out(kind: str, data: str) -> str:
    return str(Path("runs") / f"{kind}-{data}-{time.strftime('%Y%m%d-%H%M%S')}.json")


# --- bench solvers -------------------------------------------------------------------
def _bench_config(args: argparse.Namespace):
    """The :class:`BenchConfig` of parsed ``bench solvers`` arguments (``train_threshold``, which
    has no flag, from a config file)."""
    from dynsim.studies.bench import BenchConfig

    extra = {k: v for k, v in getattr(args, "config_values", {}).items() if k == "train_threshold"}
    config = _from_args(BenchConfig, args, **extra)
    config.solvers, config.accuracy_solvers = tuple(config.solvers), tuple(config.accuracy_solvers)
    if not config.out:
        config.out = _default_out("bench-solvers", config.data)
    return config


def cmd_bench_solvers(args: argparse.Namespace) -> int:
    from dynsim.studies.bench import format_table, run_bench

    config = _bench_config(args)
    result = run_bench(config)
    from dynsim.cli.common import print_table

    print_table(args, result, format_table(result))
    for key, path in result.get("files", {}).items():
        print(f"{key}: {path}")
    return 0


# --- plot trajectories ---------------------------------------------------------------
def _trajectory_config(args: argparse.Namespace):
    """The :class:`TrajectoryConfig` of parsed ``plot trajectories`` arguments."""
    from dynsim.studies.trajectories import TrajectoryConfig

    config = _from_args(TrajectoryConfig, args)
    config.solvers, config.inputs = tuple(config.solvers), tuple(config.inputs)
    if not config.out:
        config.out = _default_out("trajectories", config.data)
    return config


def cmd_plot_trajectories(args: argparse.Namespace) -> int:
    from dynsim.studies.trajectories import run_trajectories

    config = _trajectory_config(args)
    result = run_trajectories(config)
    for key, path in result.get("files", {}).items():
        print(f"{key}: {path}")
    return 0


# --- study convergence ---------------------------------------------------------------
def _from_args(cls, args: argparse.Namespace, **values):
    """An instance of settings dataclass ``cls`` from parsed arguments: every described field
    from its flag (or a config file's key), ``values`` for the others."""
    from dynsim.settings import described

    return cls(**{f.name: getattr(args, f.name) for f in described(cls) if hasattr(args, f.name)}, **values)


def _convergence_config(args: argparse.Namespace):
    """The :class:`ConvergenceConfig` of parsed ``study convergence`` arguments."""
    from dynsim.studies.convergence import ConvergenceConfig

    base = {}
    for item in args.set or []:
        key, _, value = item.partition("=")
        base[key.replace("-", "_")] = value
    config = _from_args(ConvergenceConfig, args, base=base)
    if not config.out:
        config.out = _default_out("convergence", config.data)
    return config


def check_convergence_settings(args: argparse.Namespace) -> None:
    """Every setting of ``study convergence`` and of each of its cells, before the output is claimed."""
    from dynsim.pipelines.dssm import DSSMConfig

    config = _convergence_config(args).validate()
    for cell in config.cells():
        DSSMConfig.from_dict({**cell, "progress": False}).validate()


def cmd_study_convergence(args: argparse.Namespace) -> int:
    from dynsim.studies.convergence import run_convergence

    result = run_convergence(_convergence_config(args))
    if getattr(args, "format", "text") == "csv":
        from dynsim.cli.common import print_table

        print_table(args, result, "")
        return 0
    for row in result["summary"]:
        m, s = row["test_accuracy_mean"], row["test_accuracy_sem"]
        acc = "-" if m is None else f"{100 * m:.2f}" + (f" ± {100 * s:.2f} %" if s is not None else " % (one seed)")
        print(f"T={row['threshold']!s:<7} cap={row['max_steps']!s:<5} stream={row['stream_every']!s:<5} "
              f"acc={acc} iters={row['mean_iterations']:.1f}")
    for key, path in result.get("files", {}).items():
        print(f"{key}: {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the commands of this module to the top-level subparsers ``sub``."""
    from dynsim.cli.common import add_settings, command_group

    bench = command_group(sub, "bench", "measure solvers and code paths")
    p = bench.add_parser(
        "solvers", help="every solver on the same network and inputs: time, evals, accuracy"
    )
    from dynsim.studies.bench import BenchConfig

    add_settings(p, BenchConfig)
    p.add_argument("--format", default="text", choices=("text", "csv"),
                   help="the table printed at the end: Markdown text or CSV (default: %(default)s)")
    p.set_defaults(func=cmd_bench_solvers, kernels=True, output=OutputSpec(
        timestamped("bench-solvers", "data"), related=lambda out: [out.with_name(out.stem + "_accuracy_cells")],
        validate=lambda args: _bench_config(args).validate()))

    plot = command_group(sub, "plot", "plots of settling dynamics")
    p = plot.add_parser(
        "trajectories", help="unit trajectories and residual vs step, solvers overlaid"
    )
    from dynsim.studies.trajectories import TrajectoryConfig

    add_settings(p, TrajectoryConfig)
    p.set_defaults(func=cmd_plot_trajectories, kernels=True, output=OutputSpec(
        timestamped("trajectories", "data"), validate=lambda args: _trajectory_config(args).validate()))

    study = command_group(sub, "study", "studies over grids of settings")
    p = study.add_parser(
        "convergence", help="accuracy vs threshold T, step cap and streaming (DSSM)"
    )
    from dynsim.studies.convergence import ConvergenceConfig

    add_settings(p, ConvergenceConfig)
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="any other DSSM setting for every cell"
    )
    p.add_argument("--format", default="text", choices=("text", "csv"),
                   help="the per-cell lines printed at the end: text or CSV (default: %(default)s)")
    p.set_defaults(func=cmd_study_convergence, output=OutputSpec(
        timestamped("convergence", "data"), related=lambda out: [cells_dir(out)], can_resume=True,
        validate=check_convergence_settings))

    # --- study repro --------------------------------------------------------------------
    p = study.add_parser("repro", help="the reproduction report's settings and its Figures 1 and 2 (DSSM)")
    from dynsim.studies.repro import ReproConfig

    add_settings(p, ReproConfig)
    p.set_defaults(func=cmd_study_repro, output=OutputSpec(
        lambda args: "runs/repro", directory=True, result=lambda out: out / "repro.json",
        related=lambda out: [out / "cells"], can_resume=True, validate=check_repro_settings))


def check_repro_settings(args: argparse.Namespace) -> None:
    """Every setting of ``study repro`` and of each of its cells, before the output is claimed."""
    from dynsim.pipelines.dssm import DSSMConfig

    for cell in _repro_config(args).cells():
        DSSMConfig.from_dict(cell["config"]).validate()


def _repro_config(args: argparse.Namespace):
    """The :class:`ReproConfig` of parsed ``study repro`` arguments, checked."""
    from dynsim.studies.repro import ReproConfig

    return _from_args(ReproConfig, args).validate()


def cmd_study_repro(args: argparse.Namespace) -> int:
    from dynsim.studies.repro import run_repro

    study = run_repro(_repro_config(args))
    print(f"{'setting':<20} {'seeds':>6} {'final %':>16} {'best %':>16} {'best epoch':>10} {'iterations':>10}")
    def pm(m, e):
        return f"{100 * m:.2f}" + (f" ± {100 * e:.2f}" if e is not None else " (1 seed)")

    for name, s in study["settings"].items():
        print(f"{name:<20} {len(s['seeds']):>6} {pm(s['final_mean'], s['final_sem']):>16} "
              f"{pm(s['best_mean'], s['best_sem']):>16} {str(s['best_epoch_per_seed']):>10} "
              f"{s['mean_iterations']:>10.1f}")
    raw = next(iter(study["settings"].values()))["raw_pixel_accuracy"]
    print(f"raw pixels {100 * raw:.2f} %; wall {study['wall_seconds']:.0f} s")
    for key, path in study["files"].items():
        print(f"{key}: {path}")
    return 0
