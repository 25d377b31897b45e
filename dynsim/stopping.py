"""When to stop settling, judged per sample.

A stop rule looks at each running sample's *candidate* state and returns a status code per
sample: ``Status.RUNNING`` (0) to go on, otherwise why it stopped. Combine rules with ``|``:
``ResidualBelow(1e-4) | MaxSteps(3000)`` stops a sample at whichever comes first.

Residuals. ``on="field"`` (default) judges the vector field ``F = du/ds`` at the current
state, the solver-independent fixed-point residual; the returned state then satisfies the
test exactly. This is the test of both Obeid et al.'s code and the reproduction report's code.
``on="increment"`` judges the change of the last step ``Δu = u_{n+1} − u_n``, a looser
variant (for Euler ``Δu = dt_n F``, so it is looser by ``1/dt_n``: 5–20× with the seed's
schedule). A sample is settled when

    ‖r‖ < atol + rtol·‖u‖,        r = F(u) or Δu,

the steady-state test of diffrax (Kidger 2021, "On Neural Differential Equations", §5.4);
with ``atol = 0`` (default) that is ``‖r‖/‖u‖ < rtol``.

Backends. Each rule describes its limits through :meth:`StopRule.limits` (a tolerance, an
absolute tolerance, a step cap, which status wins a tie). :func:`dynsim.settle` hands these to
its backends, so a fast path honours the rules without knowing their classes; a rule
without such a description (``limits() -> None``) is judged by :meth:`StopRule.status` on the
torch path.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

from dynsim.errors import ConfigError

_TINY = 1e-12


class Status(enum.IntEnum):
    """Why a sample stopped."""

    RUNNING = 0
    SETTLED = 1
    MAX_STEPS = 2
    DIVERGED = 3


@dataclass(frozen=True)
class StopLimits:
    """A stop rule in numbers: a sample runs while ``‖r‖ ≥ atol + rtol·‖u‖`` and ``steps < cap``.

    ``rtol``/``cap`` ``None``: that test is absent. ``on``: which residual ``r`` ("field" or
    "increment"). ``cap_first``: when both tests fire on the same step, the status is
    ``MAX_STEPS`` (else ``SETTLED``).
    """

    rtol: float | None = None
    atol: float = 0.0
    cap: int | None = None
    cap_first: bool = False
    on: str = "field"

    def running(self, residual: torch.Tensor, state_norm: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the residual test has not fired (True everywhere when there is none)."""
        if self.rtol is None:
            return torch.ones_like(residual, dtype=torch.bool)
        return residual >= self.threshold(state_norm)

    def threshold(self, state_norm: torch.Tensor) -> torch.Tensor | float:
        """The bound on ``‖r‖/‖u‖``: ``rtol + atol/‖u‖`` (``rtol`` when ``atol = 0``)."""
        if not self.atol:
            return self.rtol
        return self.rtol + self.atol / state_norm.clamp_min(_TINY)


def _cached(method):
    """Compute a frozen rule's limits once (settle asks on every call, once per input in online learning)."""

    def wrapper(self):
        cache = self.__dict__
        if "_limits" not in cache:
            cache["_limits"] = method(self)
        return cache["_limits"]

    wrapper.__doc__, wrapper.__name__ = method.__doc__, method.__name__
    return wrapper


class StopRule:
    """Base class. ``status(residual, steps, state_norm=...)`` -> (B,) int8 status codes.

    ``residual`` (B,) is ``‖r‖/‖u‖`` (``‖u‖`` floored at 1e-12), ``steps`` the steps taken by
    the candidate state, ``state_norm`` (B,) its ``‖u‖``.
    """

    on: str | None = None

    def status(self, residual: torch.Tensor, steps: int, *, state_norm: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def limits(self) -> StopLimits | None:
        """This rule as :class:`StopLimits`, or ``None`` when it is not expressible that way."""
        return None

    def __or__(self, other: StopRule) -> AnyOf:
        return AnyOf((self, other))

    @property
    def tolerance(self) -> float | None:
        return None

    @property
    def max_steps(self) -> int | None:
        return None


def _check_tol(name: str, value, *, zero_ok: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and (value >= 0 if zero_ok else value > 0)):
        bound = ">= 0" if zero_ok else "> 0"
        raise ConfigError(f"{name} must be a finite number {bound} (e.g. 1e-4), got {value!r}")


@dataclass(frozen=True)
class ResidualBelow(StopRule):
    """Settled when ``‖r‖ < atol + tol·‖u‖`` (module docstring); ``r`` per ``on``.

    Parameters
    ----------
    tol : relative tolerance (the threshold ``T`` on ``‖r‖/‖u‖``), > 0.
    on : "field" (``r = du/ds`` at the state) or "increment" (``r`` = the last step's change).
    atol : absolute tolerance on ``‖r‖`` (same units as ``r``), ≥ 0. Needed for systems whose
        fixed point is ``u = 0`` (e.g. ``du/ds = −u``), where ``‖r‖/‖u‖`` never gets small.

    Examples
    --------
    >>> rule = ResidualBelow(1e-4, atol=1e-6)
    >>> rule.status(torch.tensor([1.0, 1.0]), 5, state_norm=torch.tensor([1e-7, 1.0])).tolist()
    [1, 0]
    """

    tol: float
    on: str = "field"
    atol: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.tol, (int, float)) and math.isfinite(self.tol) and self.tol > 0):
            raise ConfigError(f"threshold T must be a positive number (e.g. 1e-4), got {self.tol!r}")
        _check_tol("atol", self.atol, zero_ok=True)
        if self.on not in ("field", "increment"):
            raise ConfigError(f"residual must be 'field' or 'increment', got {self.on!r}")

    @_cached
    def limits(self) -> StopLimits:
        return StopLimits(rtol=float(self.tol), atol=float(self.atol), on=self.on)

    def status(self, residual, steps, *, state_norm=None):
        if self.atol and state_norm is None:
            raise ValueError("ResidualBelow with atol > 0 needs state_norm")
        running = self.limits().running(residual, state_norm)
        return torch.where(running, Status.RUNNING, Status.SETTLED).to(torch.int8)

    @property
    def tolerance(self):
        return self.tol


