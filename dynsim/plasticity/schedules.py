"""Deprecated name of :mod:`dynsim.plasticity.learning_rates` (learning-rate schedules)."""

from dynsim.plasticity.learning_rates import SEED_RATE, DecayingRate  # noqa: F401
