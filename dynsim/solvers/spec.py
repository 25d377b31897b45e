"""Solver specs as one string: ``"name,key=value,key=value"`` (CLI, configs, sweep cells).

Examples: ``"euler"``, ``"rk4,schedule=constant:0.5"``, ``"anderson,beta=0.2,memory=5"``,
``"dopri5,rtol=1e-5,atol=1e-7"``, ``"euler,schedule=decaying:0.2,0.005,0.05"`` (commas not
followed by ``key=`` belong to the value).
"""

from __future__ import annotations

import re
from typing import Any

from dynsim.errors import ConfigError
from dynsim.solvers.base import FixedStepSolver, Solver
from dynsim.solvers.step_sizes import parse_schedule

_SPLIT = re.compile(r",(?=\s*[A-Za-z_]\w*\s*=)")


def _value(key: str, text: str) -> Any:
    if key == "schedule":
        return parse_schedule(text)
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.lower() in ("none", "off"):
        return None
    return text


def parse_solver_spec(spec: str, *, schedule: str | None = None) -> tuple[str, dict[str, Any]]:
    """``"name,key=value,..."`` -> ``(name, options)``.

    ``schedule`` (a schedule string such as ``"seed"``) is added for fixed-step solvers
    when the spec names none.
    """
    from dynsim.solvers.registry import SOLVERS

    head, *pairs = _SPLIT.split(spec.strip())
    name = head.strip()
    if name not in SOLVERS:
        raise ConfigError(
            f"unknown solver {name!r} in {spec!r}; choose one of {', '.join(sorted(SOLVERS))}"
        )
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not text.strip():
            raise ConfigError(f"solver spec {spec!r}: expected key=value, got {pair!r}")
        options[key.strip()] = _value(key.strip(), text.strip())
    if (
        schedule is not None
        and "schedule" not in options
        and issubclass(SOLVERS[name], FixedStepSolver)
    ):
        options["schedule"] = parse_schedule(schedule)
    return name, options


def solver_from_spec(spec: str, *, schedule: str | None = None) -> Solver:
    """Build the solver a spec names (see :func:`parse_solver_spec`)."""
    from dynsim.solvers.registry import make_solver

    name, options = parse_solver_spec(spec, schedule=schedule)
    try:
        return make_solver(name, **options)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (spec {spec!r}; e.g. 'dopri5,rtol=1e-5,atol=1e-7')") from None
