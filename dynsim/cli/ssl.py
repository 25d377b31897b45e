"""``dynsim run ssl`` and ``dynsim study ssl`` (Tang, Yang & Amit 2022): flags and commands.

The pipeline is :func:`dynsim.pipelines.ssl.run_ssl`, the Table-1 study
:func:`dynsim.studies.ssl.run_study`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any

from dynsim.checkpoint import check_resume
from dynsim.cli.common import add_settings, checkpoint_of, command_group, print_table
from dynsim.configs.ssl import SSLConfig
from dynsim.errors import DivergenceError
from dynsim.outputs import OutputSpec, timestamped
from dynsim.pipelines.ssl import run_ssl
from dynsim.sweeps import BACKENDS


def add_run_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``dynsim run ssl`` flags to ``parser``: one per :class:`SSLConfig` field
    (generated from its description), plus ``--checkpoint-every`` and ``--resume``."""
    add_settings(parser, SSLConfig, command="ssl")
    parser.add_argument("--checkpoint-every", type=int, default=1, metavar="K",
                        help="write <out>.ckpt.pt every K epochs and at the end (default: %(default)s; 0: never)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run whose result is --out from its checkpoint (same final numbers)")
    return parser


def config_from_args(args: argparse.Namespace, **override: Any) -> SSLConfig:
    """The :class:`SSLConfig` of parsed arguments (``override`` replaces some)."""
    fields = {f.name for f in dataclasses.fields(SSLConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values.update({k: v for k, v in getattr(args, "config_values", {}).items() if k in fields})  # e.g. flip
    values.update(override)
    return SSLConfig(**values)


def run_from_args(args: argparse.Namespace) -> dict:
    """Run ``dynsim run ssl`` from parsed arguments; writes the JSON and returns it.

    A diverged run writes its JSON and then raises :class:`DivergenceError` with the message.
    """
    config = config_from_args(args)
    resume = getattr(args, "resume", False)
    check_resume(resume, config.out)
    if config.out is None:
        config.out = str(
            Path("runs") / f"ssl-{config.data}-{config.schedule}-{config.rule}-s{config.seed}.json"
        )
    result = run_ssl(
        config, checkpoint_every=getattr(args, "checkpoint_every", 1), resume=resume
    )
    if result["final"]["diverged"]:
        raise DivergenceError(result["final"]["divergence"])
    return result


def add_study_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``dynsim study ssl`` flags (the run flags minus learning schedule, rule and out,
    plus workers, backend, Ray address, seeds and the table's format)."""
    add_settings(parser, SSLConfig, skip=("schedule", "rule", "out"), command="ssl")
    parser.add_argument("--workers", type=int, default=1, help="parallel cells (default: %(default)s)")
    parser.add_argument("--backend", default="local", choices=BACKENDS,
                        help="where cells run: local processes or Ray (default: %(default)s)")
    parser.add_argument("--ray-address", default=None, help="Ray cluster address (implies --backend ray)")
    parser.add_argument("--out", default=None, help="study folder (default: runs/ssl-study-<data>)")
    parser.add_argument("--seeds", default=None, metavar="LIST",
                        help="every row once per seed (e.g. 0,1,2): mean ± s.e. per row (default: --seed alone)")
    parser.add_argument("--format", default="text", choices=("text", "csv"),
                        help="the table printed at the end: Markdown text or CSV (default: %(default)s)")
    return parser

def study_from_args(args: argparse.Namespace) -> dict:
    """Run ``dynsim study ssl`` from parsed arguments."""
    from dynsim.studies.seeds import parse_seeds
    from dynsim.studies.ssl import run_study

    base = config_from_args(args, out=None)
    out_dir = Path(args.out or f"runs/ssl-study-{base.data}")
    seeds = None if getattr(args, "seeds", None) is None else parse_seeds(args.seeds)
    return run_study(
        base,
        out_dir,
        workers=args.workers,
        backend=args.backend,
        ray_address=args.ray_address,
        seeds=seeds,
    )


def cmd_run_ssl(args: argparse.Namespace) -> int:
    if args.epochs == 0:
        logging.getLogger("dynsim").warning(
            "dynsim: --epochs 0 trains nothing: the result is the random-encoder baseline")
    if args.seeds is not None:
        from dynsim.studies.seeds import parse_seeds, run_ssl_seeds

        seeds = parse_seeds(args.seeds)
        result = run_ssl_seeds(config_from_args(args), seeds, workers=args.workers)
        f = result["final"]

        def pm(m, s):
            return "-" if m is None else f"{100 * m:.2f}" + (f" ± {100 * s:.2f}" if s is not None else " (one seed)")

        print(f"test accuracy {pm(f['test_accuracy_mean'], f['test_accuracy_sem'])} %, random encoder "
              f"{pm(f['random_encoder_accuracy_mean'], f['random_encoder_accuracy_sem'])} %, gain "
              f"{pm(f['gain_over_random_mean'], f['gain_over_random_sem'])} pt (mean ± s.e. over {f['n_seeds']} seeds)")
        print(f"result: {result['files']['result']}")
        return 0
    result = run_from_args(args)
    f = result["final"]
    print(f"test accuracy {100 * f['test_accuracy']:.2f} % (linear probe on the frozen encoder), "
          f"train {f['train_seconds']:.1f} s, eval {f['eval_seconds']:.1f} s")
    if result.get("config", {}).get("out"):
        print(f"result: {result['config']['out']}")
    return 0


def cmd_study_ssl(args: argparse.Namespace) -> int:
    summary = study_from_args(args)
    print_table(args, summary, summary["table"])
    return 0


def register(sub: argparse._SubParsersAction, run_sub: argparse._SubParsersAction) -> None:
    """Add ``dynsim run ssl`` and ``dynsim study ssl`` (Tang, Yang & Amit 2022)."""
    from dynsim.studies.ssl import check_study

    run = run_sub.add_parser("ssl", help="self-supervised encoder with local learning rules (Tang et al. 2022)")
    add_run_arguments(run)
    run.add_argument("--seeds", default=None, metavar="LIST",
                     help="run once per seed (e.g. 0,1,2), in parallel, and report mean ± s.e.; needs --out")
    run.add_argument("--workers", type=int, default=None, help="with --seeds: processes (default: min(seeds, 2))")
    run.set_defaults(func=cmd_run_ssl, output=OutputSpec(timestamped("ssl", "data", "schedule", "rule"),
                                                         related=checkpoint_of, can_resume=True, plots=False,
                                                         validate=lambda args: config_from_args(args).validate()))
    study = command_group(sub, "study", help="parameter studies").add_parser(
        "ssl", help="the learning-schedule x update-rule grid of Tang et al. Table 1")
    add_study_arguments(study)
    study.set_defaults(func=cmd_study_ssl, output=OutputSpec(
        lambda args: f"runs/ssl-study-{args.data}", directory=True, can_resume=True,
        validate=lambda args: check_study(config_from_args(args, out=None)) and None,
        result=lambda out: out / "ssl_study.json", related=lambda out: [out / "cells"]))
