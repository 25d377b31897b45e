"""Linear readouts of settled representations.

The papers' protocol: settle every train and test image (from rest, no plasticity), fit
``LinearSVC(C=1, class_weight='balanced')`` on the train representations, report test
accuracy. ``readout="probe"`` uses the faster torch linear probe of :mod:`dynsim.probe`
when it is available.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from dynsim.callbacks import Callback
from dynsim.errors import ConfigError
from dynsim.settle import settle
from dynsim.solvers.base import Solver
from dynsim.stopping import Status, StopRule
from dynsim.systems.base import System

READOUTS = ("svc", "probe")


@dataclass
class Representations:
    """Settled rates of a data set: ``r`` (n, N) float32, ``steps`` (n,), ``status`` (n,)."""

    r: np.ndarray
    steps: np.ndarray
    status: np.ndarray

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
) -> Representations:
    """Settle every row of ``x`` (n, D_in) from rest, in batches; return the rates."""
    n = x.shape[0]
    rs, steps, status = [], [], []
    with tqdm(total=n, unit="img", desc=desc, disable=not progress, leave=False) as bar:
        for start in range(0, n, batch_size):
            xb = torch.as_tensor(x[start : start + batch_size], dtype=torch.float32, device=device)
            res = settle(system, xb, solver=solver, stop=stop)
            rs.append(res.r.cpu().numpy())
            steps.append(res.steps.cpu().numpy())
            status.append(res.status.cpu().numpy())
            bar.update(xb.shape[0])
    return Representations(np.concatenate(rs), np.concatenate(steps), np.concatenate(status))


def linear_svc_accuracy(
    f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray, y_test: np.ndarray, *, C: float = 1.0
) -> dict:
    """Fit ``LinearSVC(C, class_weight='balanced')`` on train features; test accuracy and time."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model = LinearSVC(C=C, class_weight="balanced", dual="auto", max_iter=2000, random_state=0)
        model.fit(f_train, y_train)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return {
        "accuracy": float(model.score(f_test, y_test)),
        "train_accuracy": float(model.score(f_train, y_train)),
        "readout_seconds": time.perf_counter() - t0,
        "readout_converged": converged,
    }


def readout_accuracy(
    readout: str, f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray, y_test: np.ndarray, *, seed: int = 0
) -> dict:
    """Test accuracy of a linear readout by name (``svc`` or ``probe``)."""
    if readout == "svc":
        return linear_svc_accuracy(f_train, y_train, f_test, y_test)
    if readout == "probe":
        from dynsim.probe import fit_linear_probe

        t0 = time.perf_counter()
        out = fit_linear_probe(f_train, y_train, f_test, y_test, seed=seed)
        out.setdefault("readout_seconds", time.perf_counter() - t0)
        return out
    raise ConfigError(f"unknown readout {readout!r}; choose one of {', '.join(READOUTS)}")


class Evaluator(Callback):
    """Every ``every`` epochs (and after the last), settle train and test sets and fit a readout.

    Logs ``test_accuracy``, ``train_accuracy``, ``eval_seconds``, ``eval_mean_iterations``
    and ``eval_fraction_converged`` into ``engine.history``. With ``layer_slices`` (a deep
    network's :meth:`~dynsim.systems.deep.DeepHebbianNet.layer_slices`) the readout is fitted
    on each layer's rates separately: ``layer_test_accuracy`` lists them bottom first and
    ``test_accuracy`` is the top layer's.
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
        self.last: dict | None = None

    def due(self, epoch: int) -> bool:
        return (self.every > 0 and (epoch + 1) % self.every == 0) or epoch + 1 == self.epochs

    def evaluate(self) -> dict:
        """Settle both sets and fit the readout now."""
        x_train, y_train, x_test, y_test = self.data
        t0 = time.perf_counter()
        kw = dict(solver=self.solver, stop=self.stop, batch_size=self.batch_size, device=self.device)
        rep_train = settle_dataset(self.system, x_train, progress=self.progress, desc="eval train", **kw)
        rep_test = settle_dataset(self.system, x_test, progress=self.progress, desc="eval test", **kw)
        settle_seconds = time.perf_counter() - t0
        layer_acc = None
        if self.layer_slices:
            outs = [
                readout_accuracy(self.readout, rep_train.r[:, sl], y_train, rep_test.r[:, sl], y_test, seed=self.seed)
                for sl in self.layer_slices
            ]
            layer_acc, out = [o["accuracy"] for o in outs], outs[-1]
        else:
            out = readout_accuracy(self.readout, rep_train.r, y_train, rep_test.r, y_test, seed=self.seed)
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
            "readout_converged": out.get("readout_converged", True),
        }
        if layer_acc is not None:
            self.last["layer_test_accuracy"] = layer_acc
        return self.last

    def state_dict(self) -> dict:
        return {"last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.last = state["last"]

    def on_epoch_end(self, engine, epoch):
        if self.due(epoch):
            engine.log(**self.evaluate())
            engine.set_postfix(acc=f"{self.last['test_accuracy']:.4f}")
