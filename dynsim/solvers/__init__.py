"""How a system evolves: ODE solvers behind one interface, looked up by name.

``SOLVERS`` maps a name to a solver class; :func:`make_solver` builds one with typed
keyword options. Register a new method with :func:`register`.
"""

from __future__ import annotations

from dynsim.errors import ConfigError
from dynsim.solvers.base import Euler, FixedStepSolver, Solver
from dynsim.solvers.newton import SiteNewton
from dynsim.solvers.schedules import (
    SEED_SCHEDULE,
    ConstantStep,
    DecayingStep,
    StepSchedule,
    parse_schedule,
)

SOLVERS: dict[str, type[Solver]] = {}


def register(cls: type[Solver]) -> type[Solver]:
    """Class decorator adding a solver to :data:`SOLVERS` under ``cls.name``."""
    SOLVERS[cls.name] = cls
    return cls


register(Euler)
register(SiteNewton)


def make_solver(name: str, **options) -> Solver:
    """Build the solver registered as ``name`` with keyword ``options``."""
    try:
        cls = SOLVERS[name]
    except KeyError:
        raise ConfigError(f"unknown solver {name!r}; choose one of {', '.join(sorted(SOLVERS))}") from None
    try:
        return cls(**options)
    except TypeError as exc:
        raise ConfigError(f"solver {name!r}: {exc}") from None


__all__ = [
    "SEED_SCHEDULE",
    "SOLVERS",
    "ConstantStep",
    "DecayingStep",
    "Euler",
    "FixedStepSolver",
    "SiteNewton",
    "Solver",
    "StepSchedule",
    "make_solver",
    "parse_schedule",
    "register",
]
