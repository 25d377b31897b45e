"""The allowed range of every numeric setting, described once and used by every command.

``RANGES[name]`` says what values setting ``name`` may take, in every command that has it
(``run dssm``, ``run ssl``, the studies, the benchmark, the trajectories plot, the Python
configs behind them): ``--seed`` is an integer in 0 .. 2³²−1 everywhere, ``--max-steps`` an
integer ≥ 1 or ``none`` everywhere, and so on. :func:`check_ranges` checks a config object
(or a dict) against the table, naming the flag, the range and the value; list-valued flags are
parsed with :func:`parse_list`, which checks each item the same way. Settings a command gives
its own meaning carry a note (``RANGE_NOTES``).

>>> check_value("max_steps", 0)
Traceback (most recent call last):
...
dynsim.errors.ConfigError: --max-steps must be an integer >= 1 ('none': no cap), got 0
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from dynsim.errors import ConfigError

SEED_MAX = 2**32 - 1  # NumPy's legacy seeding and scikit-learn's random_state take < 2**32


@dataclass(frozen=True)
class Range:
    """Allowed values of one numeric setting.

    kind : ``int`` or ``float`` (floats must be finite).
    low, high : bounds (``None``: unbounded); ``low_open``: ``low`` itself excluded.
    none : what ``None`` means for this setting (``"no cap"``); ``None``: not allowed.
    """

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    none: str | None = None

    def describe(self) -> str:
        """E.g. ``"an integer >= 1 ('none': no cap)"``, ``"> 0 (a finite number)"``."""
        if self.low is not None and self.high is not None:
            bound = f"in {self.low} .. {self.high}"
        elif self.low is not None:
            bound = f"{'>' if self.low_open else '>='} {self.low}"
        elif self.high is not None:
            bound = f"<= {self.high}"
        else:
            bound = ""
        none = f"'none': {self.none}" if self.none else ""
        if self.kind is int:
            text = f"an integer {bound}".rstrip()
            return f"{text} ({none})" if none else text
        extra = "; ".join(x for x in ("a finite number", none) if x)
        return f"{bound or 'a number'} ({extra})"

    def ok(self, value: Any) -> bool:
        """Whether ``value`` is allowed."""
        if value is None:
            return self.none is not None
        if isinstance(value, bool):
            return False
        if self.kind is int:
            if not isinstance(value, int):
                return False
        elif not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high


# one entry per setting name; the same name means the same range in every command
RANGES: dict[str, Range] = {
    "seed": Range(int, 0, SEED_MAX),
    "epochs": Range(int, 1),
    "images_per_epoch": Range(int, 1),
    "batch_size": Range(int, 1),
    "eval_batch_size": Range(int, 1),
    "readout_tol": Range(float, 0, low_open=True),
    "layers": Range(int, 1),
    "nps": Range(int, 1),
    "stride": Range(int, 1, none="the default geometry"),
    "radius": Range(float, 0, low_open=True, none="the default geometry"),
    "lateral_distance": Range(float, 0),
    "threshold": Range(float, 0, low_open=True, none="cap only"),
    "max_steps": Range(int, 1, none="no cap"),
    "stream_every": Range(int, 1, none="off"),
    "eval_every": Range(int, 0),
    "checkpoint_every": Range(int, 0),
    "eval_train_size": Range(int, 2, none="all"),
    "eval_test_size": Range(int, 2, none="all"),
    "threads": Range(int, 1, none="torch's default"),
    "workers": Range(int, 1, none="all cores"),
    "eta0": Range(float, 0),
    "eta_decay": Range(float, 0),
    "eta_min": Range(float, 0),
    "gamma": Range(float, 0),
    "gains": Range(float, 0, low_open=True),
    "mult_factors": Range(float, 0, low_open=True),
    "tau": Range(float, 0, low_open=True),
    # bench / trajectories
    "n_inputs": Range(int, 1),
    "train_images": Range(int, 0),
    "repeats": Range(int, 1),
    "ref_tol": Range(float, 0, low_open=True),
    "units": Range(int, 1),
    "inputs": Range(int, 0),
    "max_values": Range(int, 1),
    "accuracy_eval_train": Range(int, 2),
    "accuracy_eval_test": Range(int, 2),
    # SSL
    "n_train": Range(int, 1, none="all"),
    "n_test": Range(int, 1, none="all"),
    "negatives": Range(int, 1, none="all"),
    "head_dim": Range(int, 1),
    "head_pool": Range(int, 1),
    "probe_epochs": Range(int, 1),
    "probe_batch_size": Range(int, 1),
    "lr": Range(float, 0, low_open=True, none="the authors' (1e-4; RF 1e-5)"),
    "plateau_tol": Range(float, 0),
    "plateau_window": Range(int, 1),
    "probe_every": Range(int, 0),
    "delta": Range(float, 0),
    "dtp_step": Range(float, 0, low_open=True),
    "dtp_noise": Range(float, 0),
}
# settings whose range one command widens, with what the extra values mean there
RANGE_NOTES: dict[tuple[str, str], tuple[Range, str]] = {
    ("ssl", "epochs"): (Range(int, 0), "0 = no training: the random-encoder baseline"),
    ("ssl", "tau"): (Range(float, 0, low_open=True), "the hinge loss's temperature"),
}


def flag(name: str) -> str:
    """``max_steps`` -> ``--max-steps``."""
    return "--" + name.replace("_", "-")


def range_of(name: str, command: str | None = None) -> Range | None:
    """The range of setting ``name`` (in ``command``, where it widens it)."""
    noted = RANGE_NOTES.get((command, name)) if command else None
    return noted[0] if noted else RANGES.get(name)


def check_value(name: str, value: Any, *, command: str | None = None, where: str = "") -> Any:
    """Raise :class:`ConfigError` unless ``value`` is in ``name``'s range; return it.

    A list (per-layer settings) is checked item by item.
    """
    rng = range_of(name, command)
    if rng is None:
        return value
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if not rng.ok(item):
            raise ConfigError(f"{flag(name)} must be {rng.describe()}{where}, got {item!r}")
    return value


def check_ranges(config: Any, *, command: str | None = None, skip: Iterable[str] = ()) -> None:
    """Check every field of ``config`` (a dataclass or a dict) that has a range."""
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    for name, value in values.items():
        if name not in skip:
            check_value(name, value, command=command)


NONE_WORDS = ("none", "off", "all")


def _parse(rng: Range, text: str) -> Any:
    """``text`` as a value of ``rng`` (ValueError naming the problem otherwise)."""
    text = text.strip()
    if text.lower() in NONE_WORDS and rng.none is not None:
        return None
    try:
        value: Any = int(text) if rng.kind is int else float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not {'an integer' if rng.kind is int else 'a number'}") from None
    if not rng.ok(value):
        raise ValueError(f"{text} is out of range")
    return value


def parse_value(name: str, text: str, *, command: str | None = None) -> Any:
    """One flag value as text -> the setting's type (``'none'``/``'off'``/``'all'`` -> None
    where the setting allows it), range-checked. ConfigError naming the flag otherwise."""
    rng = range_of(name, command)
    if rng is None:
        return text.strip()
    try:
        return _parse(rng, text)
    except ValueError as exc:
        raise ConfigError(f"{flag(name)}: {exc}; it must be {rng.describe()}") from None


def parse_list(name: str, text: str, *, item: str | None = None, command: str | None = None) -> list[Any]:
    """A comma-separated flag (``--thresholds 1e-2,1e-4``) -> checked values.

    ``item``: the setting each value is an instance of (``thresholds`` -> ``threshold``).
    """
    rng = range_of(item or name, command)
    parts = [p for p in str(text).split(",") if p.strip()]
    if not parts:
        raise ConfigError(f"{flag(name)} {text!r} is empty; give comma-separated values, each {rng.describe()}")
    values = []
    for part in parts:
        try:
            values.append(_parse(rng, part))
        except ValueError as exc:
            raise ConfigError(f"{flag(name)} {text!r}: {exc}; each value must be {rng.describe()}") from None
    if len(set(map(repr, values))) != len(values):
        raise ConfigError(f"{flag(name)} {text!r} repeats a value")
    return values


def memory_bytes_available() -> int | None:
    """Physical memory of this machine in bytes (None where the system does not say)."""
    import os

    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(need: float, what: str, fix: str, *, available: Callable[[], int | None] = memory_bytes_available
                 ) -> None:
    """Refuse a request that needs more than this machine's memory, saying how much."""
    have = available()
    if have is not None and need > have:
        raise ConfigError(f"{what} needs about {_size(need)} of memory; this machine has {_size(have)}: {fix}")


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover


