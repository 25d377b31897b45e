"""Monitors: callbacks that record what happened (iterations to settle, residuals, status)."""

from __future__ import annotations

from typing import Any

import torch

from dynsim.callbacks import Callback
from dynsim.stopping import Status


class SettlingMonitor(Callback):
    """Records, for every training input, the steps it took to settle and why it stopped.

    Attributes
    ----------
    iterations : list[int], one entry per training input, in presentation order.
    status : list[int], :class:`~dynsim.stopping.Status` per input.
    Per epoch it logs ``mean_iterations``, ``max_iterations``, ``fraction_converged``,
    ``diverged`` and ``n_evals`` into ``engine.history``.
    """

    def __init__(self, postfix_every: int = 25):
        self.iterations: list[int] = []
        self.status: list[int] = []
        self.postfix_every = postfix_every
        self._epoch_start = 0
        self._evals = 0

    def on_epoch_start(self, engine, epoch):
        self._epoch_start = len(self.iterations)
        self._evals = 0

    def on_batch_end(self, engine, batch, result):
        self.iterations.extend(result.steps.tolist())
        self.status.extend(result.status.tolist())
        self._evals += result.n_evals
        if engine.batches_seen % self.postfix_every == 0:
            recent = self.iterations[-200:]
            engine.set_postfix(iters=f"{sum(recent) / len(recent):.0f}")

    def on_epoch_end(self, engine, epoch):
        its = torch.tensor(self.iterations[self._epoch_start :], dtype=torch.float64)
        st = torch.tensor(self.status[self._epoch_start :])
        if its.numel() == 0:
            return
        engine.log(
            mean_iterations=float(its.mean()),
            max_iterations=int(its.max()),
            fraction_converged=float((st == Status.SETTLED).double().mean()),
            diverged=int((st == Status.DIVERGED).sum()),
            n_evals=self._evals,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"iterations": list(self.iterations), "status": list(self.status)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iterations = list(state["iterations"])
        self.status = list(state["status"])


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
