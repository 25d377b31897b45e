"""When to stop settling, judged per sample.

A stop rule looks at each running sample's *candidate* state and returns a status code per
sample: ``Status.RUNNING`` (0) to go on, otherwise why it stopped. Combine rules with ``|``:
``RelativeChange(1e-4) | MaxSteps(3000)`` stops a sample at whichever comes first.

Residuals. ``on="field"`` (default) judges ``‖du/ds‖/‖u‖`` at the current state, the
solver-independent fixed-point residual; the returned state then satisfies it exactly.
This is the test of both Obeid et al.'s code and the reproduction report's code.
``on="increment"`` judges the relative change of the last step ``‖u_{n+1} − u_n‖/‖u_n‖``,
a looser variant (for Euler it equals ``dt_n`` times the field residual, so it is looser by
``1/dt_n``: 5–20× with the seed's schedule).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

from dynsim.errors import ConfigError


class Status(enum.IntEnum):
    """Why a sample stopped."""

    RUNNING = 0
    SETTLED = 1
    MAX_STEPS = 2
    DIVERGED = 3


class StopRule:
    """Base class. ``status(residual, steps)`` -> (B,) int8 status codes."""

    on: str | None = None

    def status(self, residual: torch.Tensor, steps: int) -> torch.Tensor:
        raise NotImplementedError

    def __or__(self, other: StopRule) -> AnyOf:
        return AnyOf((self, other))

    @property
    def tolerance(self) -> float | None:
        return None

    @property
    def max_steps(self) -> int | None:
        return None


@dataclass(frozen=True)
class RelativeChange(StopRule):
    """Settled when the residual is below ``tol`` (``on`` = "field" or "increment")."""

    tol: float
    on: str = "field"

    def __post_init__(self) -> None:
        if not (isinstance(self.tol, (int, float)) and math.isfinite(self.tol) and self.tol > 0):
            raise ConfigError(f"threshold T must be a positive number (e.g. 1e-4), got {self.tol!r}")
        if self.on not in ("field", "increment"):
            raise ConfigError(f"residual must be 'field' or 'increment', got {self.on!r}")

    def status(self, residual, steps):
        return torch.where(residual < self.tol, Status.SETTLED, Status.RUNNING).to(torch.int8)

    @property
    def tolerance(self):
        return self.tol


@dataclass(frozen=True)
class MaxSteps(StopRule):
    """Stop after ``n`` solver steps (the iteration cap)."""

    n: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and self.n >= 0):
            raise ConfigError(f"step cap must be an integer >= 0, got {self.n!r}")

    def status(self, residual, steps):
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

    def status(self, residual, steps):
        out = torch.zeros(residual.shape, dtype=torch.int8, device=residual.device)
        for rule in self.rules:
            s = rule.status(residual, steps)
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


def stop_rule(threshold: float | None, max_steps: int | None, *, on: str = "field") -> StopRule:
    """``RelativeChange(threshold, on) | MaxSteps(max_steps)``, either part optional (not both)."""
    rules: list[StopRule] = []
    if threshold is not None:
        rules.append(RelativeChange(threshold, on))
    if max_steps is not None:
        rules.append(MaxSteps(max_steps))
    if not rules:
        raise ConfigError("settling needs a threshold, a step cap, or both; got neither")
    return rules[0] if len(rules) == 1 else AnyOf(tuple(rules))