# --------------------------------------------------------------------------------------------
# Settings described once: a dataclass field per setting, its metadata the one description
# from which the command line (dynsim.cli.common.add_settings), config files (dynsim.config)
# and validation (check_settings) are all generated.


@dataclass(frozen=True)
class Setting:
    """What a command-line flag and a config-file key need to know about one setting.

    help : one line (the default is appended to ``--help``, from the field itself).
    choices : the allowed values (a tuple, or a function returning one, for lists that live
        in lower modules); checked by :func:`check_setting`.
    flag : the flag, default ``--`` + the name with ``-``; ``deprecated``: older spellings,
        still accepted with a warning naming the new one.
    per_layer : one value or a comma-separated list (one value per layer).
    group : the ``--help`` section; ``cli``: False for settings without a flag.
    shown_default : how ``--help`` shows the default, where the value itself says little.
    item : the value is a comma-separated list of distinct values of setting ``item``
        (``thresholds`` -> each a ``threshold``, in its range; :func:`parse_list`).
    parse : text -> value, for a setting with its own syntax (``--seeds 0-4``); also given a
        config file's typed value; raises :class:`ConfigError` naming the problem.
    nargs : the flag takes several words (``"+"``), each parsed like the flag's one value.
    """

    help: str
    choices: tuple | Callable[[], tuple] | None = None
    flag: str | None = None
    deprecated: tuple[str, ...] = ()
    per_layer: bool = False
    group: str | None = None
    cli: bool = True
    metavar: str | None = None
    shown_default: str | None = None
    item: str | None = None
    parse: Callable[[Any], Any] | None = None
    nargs: str | None = None


