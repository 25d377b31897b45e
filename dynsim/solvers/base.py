"""The solver interface: one step of an ODE method on a batch of states.

A solver holds no hidden state between calls (diffrax style): :meth:`Solver.step` gets the
vector field, the state ``u`` (B, D), its own per-sample solver state and the step index, and
returns a :class:`StepResult`: the next state, the vector field at ``u`` (so the caller can
judge the residual ``‖du/ds‖/‖u‖`` of ``u`` without another evaluation), the new solver
state and the number of field evaluations the step made per sample. The stepping loop, stop
rules and per-sample bookkeeping live in :func:`dynsim.settle`, so a new method writes only
its step.

The vector field is called as ``field(u, t)``: ``u`` (B, D), ``t`` the time (a float, or a
(B, 1) tensor for methods with a per-sample step size); ``field.time_dependent`` is False when
the field ignores ``t`` (every :class:`~dynsim.systems.System`), so a method may skip
computing stage times.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch

from dynsim.solvers.step_sizes import SEED_SCHEDULE, StepSchedule

VectorField = Callable[..., torch.Tensor]


class StepResult(NamedTuple):
    """What :meth:`Solver.step` returns.

    Attributes
    ----------
    u : (B, D) next state.
    f : (B, D) the vector field at the step's starting state.
    state : the solver's per-sample state after the step.
    evals : field evaluations the step made for each sample (one batched call = 1).
    """

    u: torch.Tensor
    f: torch.Tensor
    state: Any
    evals: int


class Solver:
    """Base class. Subclasses set ``name`` and implement :meth:`step`."""

    name: ClassVar[str]

    def init(self, field: VectorField, u0: torch.Tensor) -> Any:
        """Per-sample solver state before the first step (``None`` for one-step methods)."""
        return None

    def step(self, field: VectorField, u: torch.Tensor, state: Any, n: int) -> StepResult:
        """Advance ``u`` (B, D) by one step (``n``: its index, from 0)."""
        raise NotImplementedError

    def select(self, state: Any, keep: torch.Tensor) -> Any:
        """Solver state of the samples ``keep`` (a (B,) bool mask), when a batch shrinks.
        Tensors are per-sample (first axis); plain numbers are shared by all samples."""
        if state is None or isinstance(state, (int, float)):
            return state
        if isinstance(state, torch.Tensor):
            return state[keep]
        if isinstance(state, (tuple, list)):
            return type(state)(self.select(s, keep) for s in state)
        if isinstance(state, dict):
            return {k: self.select(v, keep) for k, v in state.items()}
        raise TypeError(f"{type(self).__name__}.select cannot subset state of type {type(state)}")


class FixedStepSolver(Solver):
    """A one-step method with a step-size schedule ``dt_n``."""

    def __init__(self, schedule: StepSchedule = SEED_SCHEDULE):
        self.schedule = schedule

    def __repr__(self) -> str:
        return f"{type(self).__name__}(schedule={self.schedule!r})"