RelativeChange = ResidualBelow
"""Deprecated alias of :class:`ResidualBelow` (the old name; it judges the field residual by default)."""


@dataclass(frozen=True)
class MaxSteps(StopRule):
    """Stop after ``n`` solver steps (the iteration cap)."""

    n: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and self.n >= 0):
            raise ConfigError(f"step cap must be an integer >= 0, got {self.n!r}")

    @_cached
    def limits(self) -> StopLimits:
        return StopLimits(cap=self.n)

    def status(self, residual, steps, *, state_norm=None):
        code = Status.MAX_STEPS if steps >= self.n else Status.RUNNING
        return torch.full(residual.shape, int(code), dtype=torch.int8, device=residual.device)

    @property
    def max_steps(self):
        return self.n


@dataclass(frozen=True)
class AnyOf(StopRule):
    """Stops a sample when any of ``rules`` does; the first rule that fires names the status."""

    rules: tuple[StopRule, ...]

    def __post_init__(self) -> None:
        kinds = {r.on for r in self.rules if r.on is not None}
        if len(kinds) > 1:
            raise ConfigError("cannot combine stop rules judged on different residuals")

    @property
    def on(self):  # type: ignore[override]
        return next((r.on for r in self.rules if r.on is not None), None)

    @_cached
    def limits(self) -> StopLimits | None:
        """The parts' limits combined: the loosest residual test (one ``atol`` only), the
        smallest cap; ``None`` if a part has none (or the parts' ``atol`` differ)."""
        parts = [r.limits() for r in self.rules]
        if any(p is None for p in parts):
            return None
        tested = [p for p in parts if p.rtol is not None]
        capped = [p for p in parts if p.cap is not None]
        if len({p.atol for p in tested}) > 1:
            return None
        first_tol = next((i for i, p in enumerate(parts) if p.rtol is not None), len(parts))
        first_cap = next((i for i, p in enumerate(parts) if p.cap is not None), len(parts))
        return StopLimits(
            rtol=max(p.rtol for p in tested) if tested else None,
            atol=tested[0].atol if tested else 0.0,
            cap=min(p.cap for p in capped) if capped else None,
            cap_first=first_cap < first_tol,
            on=self.on or "field",
        )

    def status(self, residual, steps, *, state_norm=None):
        out = torch.zeros(residual.shape, dtype=torch.int8, device=residual.device)
        for rule in self.rules:
            s = rule.status(residual, steps, state_norm=state_norm)
            out = torch.where(out == Status.RUNNING, s, out)
        return out

    def __or__(self, other):
        return AnyOf((*self.rules, other))

    @property
    def tolerance(self):
        return min((r.tolerance for r in self.rules if r.tolerance is not None), default=None)

    @property
    def max_steps(self):
        return min((r.max_steps for r in self.rules if r.max_steps is not None), default=None)


def stop_rule(threshold: float | None, max_steps: int | None, *, on: str = "field", atol: float = 0.0) -> StopRule:
    """``ResidualBelow(threshold, on, atol) | MaxSteps(max_steps)``, either part optional (not both)."""
    rules: list[StopRule] = []
    if threshold is not None:
        rules.append(ResidualBelow(threshold, on, atol))
    if max_steps is not None:
        rules.append(MaxSteps(max_steps))
    if not rules:
        raise ConfigError("settling needs a threshold, a step cap, or both; got neither")
    return rules[0] if len(rules) == 1 else AnyOf(tuple(rules))


def relative_norm(f: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per-sample ``‖f‖ / ‖u‖`` (``‖f‖ / 1e-12`` where ``u = 0``, 0 where ``f = 0``)."""
    num = torch.linalg.vector_norm(f, dim=1)
    den = torch.linalg.vector_norm(u, dim=1)
    return num / den.clamp_min(_TINY)  # 0 where f = 0; large where u = 0 only
