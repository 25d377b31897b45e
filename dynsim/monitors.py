"""Monitors: callbacks that record what happened (iterations to settle, residuals, status)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dynsim.callbacks import Callback
from dynsim.stopping import Status


class SettlingMonitor(Callback):
    """Records, for every training input, the steps it took to settle and why it stopped.

    The numbers go into preallocated NumPy arrays (grown by doubling), written once per batch
    by :meth:`record`, which takes any number of inputs at once (a batch, or a chunk of
    inputs from a backend that runs many online steps per call).

    Attributes
    ----------
    iterations : (n,) int64 array, steps per training input, in presentation order.
    status : (n,) int8 array, :class:`~dynsim.stopping.Status` per input.
    Per epoch it logs ``mean_iterations``, ``max_iterations``, ``fraction_converged``,
    ``diverged`` and ``n_evals`` into ``engine.history``.
    """

    def __init__(self, postfix_every: int = 25, capacity: int = 1024):
        self._its = np.zeros(max(capacity, 1), dtype=np.int64)
        self._sts = np.zeros(max(capacity, 1), dtype=np.int8)
        self._n = 0
        self.postfix_every = postfix_every
        self._epoch_start = 0
        self._evals = 0

    @property
    def iterations(self) -> np.ndarray:
        return self._its[: self._n]

    @property
    def status(self) -> np.ndarray:
        return self._sts[: self._n]

    def record(self, steps, status, n_evals: int = 0) -> None:
        """Append inputs' steps and status codes ((k,) tensors, arrays or lists, in order)."""
        steps = steps.tolist() if isinstance(steps, torch.Tensor) else steps
        status = status.tolist() if isinstance(status, torch.Tensor) else status
        k = len(steps)
        n = self._n
        if n + k > self._its.size:
            size = max(2 * self._its.size, n + k)
            self._its = np.concatenate([self._its[:n], np.zeros(size - n, dtype=np.int64)])
            self._sts = np.concatenate([self._sts[:n], np.zeros(size - n, dtype=np.int8)])
        if k == 1:  # batch 1: two scalar stores
            self._its[n] = steps[0]
            self._sts[n] = status[0]
        else:
            self._its[n : n + k] = steps
            self._sts[n : n + k] = status
        self._n = n + k
        self._evals += n_evals

    def on_epoch_start(self, engine, epoch):
        self._epoch_start = self._n
        self._evals = 0

    def on_batch_end(self, engine, batch, result):
        self.record(result.steps, result.status, result.n_evals)
        if engine.batches_seen % self.postfix_every == 0 and getattr(engine, "progress", True):
            recent = self._its[max(self._n - 200, 0) : self._n]
            engine.set_postfix(iters=f"{recent.mean():.0f}")

    def on_inputs(self, engine, inputs):
        """The fused backend's chunk of inputs: the same :meth:`record` as per batch."""
        self.record(inputs.steps, inputs.status, int(inputs.n_evals.sum()))
        if getattr(engine, "progress", True):
            recent = self._its[max(self._n - 200, 0) : self._n]
            engine.set_postfix(iters=f"{recent.mean():.0f}")

    def on_epoch_end(self, engine, epoch):
        its = self._its[self._epoch_start : self._n]
        st = self._sts[self._epoch_start : self._n]
        if its.size == 0:
            return
        engine.log(
            mean_iterations=float(its.mean(dtype=np.float64)),
            max_iterations=int(its.max()),
            fraction_converged=float(np.mean(st == Status.SETTLED)),
            diverged=int(np.sum(st == Status.DIVERGED)),
            n_evals=self._evals,
        )

    def state_dict(self) -> dict[str, Any]:
        # Tensors, not lists: a checkpoint after every epoch then costs O(inputs) array copies
        # instead of building a Python list of every input seen so far.
        return {"iterations": torch.from_numpy(self.iterations.copy()),
                "status": torch.from_numpy(self.status.copy())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._n = 0  # checkpoints written before the tensors hold lists: both read here
        self.record(np.asarray(state["iterations"], dtype=np.int64), np.asarray(state["status"], dtype=np.int8))


class TrajectoryMonitor(Callback):
    """Records settling trajectories (selected units and the residual) within a memory budget.

    For every batch (``on_input`` starts a new trajectory) it records, after each solver
    step, ``u[:, units]`` and the residual ``‖du/ds‖/‖u‖`` of the batch's samples. Rows are
    only unambiguous while no sample has stopped (:func:`dynsim.settle` drops settled rows),
    so a trajectory ends when the number of running rows changes; use batch 1 (or a
    ``max_steps``-only stop rule) to follow each input to its end.

    Memory: at most ``max_values`` floats are kept over all trajectories. When the budget
    is reached, every second stored step is dropped and from then on only every
    ``stride``-th step is recorded (``stride`` doubles each time), so long runs keep an
    evenly thinned record rather than a truncated one.

    Parameters
    ----------
    units : indices of the state units to record (``None``: all).
    max_values : memory budget in stored floats.

    Attributes
    ----------
    trajectories : list of dicts ``{"steps": [n], "u": [(B, U) tensors], "residual": [(B,)]}``.
    stride : current recording stride (1 until the budget is first reached).
    """

    def __init__(self, units: list[int] | None = None, *, max_values: int = 1_000_000):
        if max_values < 1:
            raise ValueError(f"max_values must be >= 1, got {max_values}")
        self.units = None if units is None else list(units)
        self.max_values = max_values
        self.trajectories: list[dict[str, Any]] = []
        self.stride = 1
        self._rows: int | None = None
        self._stored = 0

    def start(self, batch_size: int) -> None:
        """Begin a new trajectory for a batch of ``batch_size`` samples (``on_input`` calls this)."""
        self.trajectories.append({"steps": [], "u": [], "residual": []})
        self._rows = batch_size

    def on_input(self, engine, batch):
        self.start(batch.size)

    def on_step(self, engine, step, u, residual):
        if self._rows is None or u.shape[0] != self._rows:
            self._rows = None  # a sample stopped: this trajectory is over
            return
        if step % self.stride:
            return
        cols = u if self.units is None else u[:, self.units]
        t = self.trajectories[-1]
        t["steps"].append(int(step))
        t["u"].append(cols.detach().to("cpu", copy=True))
        t["residual"].append(residual.detach().to("cpu", copy=True))
        self._stored += cols.numel() + residual.numel()
        while self._stored > self.max_values and self.stride < 2**40:
            self._thin()

    def _thin(self) -> None:
        self.stride *= 2
        self._stored = 0
        for t in self.trajectories:
            keep = [i for i, n in enumerate(t["steps"]) if n % self.stride == 0]
            for key in ("steps", "u", "residual"):
                t[key] = [t[key][i] for i in keep]
            self._stored += sum(v.numel() for v in t["u"]) + sum(v.numel() for v in t["residual"])

    def as_arrays(self, index: int = -1) -> dict[str, Any]:
        """Trajectory ``index`` as tensors: steps (T,), u (T, B, U), residual (T, B)."""
        t = self.trajectories[index]
        if not t["steps"]:
            return {"steps": torch.zeros(0, dtype=torch.long), "u": torch.zeros(0), "residual": torch.zeros(0)}
        return {"steps": torch.tensor(t["steps"]), "u": torch.stack(t["u"]), "residual": torch.stack(t["residual"])}
