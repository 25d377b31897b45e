"""``dynsim run dssm``: the flags of :class:`~dynsim.configs.dssm.DSSMConfig` and the command."""

from __future__ import annotations

import argparse
import time
from dataclasses import fields
from pathlib import Path

from dynsim.checkpoint import check_resume
from dynsim.cli.common import add_settings, checkpoint_of
from dynsim.config import add_config_argument, reject_unknown
from dynsim.errors import ConfigError
from dynsim.outputs import OutputSpec, timestamped


def add_dssm_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``dynsim run dssm``: one per :class:`~dynsim.configs.dssm.DSSMConfig` field
    (generated from its description), plus ``--seeds``/``--workers``, ``--resume`` and ``--config``."""
    from dynsim.configs.dssm import DSSMConfig

    add_settings(p, DSSMConfig)
    g = next(group for group in p._action_groups if group.title == "run")
    g.add_argument("--seeds", default=None, metavar="LIST",
                   help="run once per seed (e.g. 0,1,2 or 0-4), in parallel, and report mean ± s.e. over seeds; "
                        "each seed's result lies in <out stem>_seeds/")
    g.add_argument("--workers", type=int, default=None, help="with --seeds: processes (default: min(seeds, 2))")
    g.add_argument("--resume", action="store_true",
                   help="continue the run whose result is --out from its checkpoint (same final numbers)")
    add_config_argument(p)


def config_from_args(args: argparse.Namespace):
    """The :class:`~dynsim.configs.dssm.DSSMConfig` of parsed arguments (flags over the config
    file over the defaults; ``extra`` from the config file only)."""
    from dynsim.configs.dssm import DSSMConfig

    names = [f.name for f in fields(DSSMConfig)]
    from_file = dict(getattr(args, "config_values", {}))
    reject_unknown(from_file, names, source=f"config file {args.config}")
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(from_file)  # settings without a flag (extra)
    check_resume(getattr(args, "resume", False), values.get("out"))
    if not values.get("out"):
        values["out"] = str(Path("runs") / f"dssm-{values['data']}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    return DSSMConfig(**values)


def cmd_run_dssm(args: argparse.Namespace) -> int:
    from dynsim.pipelines.dssm import run_dssm

    config = config_from_args(args)
    if args.seeds is not None:
        return _run_dssm_seeds(config, args)
    result = run_dssm(config, resume=args.resume)
    f = result["final"]
    acc, raw = f["test_accuracy"], f["raw_pixel_accuracy"]
    raw_text = "no raw-pixel baseline" if raw is None else f"raw pixels {100 * raw:.2f} %"
    print(
        f"test accuracy {100 * acc:.2f} % ({raw_text}), "
        f"mean iterations {f['mean_iterations']:.1f}, converged {100 * f['fraction_converged']:.1f} %, "
        f"train {f['train_seconds']:.1f} s, eval {f['eval_seconds']:.1f} s"
        if acc is not None
        else "no evaluation was run"
    )
    for key, path in result.get("files", {}).items():
        print(f"{key}: {path}")
    return 0


def _run_dssm_seeds(config, args: argparse.Namespace) -> int:
    from dynsim.studies.seeds import parse_seeds, run_dssm_seeds

    seeds = parse_seeds(args.seeds)
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    result = run_dssm_seeds(config, seeds, workers=args.workers)
    f = result["final"]
    n = f["n_seeds"]

    def pm(mean, sem, unit="%"):
        return f"{100 * mean:+.2f} {unit}" if unit == "pt" and sem is None else (
            f"{100 * mean:.2f}" + (f" ± {100 * sem:.2f} {unit}" if sem is not None else f" {unit} (one seed)"))

    print(f"test accuracy {pm(f['test_accuracy_mean'], f['test_accuracy_sem'])} (mean ± s.e. over {n} seeds: "
          + ", ".join(f"{100 * a:.2f}" for a in f["test_accuracy_per_seed"]) + ")")
    raw = f["raw_pixel_accuracy"]
    if isinstance(raw, float):
        print(f"raw pixels {100 * raw:.2f} %; gain over raw pixels "
              f"{pm(f['gain_over_raw_mean'], f['gain_over_raw_sem'], 'pt')} (paired, same split)")
    for key, path in result.get("files", {}).items():
        print(f"{key}: {path}")
    return 0


def register(run_sub: argparse._SubParsersAction) -> None:
    """Add ``dynsim run dssm`` to the ``run`` subcommands ``run_sub``."""
    dssm = run_sub.add_parser("dssm", help="similarity-matching network (Obeid et al. 2019)")
    add_dssm_arguments(dssm)
    dssm.set_defaults(func=cmd_run_dssm,
                      output=OutputSpec(timestamped("dssm", "data"), related=checkpoint_of, can_resume=True,
                                        validate=lambda args: config_from_args(args).validate()),
                      kernels=True)
