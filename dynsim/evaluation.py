"""Linear readouts of settled representations.

The papers' protocol: settle every train and test image (from rest, no plasticity), fit
``LinearSVC(C=1, class_weight='balanced')`` on the train representations, report test
accuracy. ``readout="probe"`` uses :func:`linear_probe_accuracy`, the same squared-hinge objective
solved full-batch with L-BFGS in torch (≥ 10× faster on 60,000 × 784 features).
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
# L-BFGS iterations of a warm-started probe fit (a cold fit takes 150); chosen by
# benchmarks/probe_warm.py: same test accuracy to 0.1 pt as a cold 150-iteration fit
WARM_PROBE_ITER = 50


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
    rs, steps, status, us = [], [], [], []
    with tqdm(total=n, unit="img", desc=desc, disable=not progress, leave=False) as bar:
        for start in range(0, n, batch_size):
            xb = torch.as_tensor(x[start : start + batch_size], dtype=torch.float32, device=device)
            ub = None if u0 is None else u0[start : start + batch_size]
            res = settle(system, xb, solver=solver, stop=stop, u0=ub)
            rs.append(res.r.cpu().numpy())
            steps.append(res.steps.cpu().numpy())
            status.append(res.status.cpu().numpy())
            if keep_states:
                us.append(res.u)
            bar.update(xb.shape[0])
    u = torch.cat(us) if keep_states and us else None
    return Representations(np.concatenate(rs), np.concatenate(steps), np.concatenate(status), u)


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


@torch.no_grad()
def fit_squared_hinge(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    C: float = 1.0,
    max_iter: int = 300,
    tol: float = 1e-4,
    n_classes: int | None = None,
    w0: torch.Tensor | None = None,
    info: dict | None = None,
) -> torch.Tensor:
    """LinearSVC's primal problem, one-vs-rest, solved full-batch with L-BFGS in torch.

    For each class ``c`` it minimises ``½‖w_c‖² + C Σ_i q_i max(0, 1 − t_ic w_cᵀ[x_i, 1])²``
    with ``t_ic = ±1`` and balanced class weights ``q_i = n / (n_classes · n_{y_i})`` — the
    objective of ``LinearSVC(C, loss='squared_hinge', class_weight='balanced')``, whose
    liblinear solver also regularises the intercept. All classes are fitted together.

    Parameters
    ----------
    features : (n, d) float tensor; labels : (n,) long in ``0 .. n_classes-1``.
    w0 : (d + 1, n_classes) starting weights (a warm start, e.g. the previous evaluation's
        solution); zeros when ``None`` or of the wrong shape. Same objective, same stopping test.
    info : if given, ``info["iterations"]`` is set to the L-BFGS iterations taken.

    Returns
    -------
    (d + 1, n_classes) weights; the last row is the intercept.
    """
    n, d = features.shape
    k = int(labels.max()) + 1 if n_classes is None else n_classes
    xb = torch.cat([features, features.new_ones(n, 1)], dim=1)
    # Both layouts of X are kept, and the products are taken "wide": scores as (Wᵀ Xᵀ) (k, n)
    # and the gradient as (Gᵀ X) (k, d+1). At 60,000 × 785, k = 10, 1 thread that is 21 + 21 ms
    # per loss-and-gradient instead of 48 + 134 ms for X W and Xᵀ G through a transposed view
    # (benchmarks/compiled_kernels.py, row 6; 48 + 48 ms with a contiguous Xᵀ)
    xb_t = xb.T.contiguous()
    counts = torch.bincount(labels, minlength=k).to(features.dtype)
    q = (n / (k * counts.clamp_min(1)))[labels]  # balanced class weights per sample
    t = -torch.ones(k, n, dtype=features.dtype, device=features.device)  # targets ±1, class-major
    t[labels, torch.arange(n, device=features.device)] = 1.0
    w = torch.zeros(d + 1, k, dtype=features.dtype, device=features.device)
    if w0 is not None and tuple(w0.shape) == tuple(w.shape):
        w = w0.to(w)
    scale = 1.0 / (C * n)  # minimise the objective / (C n): same minimiser, O(1) gradients
    qn = (q / n)[None, :]

    def loss_and_grad(v: torch.Tensor) -> tuple[float, torch.Tensor]:
        margin = (1 - t * (v.T @ xb_t)).clamp_min_(0)  # (k, n)
        qm = qn * margin
        loss = scale * 0.5 * (v * v).sum() + (qm * margin).sum()
        return float(loss), scale * v - 2 * ((qm * t) @ xb).T

    w, iterations = _lbfgs(loss_and_grad, w, max_iter=max_iter, tol=tol)
    if info is not None:
        info["iterations"] = iterations
    return w


def _lbfgs(fg, w: torch.Tensor, *, max_iter: int, tol: float, history: int = 20):
    """Minimise a smooth function with L-BFGS and an Armijo backtracking line search.

    ``fg(w) -> (loss, grad)``. Stops when the largest gradient entry is below ``tol`` or
    the loss stops changing (relative 1e-9). Written out rather than ``torch.optim.LBFGS``,
    whose first construction costs seconds of imports. Returns ``(w, iterations)``.
    """
    loss, g = fg(w)
    pairs: list[tuple[torch.Tensor, torch.Tensor, float]] = []
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        if float(g.abs().max()) <= tol:
            break
        q = g.clone()
        alphas = []
        for s_, y_, rho in reversed(pairs):
            a = rho * float((s_ * q).sum())
            alphas.append(a)
            q.sub_(y_, alpha=a)
        if pairs:
            s_, y_, _ = pairs[-1]
            q.mul_(float((s_ * y_).sum() / (y_ * y_).sum()))
        else:
            q.mul_(min(1.0, 1.0 / float(g.abs().sum())))
        for (s_, y_, rho), a in zip(pairs, reversed(alphas), strict=True):
            q.add_(s_, alpha=a - rho * float((y_ * q).sum()))
        slope = -float((g * q).sum())
        if slope >= 0:  # not a descent direction: restart from the gradient
            pairs.clear()
            q, slope = g.clone(), -float((g * g).sum())
        step = 1.0
        while True:
            w_new = w - step * q
            loss_new, g_new = fg(w_new)
            if loss_new <= loss + 1e-4 * step * slope or step < 1e-10:
                break
            step *= 0.5
        s_, y_ = w_new - w, g_new - g
        sy = float((s_ * y_).sum())
        if sy > 1e-12:
            pairs.append((s_, y_, 1.0 / sy))
            if len(pairs) > history:
                pairs.pop(0)
        change = abs(loss - loss_new)
        w, loss, g = w_new, loss_new, g_new
        if change <= 1e-9 * max(1.0, abs(loss)):
            break
    return w, iterations


def linear_probe_accuracy(
    f_train: np.ndarray | torch.Tensor,
    y_train: np.ndarray,
    f_test: np.ndarray | torch.Tensor,
    y_test: np.ndarray,
    *,
    C: float = 1.0,
    max_iter: int = 150,
    device: str | torch.device = "cpu",
    w0: torch.Tensor | None = None,
) -> dict:
    """Fast linear readout: :func:`fit_squared_hinge` (LinearSVC's objective) in torch.

    Same keys as :func:`linear_svc_accuracy`, plus ``readout_iterations`` and ``weights``
    (the fitted (d + 1, k) tensor, to warm-start the next fit through ``w0``);
    ``readout_converged`` is False when L-BFGS stopped at ``max_iter``.
    """
    t0 = time.perf_counter()
    ftr = torch.as_tensor(np.asarray(f_train), dtype=torch.float32, device=device)
    fte = torch.as_tensor(np.asarray(f_test), dtype=torch.float32, device=device)
    ytr = torch.as_tensor(np.asarray(y_train), dtype=torch.long, device=device)
    yte = torch.as_tensor(np.asarray(y_test), dtype=torch.long, device=device)
    k = int(max(int(ytr.max()), int(yte.max()))) + 1
    info: dict = {}
    w = fit_squared_hinge(ftr, ytr, C=C, max_iter=max_iter, n_classes=k, w0=w0, info=info)

    def accuracy(f: torch.Tensor, y: torch.Tensor) -> float:
        scores = f @ w[:-1] + w[-1]
        return float((scores.argmax(dim=1) == y).to(torch.float64).mean())

    return {
        "accuracy": accuracy(fte, yte),
        "train_accuracy": accuracy(ftr, ytr),
        "readout_seconds": time.perf_counter() - t0,
        "readout_converged": info["iterations"] < max_iter,
        "readout_iterations": info["iterations"],
        "weights": w,
    }


def readout_accuracy(
    readout: str, f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray, y_test: np.ndarray, *, seed: int = 0,
    w0: torch.Tensor | None = None, max_iter: int = 150, device: str | torch.device = "cpu",
) -> dict:
    """Test accuracy of a linear readout by name (``svc`` or ``probe``; ``w0`` warm-starts the
    probe, ``max_iter`` caps its L-BFGS iterations, ``device`` is where the probe is fitted:
    the run's device; LinearSVC runs on the CPU)."""
    if readout == "svc":
        return linear_svc_accuracy(f_train, y_train, f_test, y_test)
    if readout == "probe":
        return linear_probe_accuracy(f_train, y_train, f_test, y_test, w0=w0, max_iter=max_iter, device=device)
    raise ConfigError(f"unknown readout {readout!r}; choose one of {', '.join(READOUTS)}")


class Evaluator(Callback):
    """Every ``every`` epochs (and after the last), settle train and test sets and fit a readout.

    Logs ``test_accuracy``, ``train_accuracy``, ``eval_seconds``, ``eval_mean_iterations``
    and ``eval_fraction_converged`` into ``engine.history``. With ``layer_slices`` (a deep
    network's :meth:`~dynsim.systems.deep.DeepHebbianNet.layer_slices`) the readout is fitted
    on each layer's rates separately: ``layer_test_accuracy`` lists them bottom first and
    ``test_accuracy`` is the top layer's.

    ``warm_start`` (default True): the probe readout of each evaluation after the first
    starts L-BFGS from the previous evaluation's weights (same objective, same stopping
    test; the representation drifts slowly), for at most ``warm_probe_iter`` iterations
    instead of 150. ``warm_settle`` (default False) also starts
    settling from the previous fixed points instead of rest (a sample still stops only
    when its own residual test passes, so "settled" means the same). On the torch path it
    was *slower* (3.0 vs 3.3 Newton steps, but 1.3× the time: the batch shrinks step by
    step); with the compiled kernels (one sample at a time) it is 1.5× faster: 55 → 36 µs per
    image, 5.61 → 2.95 steps (Fashion-MNIST, weights 15 epochs apart;
    benchmarks/compiled_kernels.py row 10).
    It stays off because warm-start state is not checkpointed: a resumed run would then
    settle its next evaluation from rest and differ (within the tolerance) from an
    uninterrupted one; storing the states would add 4 bytes × N per image to every checkpoint.
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
        warm_probe_iter: int = WARM_PROBE_ITER,
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
        self.warm_probe_iter = warm_probe_iter
        self.last: dict | None = None
        self._u: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)  # previous fixed points
        self._w: dict[int, torch.Tensor] = {}  # previous probe weights per readout slice

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
            o = readout_accuracy(self.readout, rep_train.r[:, sl], y_train, rep_test.r[:, sl], y_test,
                                 seed=self.seed, w0=w0, max_iter=150 if w0 is None else self.warm_probe_iter,
                                 device=self.device)
            if self.warm_start and "weights" in o:
                self._w[i] = o["weights"]
            outs.append(o)
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
            "readout_converged": out.get("readout_converged", True),
            "readout_seconds": time.perf_counter() - t1,
        }
        if "readout_iterations" in out:
            self.last["readout_iterations"] = sum(o["readout_iterations"] for o in outs)
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
