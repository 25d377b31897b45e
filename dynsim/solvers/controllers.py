"""Step-size controllers: given a step's error estimate, accept or reject it and choose the next step.

The controller is apart from the Runge–Kutta method (diffrax's ``PIDController``; Hairer &
Wanner, "Solving ODEs II", §IV.2, and Söderlind 2002 for PI control). Each sample has its own
step size ``dt`` (B,). With the local error estimate ``e`` (B, D) of a method whose error
estimator has order ``q`` (``k = q + 1``),

    err_b = RMS_i( e_bi / (atol + rtol·max(|u_bi|, |y_bi|)) ),

a sample is accepted when ``err_b ≤ 1``, and every sample gets the new step

    dt ← min(dt · clip(safety · err_b^(−β₁/k) · err_prev_b^(β₂/k), factor_min, factor_max), dt_max)

(the factor capped at 1 for a rejected sample; ``err_prev`` is the error of the sample's last
accepted step). ``β₂ = 0`` (default) is the classical integral (I) controller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from dynsim.errors import ConfigError


@dataclass(frozen=True)
class PIController:
    """Per-sample PI step-size control (module docstring).

    Parameters
    ----------
    rtol, atol : local error tolerances (required: no silent defaults for tolerances).
    dt0 : initial step size of every sample (time units).
    dt_max : largest step size allowed.
    safety, factor_min, factor_max : the usual safety factor and bounds on the step change.
    beta1, beta2 : integral and proportional gains (β₁ = 1, β₂ = 0: I control).

    Examples
    --------
    A step with half the tolerated error is accepted and the next one grows by
    ``0.9 · 0.5^(−1/5) = 1.034``; one with twice the error is rejected and shrinks by ``0.9 · 2^(−1/5)``:

    >>> c = PIController(rtol=1e-3, atol=1e-6, dt0=0.5)
    >>> accept, state = c.adapt(torch.tensor([0.5, 2.0]), c.init(torch.zeros(2, 3)), k=5)
    >>> accept.tolist(), [round(v, 4) for v in state["dt"].tolist()]
    ([True, False], [0.5169, 0.3917])
    """

    rtol: float
    atol: float
    dt0: float = 0.1
    dt_max: float = 10.0
    safety: float = 0.9
    factor_min: float = 0.2
    factor_max: float = 10.0
    beta1: float = 1.0
    beta2: float = 0.0

    def __post_init__(self) -> None:
        for key in ("rtol", "atol", "dt0", "dt_max"):
            v = getattr(self, key)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"step-size controller: {key} must be a positive number, got {v!r}")

    def init(self, u0: torch.Tensor) -> dict[str, Any]:
        """``{"dt": (B,), "err_prev": (B,) or None}`` at the start."""
        dt = torch.full((u0.shape[0],), float(self.dt0), dtype=u0.dtype, device=u0.device)
        return {"dt": dt, "err_prev": torch.ones_like(dt) if self.beta2 else None}

    def error(self, u: torch.Tensor, y: torch.Tensor, err_vec: torch.Tensor) -> torch.Tensor:
        """(B,) scaled RMS error ``err_b`` of a step from ``u`` to ``y`` with estimate ``err_vec``
        (NaN counts as infinite: the step is rejected)."""
        scale = self.atol + self.rtol * torch.maximum(u.abs(), y.abs())
        err = torch.sqrt(torch.mean((err_vec / scale) ** 2, dim=1))
        return torch.nan_to_num(err, nan=math.inf)

    def adapt(self, err: torch.Tensor, state: dict[str, Any], k: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """``(accept (B,) bool, new state)`` for errors ``err`` (B,), ``k`` = estimator order + 1."""
        accept = err <= 1.0
        e = err.clamp_min(1e-10)
        factor = self.safety * e ** (-self.beta1 / k)
        err_prev = state["err_prev"]
        if err_prev is not None:
            factor = factor * err_prev ** (self.beta2 / k)
            err_prev = torch.where(accept, e, err_prev)
        factor = factor.clamp(self.factor_min, self.factor_max)
        factor = torch.where(accept, factor, factor.clamp_max(1.0))
        return accept, {"dt": (state["dt"] * factor).clamp_max(self.dt_max), "err_prev": err_prev}