def setting(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
            **meta: Any) -> Any:
    """A dataclass field described once: ``tau: float = setting(1.0, help="time constant τ")``.

    Keyword arguments beyond ``default``/``default_factory`` are those of :class:`Setting`.
    """
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"setting": Setting(help=help, **meta)})


def described(cls: type) -> list[dataclasses.Field]:
    """The fields of dataclass ``cls`` that carry a :class:`Setting`."""
    return [f for f in dataclasses.fields(cls) if "setting" in f.metadata]


def meta_of(f: dataclasses.Field) -> Setting:
    """The :class:`Setting` of field ``f``."""
    return f.metadata["setting"]


def flag_of(f: dataclasses.Field) -> str:
    """``--max-steps`` for the field ``max_steps`` (or the flag its metadata names); a switch
    that is on by default is turned off by ``--no-<name>``."""
    if meta_of(f).flag:
        return meta_of(f).flag
    return flag("no_" + f.name) if f.default is True and meta_of(f).choices is None else flag(f.name)


def choices_of(f: dataclasses.Field) -> tuple | None:
    """The allowed values of field ``f`` (None: any value its range allows)."""
    choices = meta_of(f).choices
    return tuple(choices()) if callable(choices) else choices


def default_of(f: dataclasses.Field) -> Any:
    """The default value of field ``f``."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def check_setting(f: dataclasses.Field, value: Any, *, command: str | None = None) -> Any:
    """Raise :class:`ConfigError` unless ``value`` is allowed for field ``f`` (its choices,
    then its range in :data:`RANGES`); return it. The one message for a bad value, whether it
    came from a flag, a config file or Python."""
    choices = choices_of(f)
    name = flag_of(f)
    meta = meta_of(f)
    if meta.item is not None:
        if value is None:  # the default of an optional list (--gains: all 1)
            return value
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        rng = range_of(meta.item, command)
        if not values:
            raise ConfigError(f"{name} is empty; give comma-separated values, each {rng.describe()}")
        for item in values:
            if not rng.ok(item):
                raise ConfigError(f"{name}: each value must be {rng.describe()}, got {item!r}")
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"{name} {values} repeats a value")
        return value
    if meta.parse is not None and value is not None:
        meta.parse(value)
    listed = meta.per_layer or meta.nargs is not None
    items = value if listed and isinstance(value, (list, tuple)) else [value]
    if choices is not None:
        for item in items:
            if item not in choices or isinstance(item, bool) != any(isinstance(c, bool) for c in choices):
                raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}, got {item!r}")
    rng = range_of(f.name, command)
    if rng is not None:
        for item in items:
            if not rng.ok(item):
                raise ConfigError(f"{name} must be {rng.describe()}, got {item!r}")
    return value


def check_settings(config: Any, *, command: str | None = None, skip: Iterable[str] = ()) -> None:
    """:func:`check_setting` on every described field of dataclass instance ``config``."""
    for f in described(type(config)):
        if f.name not in skip:
            check_setting(f, getattr(config, f.name), command=command)


def parse_setting(f: dataclasses.Field, *, command: str | None = None) -> Callable[[str], Any]:
    """``text -> value`` for field ``f``: a number (``none``/``off``/``all`` -> None where the
    range allows it), one of its choices, or (``per_layer``) a comma-separated list of them;
    checked by :func:`check_setting`, so a bad value gets the same one-line error here as from
    a config file or from Python."""
    rng = range_of(f.name, command)
    choices = choices_of(f)
    kinds = {type(c) for c in choices or ()}

    def one(text: str) -> Any:
        text = text.strip()
        if rng is not None:
            if text.lower() in NONE_WORDS and rng.none is not None:
                return None
            try:
                return int(text) if rng.kind is int else float(text)
            except ValueError:
                raise ConfigError(f"{flag_of(f)} must be {rng.describe()}, got {text!r}") from None
        if kinds == {int}:
            try:
                return int(text)
            except ValueError:
                return text  # refused by check_setting, naming the choices
        if text.lower() in ("none", "null") and f.default is None:
            return None
        return text

    def parse(text: str) -> Any:
        meta = meta_of(f)
        if meta.parse is not None:
            return check_setting(f, meta.parse(text), command=command)
        if meta.item is not None and isinstance(text, (list, tuple)):  # a config file's list
            items = [_items(f, v, command)[0] if isinstance(v, str) else v for v in text]
            return check_setting(f, items, command=command)
        if not isinstance(text, str):  # a config file's typed value
            return check_setting(f, text, command=command)
        if meta.item is not None:
            return check_setting(f, _items(f, text, command), command=command)
        if meta.per_layer:
            parts = [one(p) for p in text.split(",") if p.strip()]
            if not parts:
                raise ConfigError(f"{flag_of(f)} {text!r} is empty; give one value or one per layer")
            value = parts[0] if len(parts) == 1 else parts
        else:
            value = one(text)
        return check_setting(f, value, command=command)

    parse.__name__ = f.name
    return parse


def _items(f: dataclasses.Field, text: str, command: str | None) -> list[Any]:
    """A comma-separated flag of setting ``f`` (``item`` set) -> its values, unchecked
    (:func:`check_setting` checks them, with the message a config file's list gets)."""
    rng = range_of(meta_of(f).item, command)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ConfigError(f"{flag_of(f)} {text!r} is empty; give comma-separated values, each {rng.describe()}")
    values = []
    for part in parts:
        if part.lower() in NONE_WORDS and rng.none is not None:
            values.append(None)
            continue
        try:
            values.append(int(part) if rng.kind is int else float(part))
        except ValueError:
            kind = "an integer" if rng.kind is int else "a number"
            raise ConfigError(f"{flag_of(f)} {text!r}: {part!r} is not {kind}; each value must be {rng.describe()}"
                              ) from None
    return values
