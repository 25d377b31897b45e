"""Per-site Newton: a fixed-point solver for systems whose field splits into small blocks.

For a :class:`~dynsim.systems.HebbianLayer` with lateral connections inside each site only
(lateral distance 0, the DSSM default), the fixed-point equation ``F(u) = 0`` separates
into one ``nps``-dimensional problem per site. :class:`SiteNewton` takes full Newton
steps ``u_{n+1} = u_n − J(u_n)⁻¹ F(u_n)`` on all sites at once (one batched nps × nps
solve), converging quadratically: a handful of steps reach ``‖F‖/‖u‖ < 1e-4`` where the
seed's Euler schedule needs hundreds. It settles to the same fixed point, judged by the
same solver-independent residual, so it is a drop-in for training and evaluation.

For a tanh layer the first step (``picard_start``, default True) is one Picard/Euler step with ``dt = τ``,
``u_1 = d + s·A f(u_0)`` — from rest exactly ``u_1 = W x``, the drive — and Newton
starts from there: on trained Fashion-MNIST weights this cuts Newton steps from 6.9 to
4.7 per image (1.25× faster settling) because Newton from ``u = 0`` first has to undo
tanh's saturation. Any start is legitimate: a sample stops only when its own field
residual passes the test, and the inhibitory DSSM layer has one fixed point.

It reaches the system through the vector field that :func:`dynsim.settle` passes (which
carries ``.system`` and ``.drive``); the system must provide
``newton_step(u, drive) -> (u_next, F(u))``.
"""

from __future__ import annotations

from dynsim.errors import ConfigError
from dynsim.solvers.base import Solver


class SiteNewton(Solver):
    """Newton's method on the fixed-point equation, block by block (see module docstring)."""

    name = "newton"
    evals_per_step = 1

    def __init__(self, picard_start: bool | str | int = True):
        if isinstance(picard_start, str):  # from a spec string, e.g. "newton,picard_start=false"
            if picard_start.lower() not in ("true", "false"):
                raise ConfigError(f"picard_start must be true or false, got {picard_start!r}")
            picard_start = picard_start.lower() == "true"
        self.picard_start = bool(picard_start)

    def __repr__(self) -> str:
        return "SiteNewton()" if self.picard_start else "SiteNewton(picard_start=False)"

    def settle_compiled(self, system, x, u0, *, tol, cap, cap_first, max_state_norm):
        """The compiled CPU loop of :mod:`dynsim.compiled` where it applies (a site-separable
        :class:`~dynsim.systems.HebbianLayer` with NpS ≤ 32, CPU float tensors, numba installed)."""
        from dynsim import compiled

        if not compiled.can_settle(system, x, u0):
            return None
        return compiled.settle_layer(system, x, u0, method="newton", tol=tol, cap=cap, cap_first=cap_first,
                                     max_state_norm=max_state_norm, picard_start=self.picard_start)

    def step(self, field, u, state, n):
        system = getattr(field, "system", None)
        if system is None or not hasattr(system, "newton_step"):
            raise ConfigError(
                "the newton solver needs a system with newton_step (a HebbianLayer with lateral "
                "distance 0), run through dynsim.settle; use --solver euler otherwise"
            )
        if n == 0 and self.picard_start and getattr(system, "activation", None) == "tanh":
            # u_1 = u_0 + τ F(u_0) = d + s·A f(u_0): from rest, the drive
            f = field(u)
            return u + system.tau * f, f, state
        u_next, f = system.newton_step(u, field.drive)
        return u_next, f, state
