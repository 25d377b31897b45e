"""Assemble networks from settings, in one place: the DSSM layer or deep network, its solver,
stop rule, settler and plasticity rule (used by :func:`dynsim.pipelines.dssm.run_dssm`, the
scikit-learn transformer, the solver bench, the studies and the benchmarks), the DSSM data
(per-image centred images, epochs of draws with replacement), and the SSL encoder's training
parts (used by :func:`dynsim.pipelines.ssl.run_ssl`).

DSSM structure (Obeid, Ramambason & Pehlevan 2019): sites on a grid of stride ``s`` pixels,
each seeing the pixels within radius ``ρ`` of its centre, ``NpS`` neurons per site; layers
above the first see the sites of the layer below (stride 1, radius 2 by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dynsim.engine import DynamicsSettler, EpochDraws
from dynsim.errors import ConfigError
from dynsim.plasticity import DecayingRate, SimilarityMatchingRule
from dynsim.plasticity.deep import DeepSimilarityMatchingRule
from dynsim.solvers import Solver, solver_from_spec
from dynsim.stopping import StopRule, stop_rule
from dynsim.systems import HebbianLayer
from dynsim.systems.deep import DeepHebbianNet, LayerSpec

# receptive-field geometry per image size when the user gives none: (stride, radius)
DEFAULT_GEOMETRY = {
    (8, 8): (2, 3.0),  # digits: 4x4 sites, 32-pixel discs (half the image; digits are ~4x coarser)
    (28, 28): (2, 4.0),  # MNIST-like (Obeid et al. 2019): 14x14 sites, 52-pixel discs
    (32, 32): (2, 4.0),
}


DEEP_GEOMETRY = (1, 2.0)  # (stride, radius) of layers above the first, in sites of the layer below


def build_system(config, image_shape: tuple[int, int, int]) -> HebbianLayer | DeepHebbianNet:
    """``build_layer`` for one layer; a :class:`DeepHebbianNet` for ``config.layers > 1``.

    Layers above the first default to stride 1 and radius 2 (in sites of the layer below).
    """
    if config.layers == 1:
        return build_layer(config, image_shape)
    stride, radius = DEFAULT_GEOMETRY.get(tuple(image_shape[1:]), (2, 4.0))
    specs = [
        LayerSpec(
            nps=s["nps"],
            stride=s["stride"] or (stride if p == 0 else DEEP_GEOMETRY[0]),
            radius=s["radius"] or (radius if p == 0 else DEEP_GEOMETRY[1]),
            lateral_distance=s["lateral_distance"],
        )
        for p, s in enumerate(config.layer_structure())
    ]
    return DeepHebbianNet(
        image_shape,
        specs,
        gamma=config.gamma,
        gains=config.per_layer("gains"),
        mult_factors=config.per_layer("mult_factors"),
        layer_stop=config.layer_stop,
        lateral_sign=config.lateral_sign,
        activation=config.activation,
        tau=config.tau,
        seed=config.seed,
    )


def build_layer(config, image_shape: tuple[int, int, int]) -> HebbianLayer:
    """The structured layer for ``image_shape``, geometry from the config or the defaults."""
    stride, radius = DEFAULT_GEOMETRY.get(tuple(image_shape[1:]), (2, 4.0))
    spec = config.layer_structure()[0]
    return HebbianLayer(
        image_shape,
        nps=spec["nps"],
        stride=spec["stride"] or stride,
        radius=spec["radius"] or radius,
        lateral_distance=spec["lateral_distance"],
        lateral_sign=config.lateral_sign,
        activation=config.activation,
        tau=config.tau,
        seed=config.seed,
    )


def describe_system(system: HebbianLayer | DeepHebbianNet) -> dict[str, Any]:
    """Structure summary for the result file (per layer for a deep network)."""
    if isinstance(system, DeepHebbianNet):
        return {"n_neurons": system.state_size, "gamma": system.gamma, "layer_stop": system.layer_stop,
                "layers": system.describe()}
    return {
        "n_neurons": system.state_size,
        "n_sites": system.n_sites,
        "stride": system.stride,
        "radius": system.radius,
        "mean_fan_in": system.mean_fan_in,
        "ff_nonzeros": system.ff.nnz,
        "lateral_nonzeros": system.lateral.nnz,
    }


def prepare_data(config):
    """Load the data set and apply the DSSM preprocessing (per-image mean removed)."""
    from dynsim.data import center_per_image, check_images, load_dataset

    ds = load_dataset(config.data, config.data_dir)
    x_train = center_per_image(check_images(ds.x_train, ds.n_features, name="x_train"))
    x_test = center_per_image(check_images(ds.x_test, ds.n_features, name="x_test"))
    return ds, x_train, x_test


def epoch_batches(x: torch.Tensor, *, images: int, batch_size: int, seed: int) -> EpochDraws:
    """``batches(epoch)``: ``images`` draws with replacement per epoch, seeded by (seed, epoch)."""
    return EpochDraws(x, images=images, batch_size=batch_size, seed=seed)


def subset(x: np.ndarray, y: np.ndarray, n: int | None, seed: int):
    if n is None or n >= len(x):
        return x, y
    idx = np.sort(np.random.default_rng(seed).choice(len(x), size=n, replace=False))
    return x[idx], y[idx]


def readout_sets(config, ds, x_train: np.ndarray, x_test: np.ndarray):
    """The readout's train and test sets ``(x_train, y_train, x_test, y_test)``: all images, or
    the seeded subsets of ``eval_train_size`` / ``eval_test_size`` (seeds ``seed``, ``seed + 1``);
    refused (one line) when a subset holds a single class."""
    ev_xtr, ev_ytr = subset(x_train, ds.y_train, config.eval_train_size, config.seed)
    ev_xte, ev_yte = subset(x_test, ds.y_test, config.eval_test_size, config.seed + 1)
    for flag, y in (("--eval-train-size", ev_ytr), ("--eval-test-size", ev_yte)):
        if len(np.unique(y)) < 2:
            raise ConfigError(f"{flag} leaves {len(y)} sample(s) of a single class, too few for a readout; "
                              f"use at least {2 * ds.n_classes} or 'none' for all")
    return ev_xtr, ev_ytr, ev_xte, ev_yte


def build_solver(config, spec: str | None = None) -> Solver:
    """The solver of ``spec`` (default: the config's :meth:`~dynsim.configs.dssm.DSSMConfig.resolved_solver`),
    fixed-step methods with the config's step sizes."""
    return solver_from_spec(spec or config.resolved_solver(), schedule=config.schedule)


def build_stop(config) -> StopRule:
    """``‖du/ds‖/‖u‖ < threshold`` (or the increment's, ``residual``) or ``max_steps``, per sample."""
    return stop_rule(config.threshold, config.max_steps, on=config.residual)


def build_rule(config, system: HebbianLayer | DeepHebbianNet) -> SimilarityMatchingRule:
    """The Hebbian/anti-Hebbian rule ``ΔW = η (r xᵀ − W)``, ``ΔL = (η/2)(r rᵀ − L)`` at
    ``η_e = max(eta0/(1 + eta_decay·e), eta_min)``; the deep variant for a deep network."""
    rate = DecayingRate(config.eta0, config.eta_decay, config.eta_min)
    if isinstance(system, DeepHebbianNet):
        return DeepSimilarityMatchingRule(system, rate=rate, batch_rule=config.batch_rule,
                                          lateral_rule=config.lateral_rule)
    return SimilarityMatchingRule(system, rate=rate, batch_rule=config.batch_rule)


@dataclass
class DSSMNetwork:
    """A DSSM network ready to train: the system, how it settles, and its plasticity rule."""

    system: HebbianLayer | DeepHebbianNet
    solver: Solver
    stop: StopRule
    settler: DynamicsSettler
    rule: SimilarityMatchingRule


def build_dssm(config, image_shape: tuple[int, int, int] | None = None, *,
               system: HebbianLayer | DeepHebbianNet | None = None, device: str | None = None) -> DSSMNetwork:
    """Assemble the network of ``config`` on ``image_shape`` (or around an existing ``system``):
    :func:`build_system`, :func:`build_solver`, :func:`build_stop`, the settler (streaming
    and divergence handling from the config) and :func:`build_rule`."""
    if system is None:
        system = build_system(config, image_shape)
    if device is not None:
        system = system.to(torch.device(device))
    solver, stop = build_solver(config), build_stop(config)
    settler = DynamicsSettler(system, solver, stop, stream_every=config.stream_every,
                              on_divergence=config.on_divergence, carry=config.stream_carry)
    return DSSMNetwork(system, solver, stop, settler, build_rule(config, system))


def build_ssl_training(config, encoder, shape: tuple[int, ...], generator: torch.Generator, batches_per_epoch: int,
                       device: torch.device):
    """The training parts of an SSL run (Tang, Yang & Amit 2022) around ``encoder``: the
    contrastive settler (deformed views, hinge loss with threshold τ and margin δ, error or
    target propagation), the update rules (BP / RF / URF / DTP, one per stage), the learning
    schedule (E2E / GLL / RLL) and, for DTP, the inverse maps. All draw from ``generator``,
    in this order. Returns ``(settler, rules, schedule, inverses)``."""
    from dynsim.configs.ssl import FLIP_DEFAULT
    from dynsim.ssl.augment import Deform
    from dynsim.ssl.rules import build_inverses, make_rules
    from dynsim.ssl.schedules import make_schedule
    from dynsim.ssl.settler import ContrastiveSettler

    deform = Deform(flip=FLIP_DEFAULT.get(config.data, True) if config.flip is None else config.flip)
    inverses = None
    if config.rule == "dtp":
        inverses = build_inverses(encoder, shape, generator)
        for g in inverses.values():
            g.to(device)
    rules = make_rules(config.rule, encoder, lr=config.resolved_lr(), generator=generator, inverses=inverses,
                       dtp_noise=config.dtp_noise)
    settler = ContrastiveSettler(
        encoder, shape, deform, tau=config.tau, delta=config.delta, negatives=config.negatives,
        grad_block=config.grad_block, wrap=config.negatives_wrap, views=config.views,
        propagation="target" if config.rule == "dtp" else "error",
        inverses=inverses, target_step=config.dtp_step, generator=generator,
    )
    schedule = make_schedule(config.schedule, settler, rules, epochs=config.epochs,
                             batches_per_epoch=batches_per_epoch, generator=generator)
    return settler, rules, schedule, inverses
