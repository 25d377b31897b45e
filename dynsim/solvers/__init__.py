"""How a system evolves: ODE solvers behind one interface, looked up by name.

``SOLVERS`` maps a name to a solver class; :func:`make_solver` builds one with typed
keyword options (both in :mod:`.registry`). Register a new method with :func:`register`; a new
explicit Runge–Kutta method is a tableau (:mod:`dynsim.solvers.rk`) and one line in :mod:`.registry`.
"""

from __future__ import annotations

from dynsim.solvers.base import FixedStepSolver, Solver, StepResult
from dynsim.solvers.block import BlockNewton
from dynsim.solvers.controllers import PIController
from dynsim.solvers.external import TorchDiffEq, TorchODE
from dynsim.solvers.fixed_point import Anderson
from dynsim.solvers.newton import SiteNewton
from dynsim.solvers.newton_cg import SiteNewtonCG
from dynsim.solvers.registry import SOLVERS, Bosh3, Ralston, make_solver, register
from dynsim.solvers.rk import (
    RK4,
    ButcherTableau,
    Dopri5,
    EmbeddedRK,
    Euler,
    ExplicitRK,
    Heun,
    register_rk,
)
from dynsim.solvers.step_sizes import (
    SEED_SCHEDULE,
    ConstantStep,
    DecayingStep,
    StepSchedule,
    parse_schedule,
)

__all__ = [
    "RK4",
    "Bosh3",
    "Ralston",
    "ButcherTableau",
    "EmbeddedRK",
    "ExplicitRK",
    "PIController",
    "StepResult",
    "register_rk",
    "SEED_SCHEDULE",
    "SOLVERS",
    "Anderson",
    "BlockNewton",
    "ConstantStep",
    "DecayingStep",
    "Dopri5",
    "Euler",
    "FixedStepSolver",
    "Heun",
    "SiteNewton",
    "SiteNewtonCG",
    "Solver",
    "StepSchedule",
    "TorchDiffEq",
    "TorchODE",
    "make_solver",
    "parse_schedule",
    "register",
]

from dynsim.solvers.spec import parse_solver_spec, solver_from_spec  # noqa: E402

__all__ += ["parse_solver_spec", "solver_from_spec"]
