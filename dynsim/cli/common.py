"""Helpers shared by the commands of :mod:`dynsim.cli`: flags generated from a settings
dataclass (:func:`add_settings`), command groups, printed tables, what holds an unfinished run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dynsim.errors import ConfigError


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


class SettingRefused(Exception):
    """A flag's value refused by its setting's description (carries the :class:`ConfigError`).

    Not a ``ValueError``, so that argparse lets it through instead of replacing the message
    with its own: :func:`dynsim.cli.main` prints the same one line as for a config-file value."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def _flag_type(parse):
    def convert(text):
        try:
            return parse(text)
        except ConfigError as exc:
            raise SettingRefused(exc) from None

    convert.__name__ = parse.__name__
    convert.typed = True  # also takes a config file's typed value (dynsim.config)
    return convert


class _Deprecated(argparse.Action):
    """An older spelling of a flag: stores like the new one and says which one to use."""

    def __init__(self, option_strings, dest, new_flag: str = "", **kwargs):
        self.new_flag = new_flag
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        warned = getattr(namespace, "_deprecated_warned", set())
        if option_string not in warned:
            print(f"dynsim: warning: {option_string} is deprecated; use {self.new_flag}", file=sys.stderr)
            namespace._deprecated_warned = warned | {option_string}
        setattr(namespace, self.dest, values)


def _help(f, command: str | None = None) -> str:
    from dynsim.settings import default_of, meta_of, range_of

    meta = meta_of(f)
    text = meta.help.replace("%", "%%")
    if "(default" not in meta.help:
        rng = range_of(f.name, command)
        shown = meta.shown_default or (rng.none if default_of(f) is None and rng and rng.none else None)
        if shown is None and meta.item is not None and isinstance(default_of(f), (list, tuple)):
            shown = ",".join("none" if v is None else str(v) for v in default_of(f))
        text += f" (default: {shown.replace('%', '%%') if shown else '%(default)s'})"
    return text


def add_settings(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (),
                 command: str | None = None) -> None:
    """Add one flag per described field of dataclass ``cls`` (:func:`dynsim.settings.setting`):
    name, type, choices, range check, default and help all come from the field. A boolean
    defaulting to False becomes ``--name``, one defaulting to True ``--no-name``; a list of
    values (``item``) is one comma-separated word, ``nargs`` several words; ``--help``
    sections follow the fields' ``group``; deprecated spellings warn and then act like the flag.

    Settings without a flag (``cli=False``) may still come from a config file
    (``config_extra_keys``).
    """
    from dynsim.settings import choices_of, default_of, described, flag_of, meta_of, parse_setting

    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in described(cls):
        meta = meta_of(f)
        if not meta.cli or f.name in skip:
            continue
        where = parser if meta.group is None else groups.setdefault(meta.group, parser.add_argument_group(meta.group))
        default = default_of(f)
        if isinstance(default, bool) and meta.choices is None:
            where.add_argument(flag_of(f), dest=f.name, default=default,
                               action="store_false" if default else "store_true", help=meta.help.replace("%", "%%"))
            continue
        kwargs = dict(dest=f.name, type=_flag_type(parse_setting(f, command=command)), default=default,
                      help=_help(f, command))
        if meta.nargs:
            kwargs["nargs"] = meta.nargs
        if meta.metavar:
            kwargs["metavar"] = meta.metavar
        elif choices_of(f) is not None:
            kwargs["metavar"] = "{" + ",".join(map(str, choices_of(f))) + "}"
        where.add_argument(flag_of(f), **kwargs)
        for old in meta.deprecated:
            where.add_argument(old, action=_Deprecated, new_flag=flag_of(f), dest=f.name, type=kwargs["type"],
                               default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.set_defaults(config_extra_keys=tuple(f.name for f in described(cls) if not meta_of(f).cli))


def parse_set_overrides(items: list[str] | None) -> dict:
    """``--set KEY=VALUE`` (repeatable) as a dict of cell-setting overrides: VALUE read as JSON
    where it parses (numbers, lists, true/false), else kept as text; dashes in KEY become
    underscores."""
    import json

    base = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            base[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            base[key.replace("-", "_")] = value
    return base
