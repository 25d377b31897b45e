"""Training to a plateau and watching it: the loss-plateau stop rule, the probe over epochs and
the embedding's effective rank, as callbacks on the engine.

- :class:`PlateauStop` ends training when the epoch loss has stopped falling: at the end of
  epoch e (with at least ``window`` epochs behind it in the current phase) it stops when the
  relative decrease over the last ``window`` epochs is below ``tol``,

      (L_{e−w} − L_e) / |L_{e−w}|  <  tol,

  where ``L_e`` is the mean hinge loss per image of epoch e. The epoch budget (``--epochs``)
  still caps training. Under greedy layer-wise training (GLL) a plateau ends the current
  stage instead, and training ends when the last stage reaches its plateau.
- :class:`TrainingMonitor` every ``every`` epochs adds to that epoch's history row the linear
  probe's accuracy, the embedding's effective rank and its scale (:func:`embedding_stats`).

The effective rank (Roy & Vetterli, "The effective rank: a measure of effective
dimensionality", EUSIPCO 2007) of features F (N, D), centred over the N images, with singular
values σ_k: ``erank = exp(−Σ p_k log p_k)``, ``p_k = σ_k / Σ σ``; it is 1 for features on one
line and D for an isotropic cloud.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from dynsim.callbacks import Callback
from dynsim.errors import ConfigError


def effective_rank(features: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank of the centred features (N, D) (module docstring).

    >>> effective_rank(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]))
    2.0
    """
    f = features.to(torch.float64)
    f = f - f.mean(0, keepdim=True)
    # σ_k² are the eigenvalues of the smaller Gram matrix (F Fᵀ or Fᵀ F), cheaper than svdvals
    gram = f @ f.T if f.shape[0] <= f.shape[1] else f.T @ f
    s = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    if float(s.sum()) == 0.0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def embedding_stats(features: torch.Tensor) -> dict[str, float]:
    """``effective_rank`` and ``feature_rms`` (root mean square of the entries) of (N, D) features."""
    return {
        "effective_rank": effective_rank(features),
        "feature_rms": float(features.to(torch.float64).pow(2).mean().sqrt()),
    }


def plateau_reached(losses: list[float], *, tol: float, window: int) -> bool:
    """True when the relative decrease of the last ``window`` epochs is below ``tol``.

    >>> plateau_reached([10.0, 8.0, 7.9, 7.85], tol=0.05, window=2)
    True
    >>> plateau_reached([10.0, 8.0, 7.9], tol=0.05, window=2)
    False
    """
    if len(losses) <= window:
        return False
    before, now = losses[-1 - window], losses[-1]
    if not (math.isfinite(before) and math.isfinite(now)) or before == 0:
        return False
    return (before - now) / abs(before) < tol


class PlateauStop(Callback):
    """Stop (or, under GLL, move to the next stage) when the epoch loss reaches a plateau.

    Parameters
    ----------
    rows : the per-epoch history rows (each with ``"loss"``), filled before this runs.
    tol, window : the rule of :func:`plateau_reached`; ``tol = 0`` switches it off.
    planner : a planner with ``advance(epoch) -> bool`` (GLL), or None.

    Attributes
    ----------
    events : one ``{"epoch", "stage", "action"}`` per plateau ("next stage" or "stop").
    """

    def __init__(self, rows: list[dict[str, Any]], *, tol: float, window: int, planner: Any = None):
        if not tol >= 0 or not isinstance(window, int) or window < 1:
            raise ConfigError(f"plateau tol = {tol} must be >= 0 and window = {window} an integer >= 1")
        self.rows, self.tol, self.window, self.planner = rows, tol, window, planner
        self.events: list[dict[str, Any]] = []

    def on_epoch_end(self, engine: Any, epoch: int) -> None:  # noqa: D102
        if self.tol == 0:
            return
        start = getattr(self.planner, "stage_start", 0)  # GLL: the current stage's epochs only
        losses = [r["loss"] for r in self.rows if r["epoch"] >= start]
        if not plateau_reached(losses, tol=self.tol, window=self.window):
            return
        stage = getattr(self.planner, "stage", None)
        if self.planner is not None and hasattr(self.planner, "advance") and self.planner.advance(epoch):
            self.events.append({"epoch": epoch, "stage": stage, "action": "next stage"})
            return
        self.events.append({"epoch": epoch, "stage": stage, "action": "stop"})
        engine.should_stop = True

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"events": [dict(e) for e in self.events]}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        self.events = [dict(e) for e in state["events"]]


class TrainingMonitor(Callback):
    """Every ``every`` epochs (and after the last), add probe accuracy and embedding statistics
    to the epoch's history row.

    Parameters
    ----------
    rows : the per-epoch history rows.
    every : epochs between measurements (0: never during training).
    measure : callable returning the measurements (kept in :attr:`last` with the epoch).
    prefix : maps them to the fields added to the row (e.g. ``probe_test_accuracy``,
        ``effective_rank``, ``feature_rms``); identity when None.
    """

    def __init__(self, rows: list[dict[str, Any]], *, every: int, measure: Callable[[], dict[str, Any]],
                 prefix: Callable[[dict[str, Any]], dict[str, Any]] | None = None):
        self.rows, self.every, self.measure = rows, every, measure
        self.prefix = prefix or (lambda m: m)
        self.last: tuple[int, dict[str, Any]] | None = None  # (epoch, what measure returned)

    def on_epoch_end(self, engine: Any, epoch: int) -> None:  # noqa: D102
        if self.every and (epoch + 1) % self.every == 0 and self.rows:
            measured = self.measure()
            self.last = (epoch, measured)
            self.rows[-1].update(self.prefix(measured))


STATS_IMAGES = 2000  # training images whose embedding gives the effective rank and scale


def probe_encoder(encoder, x_train, y_train, x_test, y_test, *, probe: str, epochs: int, batch_size: int,
                  standardize: bool, seed: int, device: str = "cpu") -> dict[str, Any]:
    """Linear-probe accuracy of the frozen ``encoder`` and its embedding's statistics.

    ``probe="adam"`` is the authors' protocol (Tang, Yang & Amit 2022): one linear layer with
    bias on the embedding, cross-entropy, Adam 1e-3, ``epochs`` passes in mini-batches of
    ``batch_size`` (:func:`dynsim.readouts.fit_linear_probe`); ``"svc"`` / ``"ridge"`` are the
    exact readouts of :mod:`dynsim.readouts`. ``standardize`` centres and scales each feature with
    the training statistics first. Returns ``test_accuracy``, ``train_accuracy`` and, from the
    first :data:`STATS_IMAGES` training images, ``effective_rank`` and ``feature_rms``.
    """
    from dynsim.readouts import fit_linear_probe, readout_accuracy

    f_train, f_test = encoder.embed(x_train), encoder.embed(x_test)
    if not (torch.isfinite(f_train).all() and torch.isfinite(f_test).all()):
        return {"test_accuracy": None, "train_accuracy": None, "note": "non-finite features"}
    stats = embedding_stats(f_train[:STATS_IMAGES])
    if probe == "adam":
        fit = fit_linear_probe(f_train, y_train, f_test, y_test, epochs=epochs, batch_size=batch_size, seed=seed,
                               device=device, standardize=standardize)
    else:
        if standardize:
            mean, std = f_train.mean(0), f_train.std(0).clamp_min(1e-6)
            f_train, f_test = (f_train - mean) / std, (f_test - mean) / std
        r = readout_accuracy(probe, f_train, y_train, f_test, y_test, device=device)
        fit = {"test_accuracy": r["accuracy"], "train_accuracy": r["train_accuracy"]}
    return {**fit, **stats}
