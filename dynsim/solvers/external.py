"""Adapters that drive torchdiffeq's ``odeint`` and torchode's ``solve_ivp`` on a dynsim system.

Both libraries integrate to a time horizon; they know nothing of fixed points. Each
:meth:`step` here therefore integrates every running sample over one time *window* of
length ``window`` (so a "step" is a window, not an internal RK step) and
:func:`dynsim.settle` checks the field residual ``‖F(u)‖/‖u‖`` at the start of each
window, exactly as for the native solvers. ``F(u)`` at the window start is the library's
own first field evaluation (both evaluate ``F(t0, y0)`` first), so it costs nothing extra.

Differences that matter when comparing (and that the bench reports):

* torchdiffeq's adaptive solvers control the error of the **whole batch** with one step
  size (the batch's worst sample sets it); torchode controls it **per sample** but
  evaluates the field on the whole batch at every internal step until all are done.
* each :meth:`step` returns the number of field calls the library made in its window
  (each on every running sample), so ``SettleResult.n_evals`` is exact.

The library's time runs from ``n·window`` to ``(n+1)·window`` in window ``n``.
"""

from __future__ import annotations

import math

import torch

from dynsim.errors import ConfigError
from dynsim.solvers.base import Solver, StepResult


def _check(name: str, **values: float) -> None:
    for key, v in values.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ConfigError(f"{name}: {key} must be a positive number, got {v!r}")


class _Recorder:
    """Wraps ``field`` to count calls and keep the first evaluation if it is at ``u``."""

    def __init__(self, field, u, t0: float):
        self.field, self.u, self.t0, self.calls, self.f0 = field, u, t0, 0, None

    def __call__(self, t, y):
        f = self.field(y, self.t0 + t)
        if self.calls == 0 and y.shape == self.u.shape and torch.equal(y, self.u):
            self.f0 = f
        self.calls += 1
        return f

    def field_at_start(self):
        if self.f0 is None:  # the library did not start at u: evaluate (and count) it
            self.calls += 1
            self.f0 = self.field(self.u, self.t0)
        return self.f0


class _LibrarySolver(Solver):
    """A library integrator run over windows of ``window`` time units per settle step."""

    def __init__(self, *, rtol: float, atol: float, method: str = "dopri5", window: float = 1.0):
        _check(self.name, rtol=rtol, atol=atol, window=window)
        self.method, self.rtol, self.atol, self.window = method, rtol, atol, window

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(method={self.method!r}, rtol={self.rtol}, atol={self.atol}, "
            f"window={self.window})"
        )


class TorchDiffEq(_LibrarySolver):
    """torchdiffeq ``odeint`` over windows of ``window`` time units.

    Parameters
    ----------
    method : torchdiffeq method name, e.g. ``"dopri5"`` (adaptive), ``"bosh3"``, ``"rk4"``.
    rtol, atol : tolerances of the adaptive methods (required).
    window : time units integrated per settle step.
    """

    name = "torchdiffeq"

    def step(self, field, u, state, n):
        from torchdiffeq import odeint

        rec = _Recorder(field, u, n * self.window)
        t = torch.tensor([0.0, self.window], dtype=u.dtype, device=u.device)
        u_next = odeint(rec, u, t, method=self.method, rtol=self.rtol, atol=self.atol)[-1]
        f = rec.field_at_start()
        return StepResult(u_next, f, state, rec.calls)


class TorchODE(_LibrarySolver):
    """torchode ``solve_ivp`` (per-sample step-size control) over windows of ``window`` time units.

    Parameters
    ----------
    method : torchode method name, e.g. ``"dopri5"``, ``"tsit5"``.
    rtol, atol : tolerances (required).
    window : time units integrated per settle step.
    """

    name = "torchode"

    def step(self, field, u, state, n):
        import torchode

        rec = _Recorder(field, u, n * self.window)
        term = torchode.ODETerm(rec)
        controller = torchode.IntegralController(atol=self.atol, rtol=self.rtol, term=term)
        t_eval = torch.tensor([0.0, self.window], dtype=u.dtype, device=u.device).expand(
            u.shape[0], 2
        )
        sol = torchode.solve_ivp(term, u, t_eval, method=self.method, controller=controller)
        u_next = sol.ys[:, -1]
        f = rec.field_at_start()
        return StepResult(u_next, f, state, rec.calls)
