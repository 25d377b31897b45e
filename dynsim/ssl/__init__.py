"""Self-supervised learning with local update rules (Tang, Yang & Amit 2022).

Pieces, one module each: encoder stages and heads (:mod:`.stages`), the contrastive
hinge loss (:mod:`.loss`), deformations (:mod:`.augment`), the per-batch learning signals
(:mod:`.signals`), learning rules as plasticity callbacks (:mod:`.rules`) and the stage
planners of layer-wise training (:mod:`.stage_plans`). The assembled pipeline is :mod:`dynsim.pipelines.ssl`.
"""

from dynsim.ssl.augment import Deform
from dynsim.ssl.loss import HingeResult, hinge_loss
from dynsim.ssl.rules import BP, DTP, RF, RULES, URF, Inverse, LocalRule, build_inverses, make_rules
from dynsim.ssl.signals import ContrastiveSignals, Plan, SSLStep
from dynsim.ssl.stage_plans import (
    SCHEDULES,
    EndToEnd,
    Greedy,
    RandomLayerwise,
    Schedule,
    StagePlanner,
    make_schedule,
)
from dynsim.ssl.stages import ARCHS, Conv3x3, Dense, Encoder, Head, Stage, build_encoder

ContrastiveSettler = ContrastiveSignals  # deprecated name

__all__ = [
    "ARCHS",
    "BP",
    "DTP",
    "RF",
    "RULES",
    "SCHEDULES",
    "URF",
    "ContrastiveSettler",
    "ContrastiveSignals",
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
    "StagePlanner",
    "build_encoder",
    "build_inverses",
    "hinge_loss",
    "make_rules",
    "make_schedule",
]
