"""CLI of ``dynsim study nps`` (the study itself: :mod:`dynsim.studies.nps`)."""

from __future__ import annotations

import argparse


def _config(args: argparse.Namespace):
    import json

    from dynsim.errors import ConfigError
    from dynsim.settings import check_value
    from dynsim.studies.nps import NpsStudyConfig
    from dynsim.studies.seeds import parse_seeds

    try:
        nps = [int(v) for v in args.nps.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--nps expects a comma-separated list of integers, e.g. 4,8,16, got {args.nps!r}") from None
    for name in ("epochs", "images_per_epoch", "threshold", "workers", "eval_train_size", "eval_test_size"):
        check_value(name, getattr(args, name), command="study nps")
    base = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            base[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            base[key.replace("-", "_")] = value
    return NpsStudyConfig(
        data=args.data, data_dir=args.data_dir, nps=nps, seeds=parse_seeds(args.seeds), epochs=args.epochs,
        images_per_epoch=args.images_per_epoch, threshold=args.threshold, solver=args.solver, readout=args.readout,
        eval_train_size=args.eval_train_size, eval_test_size=args.eval_test_size, base=base, workers=args.workers,
        backend=args.backend, ray_address=args.ray_address, out=args.out, progress=args.progress,
    )


def check_nps_settings(args: argparse.Namespace) -> None:
    """Every setting of ``study nps`` and of each of its cells, before the output is claimed."""
    from dynsim.pipelines.dssm import DSSMConfig

    for cell in _config(args).cells():
        DSSMConfig.from_dict({**cell, "progress": False}).validate()


def cmd_study_nps(args: argparse.Namespace) -> int:
    from dynsim.studies.nps import run_nps_study

    study = run_nps_study(_config(args))
    print(study["table"])
    print("published: MNIST test error (Obeid et al. 2019); ours:", study["data"])
    for key, path in study.get("files", {}).items():
        print(f"{key}: {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``dynsim study nps`` to the top-level subparsers ``sub``."""
    from dynsim.cli.common import command_group
    from dynsim.data import DATASETS
    from dynsim.evaluation import READOUTS
    from dynsim.outputs import OutputSpec
    from dynsim.studies.nps import NpsStudyConfig

    d = NpsStudyConfig()
    p = command_group(sub, "study", "studies over grids of settings").add_parser(
        "nps", help="test accuracy vs neurons per site (NpS) x seeds, beside the published MNIST errors")
    p.add_argument("--data", default=d.data, choices=DATASETS, help="data set (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="directory of MNIST/CIFAR files")
    p.add_argument("--nps", default=",".join(map(str, d.nps)), help="NpS values (default: %(default)s)")
    p.add_argument("--seeds", default=",".join(map(str, d.seeds)), help="seeds (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs of training (default: %(default)s)")
    p.add_argument("--images-per-epoch", type=int, default=d.images_per_epoch)
    p.add_argument("--threshold", type=float, default=d.threshold, help="T (default: %(default)s)")
    p.add_argument("--solver", default=d.solver, help="solver spec (default: auto = newton / newton-cg by NpS)")
    p.add_argument("--readout", default=d.readout, choices=READOUTS, help="linear readout (default: svc)")
    p.add_argument("--eval-train-size", type=int, default=None, help="readout train images (default: all)")
    p.add_argument("--eval-test-size", type=int, default=None, help="readout test images (default: all)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other run-dssm setting for every cell")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--backend", default="local", choices=("local", "ray"))
    p.add_argument("--ray-address", default=None, help="Ray cluster address (implies --backend ray)")
    p.add_argument("--out", default=None, help="output folder: nps.json, nps.png, cells/ (default: runs/nps)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress output")
    p.set_defaults(func=cmd_study_nps, output=OutputSpec(
        lambda args: "runs/nps", directory=True, result=lambda out: out / "nps.json",
        related=lambda out: [out / "cells"], can_resume=True, validate=check_nps_settings))
