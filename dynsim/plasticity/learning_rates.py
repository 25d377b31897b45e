"""Learning-rate schedules of the plasticity rules: ``η`` as a function of the epoch (0-based)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dynsim.errors import ConfigError


@dataclass(frozen=True)
class DecayingRate:
    """``η_e = max(eta0 / (1 + decay·e), eta_min)``; the seed uses (5e-3, 0.5, 1e-4)."""

    eta0: float = 5e-3
    decay: float = 0.5
    eta_min: float = 1e-4

    def __post_init__(self) -> None:
        for name in ("eta0", "decay", "eta_min"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"learning-rate {name} must be a finite number >= 0, got {value!r}")

    def __call__(self, epoch: int) -> float:
        return max(self.eta0 / (1.0 + self.decay * epoch), self.eta_min)


SEED_RATE = DecayingRate()
