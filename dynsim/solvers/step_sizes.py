"""Step-size schedules of fixed-step solvers: ``dt_n`` as a function of the step index n."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dynsim.errors import ConfigError


class StepSchedule:
    """Maps the step index ``n`` (0-based, per input) to a step size ``dt_n`` (time units)."""

    def __call__(self, n: int) -> float:
        raise NotImplementedError


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}")


@dataclass(frozen=True)
class ConstantStep(StepSchedule):
    """``dt_n = dt``."""

    dt: float

    def __post_init__(self) -> None:
        _positive("dt", self.dt)

    def __call__(self, n: int) -> float:
        return self.dt


@dataclass(frozen=True)
class DecayingStep(StepSchedule):
    """``dt_n = max(dt0 / (1 + decay·n), dt_min)``; the seed uses (0.2, 0.005, 0.05)."""

    dt0: float = 0.2
    decay: float = 0.005
    dt_min: float = 0.05

    def __post_init__(self) -> None:
        _positive("dt0", self.dt0)
        _positive("dt_min", self.dt_min)
        if not (math.isfinite(self.decay) and self.decay >= 0):
            raise ConfigError(f"decay must be >= 0, got {self.decay!r}")

    def __call__(self, n: int) -> float:
        return max(self.dt0 / (1.0 + self.decay * n), self.dt_min)


SEED_SCHEDULE = DecayingStep(0.2, 0.005, 0.05)
"""The schedule of Obeid et al. (2019): ``max(0.2/(1+0.005 n), 0.05)``."""


def parse_schedule(spec: str) -> StepSchedule:
    """Parse ``"seed"``, ``"constant:0.1"`` or ``"decaying:0.2,0.005,0.05"``."""
    name, _, args = spec.partition(":")
    try:
        values = [float(v) for v in args.split(",")] if args else []
    except ValueError:
        raise ConfigError(f"step schedule {spec!r}: arguments must be numbers") from None
    if name == "seed" and not values:
        return SEED_SCHEDULE
    if name == "constant" and len(values) == 1:
        return ConstantStep(values[0])
    if name == "decaying" and len(values) == 3:
        return DecayingStep(*values)
    raise ConfigError(
        f"unknown step schedule {spec!r}; use 'seed', 'constant:DT' or 'decaying:DT0,DECAY,DT_MIN'"
    )
