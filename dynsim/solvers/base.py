"""The solver interface: one step of an ODE method on a batch of states.

A solver holds no hidden state between calls (diffrax style): :meth:`Solver.step` gets
the state ``u`` (B, D), its own per-sample solver state (or ``None``) and the step index,
and returns the next state, the vector field at ``u`` (so the caller can judge the
residual ``‖du/ds‖/‖u‖`` of ``u`` without another evaluation) and the new solver state.
The stepping loop, stop rules and per-sample bookkeeping live in :func:`dynsim.settle`,
so a new method writes only its step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from dynsim.solvers.schedules import SEED_SCHEDULE, StepSchedule

VectorField = Callable[[torch.Tensor], torch.Tensor]


class Solver:
    """Base class. Subclasses set ``name`` and ``evals_per_step`` and implement :meth:`step`."""

    name: ClassVar[str]
    evals_per_step: ClassVar[int] = 1

    def init(self, field: VectorField, u0: torch.Tensor) -> Any:
        """Per-sample solver state before the first step (``None`` for one-step methods)."""
        return None

    def step(
        self, field: VectorField, u: torch.Tensor, state: Any, n: int
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Advance ``u`` (B, D) by one step; return ``(u_next, field(u), state)``."""
        raise NotImplementedError

    def settle_compiled(self, system, x: torch.Tensor, u0: torch.Tensor | None, *, tol: float | None,
                        cap: int | None, cap_first: bool, max_state_norm: float) -> tuple | None:
        """A compiled whole-settle loop for the built-in stop rules, or ``None`` (the default: use
        :func:`dynsim.settle`'s loop). When given, it must return ``SettleResult``'s fields
        ``(u, r, steps, status, residual, n_evals)`` exactly as that loop would (field residual
        tested before each step against ``tol``, cap ``cap``, divergence when the RMS state
        exceeds ``max_state_norm``)."""
        return None

    def select(self, state: Any, keep: torch.Tensor) -> Any:
        """Solver state of the samples ``keep`` (a (B,) bool mask), when a batch shrinks."""
        if state is None:
            return None
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


class Euler(FixedStepSolver):
    """Forward Euler: ``u_{n+1} = u_n + dt_n · F(u_n)``. One field evaluation per step."""

    name = "euler"
    evals_per_step = 1

    def settle_compiled(self, system, x, u0, *, tol, cap, cap_first, max_state_norm):
        """The compiled CPU loop of :mod:`dynsim.compiled` for a site-separable
        :class:`~dynsim.systems.HebbianLayer` (NpS ≤ 32, CPU float tensors) with a step cap
        (the step sizes ``dt_0 .. dt_{cap-1}`` are tabulated once per cap)."""
        from dynsim import compiled

        if cap is None or cap > 10_000_000 or not compiled.can_settle(system, x, u0):
            return None
        key = (cap, self.schedule)
        if getattr(self, "_dts", (None, None))[0] != key:
            self._dts = (key, np.array([self.schedule(n) for n in range(cap)], dtype=np.float64))
        return compiled.settle_layer(system, x, u0, method="euler", tol=tol, cap=cap, cap_first=cap_first,
                                     max_state_norm=max_state_norm, dts=self._dts[1])

    def step(self, field, u, state, n):
        f = field(u)
        return u + self.schedule(n) * f, f, state
