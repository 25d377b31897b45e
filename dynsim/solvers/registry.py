"""The solver registry: ``SOLVERS`` maps a name to a solver class; :func:`make_solver` builds
one with typed keyword options. A new explicit Runge–Kutta method is a tableau
(:mod:`dynsim.solvers.rk`) and one line below."""

from __future__ import annotations

from dynsim.errors import ConfigError
from dynsim.solvers.base import Solver
from dynsim.solvers.block import BlockNewton
from dynsim.solvers.external import TorchDiffEq, TorchODE
from dynsim.solvers.fixed_point import Anderson
from dynsim.solvers.newton import SiteNewton
from dynsim.solvers.newton_cg import SiteNewtonCG
from dynsim.solvers.rk import BOGACKI_SHAMPINE, RALSTON, RK4, Dopri5, Euler, Heun, register_rk

SOLVERS: dict[str, type[Solver]] = {}


def register(cls: type[Solver]) -> type[Solver]:
    """Class decorator adding a solver to :data:`SOLVERS` under ``cls.name``."""
    SOLVERS[cls.name] = cls
    return cls


for _cls in (Euler, Heun, RK4, Dopri5, Anderson, SiteNewton, SiteNewtonCG, BlockNewton, TorchDiffEq, TorchODE):
    register(_cls)
Ralston = register(register_rk("ralston", RALSTON))
Bosh3 = register(register_rk("bosh3", BOGACKI_SHAMPINE))


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
