"""Self-supervised learning with local update rules (Tang, Yang & Amit 2022).

Pieces, one module each: encoder stages and heads (:mod:`.stages`), the contrastive
hinge loss (:mod:`.loss`), deformations (:mod:`.augment`), the per-batch settler
(:mod:`.settler`), learning rules as plasticity callbacks (:mod:`.rules`) and learning
schedules (:mod:`.schedules`). The assembled pipeline is :mod:`dynsim.pipelines.ssl`.
"""

from dynsim.ssl.augment import Deform
from dynsim.ssl.loss import HingeResult, hinge_loss
from dynsim.ssl.rules import BP, DTP, RF, RULES, URF, Inverse, LocalRule, build_inverses, make_rules
from dynsim.ssl.schedules import (
    SCHEDULES,
    EndToEnd,
    Greedy,
    RandomLayerwise,
    Schedule,
    make_schedule,
)
from dynsim.ssl.settler import ContrastiveSettler, Plan, SSLStep
from dynsim.ssl.stages import ARCHS, Conv3x3, Dense, Encoder, Head, Stage, build_encoder

__all__ = [
    "ARCHS",
    "BP",
    "DTP",
    "RF",
    "RULES",
    "SCHEDULES",
    "URF",
    "ContrastiveSettler",
    "Conv3x3",
    "Deform",
    "Dense",
    "Encoder",
    "EndToEnd",
    "Greedy",
    "Head",
    "HingeResult",
    "Inverse",
    "LocalRule",
    "Plan",
    "RandomLayerwise",
    "SSLStep",
    "Schedule",
    "Stage",
    "build_encoder",
    "build_inverses",
    "hinge_loss",
    "make_rules",
    "make_schedule",
]
