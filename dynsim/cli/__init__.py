"""Command line: ``dynsim run dssm|ssl``, ``dynsim study ...``, ``dynsim bench solvers``, ``dynsim plot ...``.

One module per command family: :mod:`.dssm` (``run dssm``), :mod:`.ssl` (``run ssl``,
``study ssl``), :mod:`.studies` (``bench solvers``, ``study convergence|repro``, ``plot
trajectories``), :mod:`.deep` (``study deep``); :mod:`.common` holds what they share.

Every command that trains or measures writes a JSON result (``--out``, default under
``runs/``) and PNG plots beside it. Bad settings exit with status 2 and a message that
names the value and the fix.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from contextlib import ExitStack, redirect_stdout

from dynsim.cli.common import SettingRefused, command_group, print_table
from dynsim.config import add_config_everywhere, parse_args_with_config
from dynsim.errors import DynsimError

__all__ = ["build_parser", "command_group", "main", "print_table"]


def build_parser() -> argparse.ArgumentParser:
    from dynsim import __version__

    parser = argparse.ArgumentParser(prog="dynsim", description="Continuous-time Hebbian network simulator")
    parser.add_argument("--version", action="version", version=f"dynsim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and evaluate a pipeline")
    run_sub = run.add_subparsers(dest="pipeline", required=True)
    from dynsim.cli import deep, dssm, nps, ssl, studies

    dssm.register(run_sub)
    studies.register(sub)
    deep.register(sub)
    nps.register(sub)
    ssl.register(sub, run_sub)
    add_output_flags(parser)  # --overwrite, --resume, --plot-format on every command that writes
    add_config_everywhere(parser)  # --config FILE on every command (dynsim.config)
    return parser


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """Give every command with an :class:`~dynsim.outputs.OutputSpec` (``set_defaults(output=...)``)
    ``--overwrite``, ``--resume`` where it can continue a run, and ``--plot-format`` where it
    draws plots (unless it defines them itself)."""
    from dynsim.config import _leaves
    from dynsim.results import PLOT_FORMATS

    for leaf in _leaves(parser):
        spec = leaf.get_default("output")
        if spec is None:
            continue
        dests = {a.dest for a in leaf._actions}
        if "overwrite" not in dests:
            leaf.add_argument("--overwrite", action="store_true",
                              help="replace the result in --out (and delete its checkpoint or cells); "
                                   "without it an existing result or unfinished run is refused")
        if spec.can_resume and "resume" not in dests:
            leaf.add_argument("--resume", action="store_true",
                              help="continue the unfinished run in --out (finished cells are reused)")
        if spec.plots and "plot_format" not in dests:
            leaf.add_argument("--plot-format", default="png", metavar="FMT[,FMT]",
                              help=f"plot file formats, among {', '.join(PLOT_FORMATS)} (default: %(default)s)")


def _run(args: argparse.Namespace) -> int:
    """Run the chosen command with its output claimed (checked, locked) and plot formats set."""
    from dynsim.results import plot_formats

    with ExitStack() as stack:
        if getattr(args, "format", "text") == "csv":  # stdout holds the CSV table only
            args._stdout = sys.stdout
            stack.enter_context(redirect_stdout(sys.stderr))
        if getattr(args, "plot_format", None):
            stack.enter_context(plot_formats(args.plot_format.split(",")))
        spec = getattr(args, "output", None)
        if spec is not None:
            stack.enter_context(spec.claim(args))
        if getattr(args, "kernels", False) and str(getattr(args, "device", "cpu")).startswith("cpu"):
            from dynsim.warmup import warm_up

            warm_up()  # compile (announced) or load the kernels before any progress bar starts
        return args.func(args)


class _CurrentStderr(logging.StreamHandler):
    """A stderr handler that writes to whatever ``sys.stderr`` is *now* (not the stream it was
    created with): ``main`` may be called many times in one process (tests, notebooks) while
    ``sys.stderr`` is replaced and closed in between."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property ignores it
        pass


def _configure_logging() -> None:
    """Library messages (``logging``) go to stderr as plain lines; the CLI prints results."""
    logger = logging.getLogger("dynsim")
    if not any(isinstance(h, _CurrentStderr) for h in logger.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = None
    try:
        args = parse_args_with_config(parser, argv)
        _configure_logging()
        return _run(args)
    except (DynsimError, SettingRefused) as exc:
        print(f"dynsim: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # an optional extra that is not installed
        extra = {"torchdiffeq": "adapters", "torchode": "adapters", "ray": "ray", "pandas": ""}.get(exc.name or "")
        hint = f"pip install 'dynsim[{extra}]'" if extra else f"pip install {exc.name}"
        print(f"dynsim: error: this needs the package {exc.name!r}, which is not installed: {hint}", file=sys.stderr)
        return 2
    except OSError as exc:  # an I/O error no check foresaw: one line, not a traceback
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"dynsim: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resumable = getattr(args, "checkpoint_every", 0) and getattr(args, "out", None)
        hint = "; rerun the same command with --resume to continue from the last checkpoint" if resumable else ""
        print(f"dynsim: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
