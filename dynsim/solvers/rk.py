"""Explicit fixed-step Runge–Kutta methods with step-size schedules: Heun (order 2), RK4 (order 4).

Each step evaluates the field at the current state first, so the returned ``field(u)``
(used by :func:`dynsim.settle` for the residual ``‖du/ds‖/‖u‖``) costs nothing extra.
"""

from __future__ import annotations

from dynsim.solvers.base import FixedStepSolver


class Heun(FixedStepSolver):
    """Heun's method (explicit trapezoid), order 2, two field evaluations per step.

    ``k1 = F(u)``, ``k2 = F(u + dt·k1)``, ``u_{n+1} = u + dt/2·(k1 + k2)``, ``dt = schedule(n)``.

    Examples
    --------
    >>> import torch
    >>> u, f, _ = Heun(ConstantStep(0.1)).step(lambda v: -v, torch.ones(2, 3), None, 0)
    >>> round(float(u[0, 0]), 6)
    0.905
    """

    name = "heun"
    evals_per_step = 2

    def step(self, field, u, state, n):
        dt = self.schedule(n)
        k1 = field(u)
        k2 = field(u + dt * k1)
        return u + (0.5 * dt) * (k1 + k2), k1, state


class RK4(FixedStepSolver):
    """Classical fourth-order Runge–Kutta, four field evaluations per step."""

    name = "rk4"
    evals_per_step = 4

    def step(self, field, u, state, n):
        dt = self.schedule(n)
        k1 = field(u)
        k2 = field(u + (0.5 * dt) * k1)
        k3 = field(u + (0.5 * dt) * k2)
        k4 = field(u + dt * k3)
        return u + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4), k1, state


from dynsim.solvers.schedules import ConstantStep  # noqa: E402,F401  (doctest namespace)
