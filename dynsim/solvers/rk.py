"""Explicit Runge–Kutta methods, all driven by one Butcher tableau each.

A tableau ``(c, a, b)`` with ``s`` stages defines the step (Hairer, Nørsett & Wanner, "Solving
ODEs I", §II.1)

    k_i = F(u + dt Σ_{j<i} a_ij k_j,  t + c_i dt),      u_{n+1} = u + dt Σ_i b_i k_i.

:class:`ExplicitRK` takes ``dt`` from a step-size schedule (fixed step); :class:`EmbeddedRK`
uses a tableau with a second, lower-order weight row ``b̂`` for the error estimate
``e = dt Σ_i (b_i − b̂_i) k_i`` and lets a step-size controller
(:class:`~dynsim.solvers.controllers.PIController`) accept or reject each sample's step. Both
evaluate ``k_1 = F(u)`` first, so the field at ``u`` that :func:`dynsim.settle` needs for the
residual costs nothing extra.

A new explicit method is a tableau here plus one line in :mod:`dynsim.solvers`
(``Name = register_rk("name", TABLEAU)``); the conformance tests pick it up by itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from dynsim.solvers.base import FixedStepSolver, Solver, StepResult
from dynsim.solvers.controllers import PIController


@dataclass(frozen=True)
class ButcherTableau:
    """Coefficients of an explicit RK method: ``a[i]`` holds ``a_i0 .. a_i(i−1)``.

    ``b_low`` (optional) is the embedded method's weights, of order ``low_order``.
    """

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    order: int
    b_low: tuple[float, ...] | None = None
    low_order: int | None = None

    def __post_init__(self) -> None:
        s = len(self.c)
        if len(self.a) != s or len(self.b) != s or any(len(row) != i for i, row in enumerate(self.a)):
            raise ValueError("tableau: c, b need one entry per stage and a[i] needs i entries")
        if (self.b_low is None) != (self.low_order is None) or (self.b_low is not None and len(self.b_low) != s):
            raise ValueError("tableau: b_low and low_order go together, b_low one entry per stage")

    @property
    def stages_for_b(self) -> int:
        """Stages up to the last non-zero weight of ``b`` (what a fixed step evaluates)."""
        return max(i for i, b in enumerate(self.b) if b != 0.0) + 1

    @property
    def fsal(self) -> bool:
        """First same as last: the last stage is ``F(u_{n+1})``, the next step's ``k_1``."""
        return self.b[-1] == 0.0 and self.a[-1] == self.b[:-1] and self.c[-1] == 1.0

    @property
    def error_weights(self) -> tuple[float, ...]:
        return tuple(b - bl for b, bl in zip(self.b, self.b_low, strict=True))


