"""Config files for every command: ``dynsim ... --config run.toml``, CLI flags override it.

A config file is TOML (flat ``key = value`` pairs; keys are flag names with ``-`` or
``_``, e.g. ``max-steps = 500`` or ``max_steps = 500``) or the JSON result of an earlier
run, whose ``config`` block is taken so that ``dynsim run dssm --config result.json``
repeats that run (its ``out`` is dropped so the old result is not overwritten). A TOML
file may also put the settings in a table named after the command (``[dssm]``).

Precedence: flags given on the command line > the config file > built-in defaults.

>>> values = load_config_file("run.toml")                             # doctest: +SKIP
>>> args = parse_args_with_config(build_parser(), ["run", "dssm", "--config", "run.toml"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dynsim.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

# keys of a result's config block that describe where/how to write, not what to run
RESULT_ONLY_KEYS = ("out",)


def load_config_file(path: str | Path, *, section: str | None = None) -> dict[str, Any]:
    """Read a TOML config or a JSON result file into a flat ``{setting: value}`` dict.

    Keys are normalised to Python names (``max-steps`` -> ``max_steps``). ``section``:
    a TOML table of that name (e.g. ``"dssm"``) is merged over the top-level keys.
    Raises :class:`ConfigError` naming the file and the problem.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a JSON object, got {type(data).__name__}")
        if isinstance(data.get("config"), dict):  # a dynsim result: repeat its run
            data = {k: v for k, v in data["config"].items() if k not in RESULT_ONLY_KEYS}
    elif path.suffix.lower() == ".toml":
        if tomllib is None:  # pragma: no cover
            raise ConfigError("TOML config files need Python >= 3.11 or the 'tomli' package; "
                              "pip install tomli, or give a JSON config")
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    else:
        raise ConfigError(f"config file {path}: use a .toml file or a .json result, got {path.suffix or 'no suffix'!r}")
    values = {k: v for k, v in data.items() if not (section and k == section and isinstance(v, dict))}
    if section and isinstance(data.get(section), dict):
        values.update(data[section])
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and key != "extra":
            raise ConfigError(f"config file {path}: [{key}] is a table; put settings at the top level"
                              + (f" or under [{section}]" if section else ""))
        out[key.replace("-", "_")] = value
    return out


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE`` to a (sub)command's parser."""
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="settings from a .toml file or an earlier run's .json result; flags override it")


def _leaves(parser: argparse.ArgumentParser):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
            yield from _leaves(child)


def add_config_everywhere(parser: argparse.ArgumentParser) -> None:
    """Give every leaf command of ``parser`` a ``--config`` flag (if it has none yet)."""
    for leaf in _leaves(parser):
        if not any(a.dest == "config" for a in leaf._actions):
            add_config_argument(leaf)


def _leaf_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The subparser that parsed ``args`` (walks the sub-commands chosen)."""
    for action in parser._actions:  # argparse has no public way to get the chosen subparser
        if isinstance(action, argparse._SubParsersAction):
            chosen = getattr(args, action.dest, None)
            if chosen in action.choices:
                return _leaf_parser(action.choices[chosen], args)
    return parser


def _converted(action: argparse.Action, key: str, value: Any, path: str | Path) -> Any:
    """A file value as the flag would parse it (strings go through the flag's type), checked
    against the flag's choices; :class:`ConfigError` naming the file, key and value otherwise."""
    if isinstance(value, list) and action.nargs in ("+", "*") or isinstance(action.nargs, int) and action.nargs > 0:
        return [_converted_one(action, key, v, path) for v in (value if isinstance(value, list) else [value])]
    return _converted_one(action, key, value, path)


def _converted_one(action: argparse.Action, key: str, value: Any, path: str | Path) -> Any:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) and not isinstance(value, bool):
        # TOML has booleans; a string such as "false" would otherwise be read as true
        raise ConfigError(f"config file {path}: {key} = {value!r} must be a boolean: {key} = true or {key} = false "
                          "(no quotes)")
    if isinstance(value, list) and getattr(action.type, "typed", False):
        return action.type(value)  # a described setting's list (--caps 1,none = caps = [1, "none"])
    if isinstance(value, str) and action.type is not None:
        try:
            value = action.type(value)
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            kind = getattr(action.type, "__name__", "value")
            raise ConfigError(f"config file {path}: {key} = {value!r} is not a valid {kind}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ConfigError(f"config file {path}: {key} = {value!r}; choose one of {choices}")
    return value


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` where ``--config FILE`` supplies the defaults.

    Values from the file become the chosen subcommand's defaults, then ``argv`` is parsed
    again, so flags on the command line win. File keys that are not flags (e.g. ``tau``,
    ``progress`` of a result's config) are returned in ``args.config_values`` when the
    command lists them in its ``config_extra_keys`` default (``set_defaults``); any other
    key is refused. ``args.config_values`` is ``{}`` without a file.
    """
    args = parser.parse_args(argv)
    args.config_values = {}
    path = getattr(args, "config", None)
    if not path:
        return args
    leaf = _leaf_parser(parser, args)
    values = load_config_file(path, section=leaf.prog.split()[-1])  # "dynsim run dssm" -> [dssm]
    actions = {a.dest: a for a in leaf._actions if a.dest not in ("help", "config")}
    values = _keys_as_settings(values, leaf, actions)
    leaf.set_defaults(**{k: _converted(actions[k], k, v, path) for k, v in values.items() if k in actions})
    args = parser.parse_args(argv)
    args.config_values = {k: v for k, v in values.items() if k not in actions}
    extra_ok = leaf.get_default("config_extra_keys") or ()
    reject_unknown({k: v for k, v in args.config_values.items() if k not in extra_ok},
                   [*actions, *extra_ok], source=f"config file {path}")
    return args


def _keys_as_settings(values: dict[str, Any], leaf: argparse.ArgumentParser,
                      actions: dict[str, argparse.Action]) -> dict[str, Any]:
    """A key may also be a flag's name where it differs from its setting's: ``learning`` for
    ``schedule``; ``no_progress = true`` for ``progress = false``."""
    out = {}
    for key, value in values.items():
        action = next((a for a in leaf._actions if a.dest in actions and a.dest != key
                       and f"--{key.replace('_', '-')}" in a.option_strings), None) if key not in actions else None
        if action is None:
            out[key] = value
        elif isinstance(action, argparse._StoreFalseAction) and isinstance(value, bool):
            out[action.dest] = not value
        else:
            out[action.dest] = value
    return out


def reject_unknown(values: dict[str, Any], known: Sequence[str], *, source: str) -> None:
    """Raise :class:`ConfigError` for keys not in ``known``, suggesting the closest names."""
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known settings: {', '.join(sorted(known))}"
            raise ConfigError(f"unknown setting {key!r} in {source}{hint}")
