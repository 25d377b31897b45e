"""Evaluation of a network during training: settle data sets, read them out linearly.

The papers' protocol: settle every train and test image (from rest, no plasticity), fit
``LinearSVC(C=1, class_weight='balanced')`` on the train representations, report test
accuracy. The readouts themselves live in :mod:`dynsim.readouts`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from dynsim.callbacks import Callback
from dynsim.errors import ConfigError
from dynsim.readouts import READOUTS, readout_accuracy
from dynsim.settle import settle
from dynsim.solvers.base import Solver
from dynsim.stopping import Status, StopRule
from dynsim.systems.base import System

__all__ = ["READOUTS", "Evaluator", "Representations", "readout_accuracy", "settle_dataset"]


@dataclass
class Representations:
    """Settled rates of a data set: ``r`` (n, N) float32, ``steps`` (n,), ``status`` (n,)."""

    r: np.ndarray
    steps: np.ndarray
    status: np.ndarray
    u: torch.Tensor | None = None  # settled states, kept when ``keep_states`` (warm starts)

    @property
    def fraction_converged(self) -> float:
        return float(np.mean(self.status == Status.SETTLED)) if self.status.size else 1.0


@torch.no_grad()
def settle_dataset(
    system: System,
    x: np.ndarray | torch.Tensor,
    *,
    solver: Solver,
    stop: StopRule,
    batch_size: int = 1000,
    device: str | torch.device = "cpu",
    progress: bool = False,
    desc: str = "settle",
    u0: torch.Tensor | None = None,
    keep_states: bool = False,
) -> Representations:
    """Settle every row of ``x`` (n, D_in) in batches; return the rates.

    From rest, or from ``u0`` (n, N) (a warm start, e.g. the previous evaluation's fixed
    points: each sample still stops only when *its* residual test passes, checked at its
    start state too, so the result is settled in exactly the same sense). ``keep_states``
    keeps the settled states in ``.u`` (on ``device``) for the next warm start.
    """
    n = x.shape[0]
    rs = None  # (n, N) rates, filled batch by batch (no concatenation of a copy of them at the end)
    steps, status, us = [], [], []
    with tqdm(total=n, unit="img", desc=desc, disable=not progress, leave=False) as bar:
        for start in range(0, n, batch_size):
            xb = torch.as_tensor(x[start : start + batch_size], dtype=torch.float32, device=device)
            ub = None if u0 is None else u0[start : start + batch_size]
            res = settle(system, xb, solver=solver, stop=stop, u0=ub)
            r = res.r.cpu().numpy()
            if rs is None:
                rs = np.empty((n, r.shape[1]), dtype=r.dtype)
            rs[start : start + r.shape[0]] = r
            steps.append(res.steps.cpu().numpy())
            status.append(res.status.cpu().numpy())
            if keep_states:
                us.append(res.u)
            bar.update(xb.shape[0])
    u = torch.cat(us) if keep_states and us else None
    return Representations(rs, np.concatenate(steps), np.concatenate(status), u)


class Evaluator(Callback):
    """Every ``every`` epochs (and after the last), settle train and test sets and fit a readout.

    Logs ``test_accuracy``, ``train_accuracy``, ``eval_seconds``, ``eval_mean_iterations``
    and ``eval_fraction_converged`` into ``engine.history``. With ``layer_slices`` (a deep
    network's :meth:`~dynsim.systems.deep.DeepHebbianNet.layer_slices`) the readout is fitted
    on each layer's rates separately: ``layer_test_accuracy`` lists them bottom first and
    ``test_accuracy`` is the top layer's.

    ``warm_start`` (default True): the ``svc`` readout of each evaluation after the first
    starts Newton's method from the previous evaluation's weights. Its stopping test is
    relative to the gradient at zero, not at the start, so the fit is as accurate as a cold
    one; the weights are part of :meth:`state_dict`, so a resumed run reads out exactly as an
    uninterrupted one. ``warm_settle`` (default False) also starts settling from the previous
    fixed points instead of rest (a sample still stops only when its own residual test
    passes); it stays off because the fixed points (4 bytes × N per image) are not
    checkpointed, so a resumed run would differ within the tolerance.
    ``test_predictions`` of the last evaluation are kept (not logged) for paired comparisons.
    ``readout_blocks`` (one per readout slice; None: the diagonal) is the ``svc`` readout's CG
    preconditioner block (:func:`~dynsim.readouts.fit_svc`): the neurons per site of site-major
    rates, whose within-site correlations the diagonal misses — the same minimum, fewer CG
    iterations. ``readout_tol``: liblinear's stopping tolerance of the ``svc``/``liblinear`` fit.
    """

    def __init__(
        self,
        system: System,
        *,
        x_train: np.ndarray,
        y_train: np.ndarray,
        x_test: np.ndarray,
        y_test: np.ndarray,
        solver: Solver,
        stop: StopRule,
        every: int,
        epochs: int,
        readout: str = "svc",
        batch_size: int = 1000,
        device: str = "cpu",
        seed: int = 0,
        progress: bool = True,
        layer_slices: list[slice] | None = None,
        warm_start: bool = True,
        warm_settle: bool = False,
        readout_blocks: list[int | None] | None = None,
        readout_tol: float = 1e-4,
    ):
        if readout not in READOUTS:
            raise ConfigError(f"unknown readout {readout!r}; choose one of {', '.join(READOUTS)}")
        self.system = system
        self.data = (x_train, y_train, x_test, y_test)
        self.solver, self.stop = solver, stop
        self.every, self.epochs = every, epochs
        self.readout, self.batch_size, self.device = readout, batch_size, device
        self.seed, self.progress = seed, progress
        self.layer_slices = layer_slices
        self.warm_start, self.warm_settle = warm_start, warm_settle
        self.readout_blocks = readout_blocks
        self.readout_tol = readout_tol
        self.last: dict | None = None
        self.test_predictions: list[np.ndarray] | None = None  # per readout slice, last evaluation
        self._u: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)  # previous fixed points
        self._w: dict[int, torch.Tensor] = {}  # previous readout weights per readout slice

    def due(self, epoch: int) -> bool:
        return (self.every > 0 and (epoch + 1) % self.every == 0) or epoch + 1 == self.epochs

    def evaluate(self) -> dict:
        """Settle both sets and fit the readout now."""
        x_train, y_train, x_test, y_test = self.data
        t0 = time.perf_counter()
        kw = dict(solver=self.solver, stop=self.stop, batch_size=self.batch_size, device=self.device,
                  keep_states=self.warm_settle)
        u_tr, u_te = self._u if self.warm_settle else (None, None)
        rep_train = settle_dataset(self.system, x_train, progress=self.progress, desc="eval train", u0=u_tr, **kw)
        rep_test = settle_dataset(self.system, x_test, progress=self.progress, desc="eval test", u0=u_te, **kw)
        self._u = (rep_train.u, rep_test.u)
        settle_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        layer_acc = None
        slices = self.layer_slices or [slice(None)]
        outs = []
        for i, sl in enumerate(slices):
            w0 = self._w.get(i) if self.warm_start else None
            block = self.readout_blocks[i] if self.readout_blocks else None
            o = readout_accuracy(self.readout, rep_train.r[:, sl], y_train, rep_test.r[:, sl], y_test,
                                 w0=w0 if self.readout == "svc" else None, device=self.device, block=block,
                                 tol=self.readout_tol)
            if self.warm_start and self.readout == "svc":
                self._w[i] = o["weights"].cpu()
            outs.append(o)
        self.test_predictions = [o["test_predictions"] for o in outs]
        out = outs[-1]
        if self.layer_slices:
            layer_acc = [o["accuracy"] for o in outs]
        steps = np.concatenate([rep_train.steps, rep_test.steps])
        self.last = {
            "test_accuracy": out["accuracy"],
            "train_accuracy": out["train_accuracy"],
            "eval_settle_seconds": settle_seconds,
            "eval_seconds": time.perf_counter() - t0,
            "eval_mean_iterations": float(steps.mean()),
            "eval_fraction_converged": float(
                np.mean(np.concatenate([rep_train.status, rep_test.status]) == Status.SETTLED)
            ),
            "readout_converged": all(o["readout_converged"] for o in outs),
            "readout_seconds": time.perf_counter() - t1,
            "readout_iterations": sum(o["readout_iterations"] for o in outs),
        }
        if layer_acc is not None:
            self.last["layer_test_accuracy"] = layer_acc
        return self.last

    def state_dict(self) -> dict:
        return {"last": self.last, "readout_weights": dict(self._w),
                "test_predictions": self.test_predictions}

    def load_state_dict(self, state: dict) -> None:
        self.last = state["last"]
        self._w = dict(state.get("readout_weights", {}))
        preds = state.get("test_predictions")
        self.test_predictions = None if preds is None else [np.asarray(p) for p in preds]

    def on_epoch_end(self, engine, epoch):
        if self.due(epoch):
            engine.log(**self.evaluate())
            engine.set_postfix(acc=f"{self.last['test_accuracy']:.4f}")
