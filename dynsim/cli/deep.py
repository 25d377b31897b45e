"""CLI of ``dynsim study deep`` (the study itself: :mod:`dynsim.studies.deep`; its settings are
described once, as the fields of :class:`~dynsim.studies.deep.DeepStudyConfig`)."""

from __future__ import annotations

import argparse


def _config(args: argparse.Namespace):
    """The study's settings from the parsed flags (``--out`` already set by the OutputSpec)."""
    from dynsim.cli.common import parse_set_overrides
    from dynsim.settings import described
    from dynsim.studies.deep import DeepStudyConfig

    base = parse_set_overrides(args.set)
    values = {f.name: getattr(args, f.name) for f in described(DeepStudyConfig) if hasattr(args, f.name)}
    config = DeepStudyConfig(**values, base=base)
    return config


def check_settings(args: argparse.Namespace) -> None:
    """Every cell's settings, before the output is claimed (a bad setting deletes nothing)."""
    from dynsim.studies.deep import validate

    validate(_config(args))


def cmd_study_deep(args: argparse.Namespace) -> int:
    from dynsim.studies.deep import run_deep_study

    result = run_deep_study(_config(args))
    print(result["table"])
    for key, path in result.get("files", {}).items():
        print(f"{key}: {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``dynsim study deep`` to the top-level subparsers ``sub``."""
    from dynsim.cli.common import add_settings, command_group
    from dynsim.outputs import OutputSpec, timestamped
    from dynsim.studies.deep import DeepStudyConfig, cells_dir

    p = command_group(sub, "study", "studies over grids of settings").add_parser(
        "deep", help="1, 2, 3 layers x streaming x cap x seeds: every layer's readout, saturation, settling")
    add_settings(p, DeepStudyConfig)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other run-dssm setting for every cell")
    p.set_defaults(func=cmd_study_deep, output=OutputSpec(
        timestamped("deep", "data"), related=lambda out: [cells_dir(out)], can_resume=True, validate=check_settings))