EULER = ButcherTableau(c=(0.0,), a=((),), b=(1.0,), order=1)
HEUN = ButcherTableau(c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5), order=2)
RALSTON = ButcherTableau(c=(0.0, 2 / 3), a=((), (2 / 3,)), b=(1 / 4, 3 / 4), order=2)  # Ralston (1962)
RK4_CLASSIC = ButcherTableau(
    c=(0.0, 0.5, 0.5, 1.0),
    a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
    b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
    order=4,
)
BOGACKI_SHAMPINE = ButcherTableau(  # Bogacki & Shampine (1989), 3(2), FSAL
    c=(0.0, 0.5, 0.75, 1.0),
    a=((), (0.5,), (0.0, 0.75), (2 / 9, 1 / 3, 4 / 9)),
    b=(2 / 9, 1 / 3, 4 / 9, 0.0),
    order=3,
    b_low=(7 / 24, 1 / 4, 1 / 3, 1 / 8),
    low_order=2,
)
DORMAND_PRINCE = ButcherTableau(  # Dormand & Prince (1980), 5(4), FSAL
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    a=(
        (),
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
    ),
    b=(35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
    order=5,
    b_low=(5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40),
    low_order=4,
)


def _combine(coeffs, ks: list[torch.Tensor]) -> torch.Tensor:
    """``Σ_i coeffs_i k_i`` over the non-zero coefficients (a coefficient 1 costs no multiply)."""
    acc = None
    for c, k in zip(coeffs, ks, strict=False):  # a[i] is shorter than the stages computed so far
        if c == 0.0:
            continue
        term = k if c == 1.0 else c * k
        acc = term if acc is None else acc + term
    return acc


def _advance(u: torch.Tensor, h, coeffs, ks: list[torch.Tensor]) -> torch.Tensor:
    """``u + h Σ_i coeffs_i k_i``: fused multiply-adds when ``h`` is a number (fixed step), else
    ``h`` (B, 1) times the combination."""
    if isinstance(h, torch.Tensor):
        return u + h * _combine(coeffs, ks)
    if not abs(h) * max(abs(c) for c in coeffs) < torch.finfo(u.dtype).max:
        # an ``alpha`` beyond the dtype's range is refused by torch.add; the tensor product
        # overflows to inf instead, which the stop rules then mark as divergence
        return u + torch.tensor(h, dtype=torch.float64).to(u.dtype) * _combine(coeffs, ks)
    acc = None
    for c, k in zip(coeffs, ks, strict=False):
        if c != 0.0:
            acc = torch.add(u, k, alpha=h * c) if acc is None else acc.add_(k, alpha=h * c)
    return u.clone() if acc is None else acc


def _stages(tableau: ButcherTableau, field, u, k1, t, h, n_stages: int, time_dependent: bool) -> list[torch.Tensor]:
    """``[k_1, ..., k_n_stages]`` given ``k_1``; ``h`` a float or (B, 1), ``t`` likewise."""
    ks = [k1]
    for i in range(1, n_stages):
        ti = t + tableau.c[i] * h if time_dependent else t
        ks.append(field(_advance(u, h, tableau.a[i], ks), ti))
    return ks


class ExplicitRK(FixedStepSolver):
    """An explicit RK method with step sizes from a schedule ``dt_n`` (subclasses set ``tableau``).

    Solver state: the time ``t`` (a float, shared by the batch: all running samples have taken
    the same steps). Field evaluations per step: the stages up to the last non-zero weight.
    """

    tableau: ClassVar[ButcherTableau]

    def init(self, field, u0):
        return 0.0

    def step(self, field, u, state, n):
        tab, dt = self.tableau, self.schedule(n)
        t = 0.0 if state is None else state
        needed = self._needed
        k1 = field(u, t)
        ks = _stages(tab, field, u, k1, t, dt, needed, True) if needed > 1 else [k1]
        return StepResult(_advance(u, dt, tab.b, ks), k1, t + dt, needed)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "tableau" in cls.__dict__:
            cls._needed = cls.tableau.stages_for_b


class EmbeddedRK(Solver):
    """An explicit RK pair with per-sample step-size control (subclasses set ``tableau``).

    Each sample carries its own step size and its first stage ``k_1 = F(u)``; a step computes
    every stage for the whole running batch with per-sample ``dt``, and the controller accepts
    the samples with ``err_b ≤ 1`` (they move to ``y``) and rejects the others (they stay put).
    A rejected step still costs its evaluations and counts as a step, so step counts and caps in
    :func:`dynsim.settle` are *attempted* steps.

    Parameters
    ----------
    rtol, atol : local error tolerances (required).
    dt0, dt_max, safety, factor_min, factor_max : the controller's constants
        (:class:`~dynsim.solvers.controllers.PIController`).
    controller : a controller to use instead (then give no other option).

    Solver state per sample: ``{"t": (B,), "dt": (B,), "k1": (B, D) or None, "err_prev"}``.
    Field evaluations: all stages in the first step; one fewer after it for a FSAL tableau.
    """

    tableau: ClassVar[ButcherTableau]

    def __init__(
        self,
        *,
        rtol: float | None = None,
        atol: float | None = None,
        dt0: float = 0.1,
        dt_max: float = 10.0,
        safety: float = 0.9,
        factor_min: float = 0.2,
        factor_max: float = 10.0,
        controller: PIController | None = None,
    ):
        from dynsim.errors import ConfigError

        if controller is None:
            if rtol is None or atol is None:
                raise ConfigError(f"{self.name}: rtol and atol are required (e.g. rtol=1e-5, atol=1e-7)")
            try:
                controller = PIController(rtol, atol, dt0, dt_max, safety, factor_min, factor_max)
            except ConfigError as exc:
                raise ConfigError(f"{self.name}: {exc}") from None
        elif rtol is not None or atol is not None:
            raise ConfigError(f"{self.name}: give either a controller or rtol/atol, not both")
        self.controller = controller

    @property
    def rtol(self) -> float:
        return self.controller.rtol

    @property
    def atol(self) -> float:
        return self.controller.atol

    def __repr__(self) -> str:
        c = self.controller
        return f"{type(self).__name__}(rtol={c.rtol}, atol={c.atol}, dt0={c.dt0}, dt_max={c.dt_max})"

    def init(self, field, u0):
        state = self.controller.init(u0)
        state["k1"] = None
        state["t"] = torch.zeros_like(state["dt"])
        return state

    def step(self, field, u, state, n):
        tab = self.tableau
        dt, k1, t = state["dt"], state["k1"], state["t"]
        h = dt[:, None]
        time_dependent = getattr(field, "time_dependent", True)
        t_col = t[:, None] if time_dependent else None
        evals = len(tab.c)
        if k1 is None or not tab.fsal:
            k1 = field(u, t_col)
        else:
            evals -= 1
        ks = _stages(tab, field, u, k1, t_col, h, len(tab.c), time_dependent)
        y = u + h * _combine(tab.b, ks)
        err = self.controller.error(u, y, h * _combine(tab.error_weights, ks))
        accept, ctrl = self.controller.adapt(err, state, min(tab.order, tab.low_order) + 1)
        u_next = torch.where(accept[:, None], y, u)
        k1_next = torch.where(accept[:, None], ks[-1], k1) if tab.fsal else None
        new_state = {"dt": ctrl["dt"], "err_prev": ctrl["err_prev"], "k1": k1_next,
                     "t": torch.where(accept, t + dt, t)}
        return StepResult(u_next, k1, new_state, evals)

    def select(self, state: Any, keep: torch.Tensor) -> Any:
        return {k: (None if v is None else v[keep]) for k, v in state.items()}


def register_rk(name: str, tableau: ButcherTableau) -> type[Solver]:
    """A solver class for ``tableau`` (fixed step, or adaptive when it has ``b_low``), named
    ``name`` in :data:`dynsim.solvers.SOLVERS` once registered; bind it in
    :mod:`dynsim.solvers` as ``name.capitalize()`` so that it pickles."""
    base = EmbeddedRK if tableau.b_low is not None else ExplicitRK
    cls = type(name.capitalize(), (base,), {"name": name, "tableau": tableau, "__module__": "dynsim.solvers",
                                            "__doc__": f"Explicit RK method {name!r} (order {tableau.order})."})
    return cls


class Euler(ExplicitRK):
    """Forward Euler: ``u_{n+1} = u_n + dt_n · F(u_n)``. One field evaluation per step."""

    name = "euler"
    tableau = EULER


class Heun(ExplicitRK):
    """Heun's method (explicit trapezoid), order 2, two field evaluations per step.

    ``k1 = F(u)``, ``k2 = F(u + dt·k1)``, ``u_{n+1} = u + dt/2·(k1 + k2)``, ``dt = schedule(n)``.

    Examples
    --------
    >>> import torch
    >>> u, f, t, evals = Heun(ConstantStep(0.1)).step(lambda v, t: -v, torch.ones(2, 3), 0.0, 0)
    >>> round(float(u[0, 0]), 6), round(t, 6), evals
    (0.905, 0.1, 2)
    """

    name = "heun"
    tableau = HEUN


class RK4(ExplicitRK):
    """Classical fourth-order Runge–Kutta, four field evaluations per step."""

    name = "rk4"
    tableau = RK4_CLASSIC


class Dopri5(EmbeddedRK):
    """Adaptive Dormand–Prince 5(4), per-sample error control and accept/reject.

    See :class:`EmbeddedRK` for the parameters. Field evaluations: 7 in the first step (``k1``
    at the start), 6 after (first-same-as-last).

    Choosing ``rtol``: near a fixed point the step size climbs to the stability limit and the
    error controller then holds it there, so the field residual stalls at roughly ``rtol``
    (benchmarks/README.md); use ``rtol ≤ T/10`` for a threshold ``T``.

    Examples
    --------
    >>> import torch
    >>> from dynsim import HebbianLayer, settle, ResidualBelow, MaxSteps
    >>> layer = HebbianLayer((1, 8, 8), nps=2, stride=2, radius=3.0)
    >>> res = settle(layer, torch.randn(3, 64), solver=Dopri5(rtol=1e-5, atol=1e-7),
    ...              stop=ResidualBelow(1e-4) | MaxSteps(2000))
    >>> bool(res.converged.all())
    True
    """

    name = "dopri5"
    tableau = DORMAND_PRINCE


from dynsim.solvers.step_sizes import ConstantStep  # noqa: E402,F401  (doctest namespace)
