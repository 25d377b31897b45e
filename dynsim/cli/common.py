"""Helpers shared by the commands of :mod:`dynsim.cli`: value parsers, command groups,
printed tables, what holds an unfinished run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def optional(kind):
    """``kind``, or None for 'none'/'off' (each flag's help says what None means; 'inf' is a
    number, refused by the range check where it would mean nothing)."""

    def parse(text: str):
        return None if text.lower() in ("none", "off") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def per_layer(kind):
    """``"4"`` -> 4, ``"4,8"`` -> [4, 8] (one value per layer)."""

    def parse(text: str):
        parts = [kind(v) for v in text.split(",") if v.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__} or a comma-separated list, got {text!r}")
        return parts[0] if len(parts) == 1 else parts

    parse.__name__ = kind.__name__
    return parse


def command_group(sub: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    """The subcommands of group ``name`` (``study``, ``bench``, ``plot``), created on first use
    so that several modules can add commands to one group (``dynsim study convergence``,
    ``dynsim study ssl``)."""
    if name not in sub.choices:
        group = sub.add_parser(name, help=help)
        group.set_defaults(_commands=group.add_subparsers(dest=f"{name}_command", required=True))
    return sub.choices[name].get_default("_commands")


def print_table(args: argparse.Namespace, result: dict, text: str) -> None:
    """Print a command's table: ``text`` (Markdown), or with ``--format csv`` the result's
    rows (:func:`dynsim.results.table`) as CSV on the standard output, which then holds
    nothing else (progress went to stderr)."""
    if getattr(args, "format", "text") == "csv":
        from dynsim.results import table

        table(result).to_csv(getattr(args, "_stdout", None) or sys.stdout, index=False)
    else:
        print(text)


def checkpoint_of(out):
    """What holds an unfinished run of ``out``: its checkpoint, and with ``--seeds`` the
    per-seed results and cells in ``<out stem>_seeds/``."""
    from dynsim.checkpoint import checkpoint_path
    from dynsim.studies.seeds import seeds_dir

    return [checkpoint_path(out), seeds_dir(Path(out))]
