"""Deprecated name of :mod:`dynsim.ssl.stage_plans` (layer-wise stage planners)."""

from dynsim.ssl.stage_plans import (  # noqa: F401
    SCHEDULES,
    EndToEnd,
    Greedy,
    RandomLayerwise,
    Schedule,
    StagePlanner,
    make_schedule,
)
