"""Learning rules as callbacks on the event loop, and their learning-rate schedules."""

from dynsim.plasticity.learning_rates import SEED_RATE, DecayingRate
from dynsim.plasticity.similarity_matching import BATCH_RULES, SimilarityMatchingRule, hebbian_update

__all__ = ["BATCH_RULES", "SEED_RATE", "DecayingRate", "SimilarityMatchingRule", "hebbian_update"]
