"""Deprecated name of :mod:`dynsim.solvers.step_sizes` (step-size schedules)."""

from dynsim.solvers.step_sizes import (  # noqa: F401
    SEED_SCHEDULE,
    ConstantStep,
    DecayingStep,
    StepSchedule,
    parse_schedule,
)
