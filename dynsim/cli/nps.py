"""CLI of ``dynsim study nps`` (the study itself: :mod:`dynsim.studies.nps`; its settings are
described once, as the fields of :class:`~dynsim.studies.nps.NpsStudyConfig`)."""

from __future__ import annotations

import argparse


def _config(args: argparse.Namespace):
    from dynsim.cli.common import parse_set_overrides
    from dynsim.settings import described
    from dynsim.studies.nps import NpsStudyConfig

    base = parse_set_overrides(args.set)
    values = {f.name: getattr(args, f.name) for f in described(NpsStudyConfig) if hasattr(args, f.name)}
    return NpsStudyConfig(**values, base=base).validate()


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
    from dynsim.cli.common import add_settings, command_group
    from dynsim.outputs import OutputSpec
    from dynsim.studies.nps import NpsStudyConfig

    p = command_group(sub, "study", "studies over grids of settings").add_parser(
        "nps", help="test accuracy vs neurons per site (NpS) x seeds, beside the published MNIST errors")
    add_settings(p, NpsStudyConfig, command="study nps")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other run-dssm setting for every cell")
    p.set_defaults(func=cmd_study_nps, output=OutputSpec(
        lambda args: "runs/nps", directory=True, result=lambda out: out / "nps.json",
        related=lambda out: [out / "cells"], can_resume=True, validate=check_nps_settings))
