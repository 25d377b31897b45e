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
