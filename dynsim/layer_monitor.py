"""Per-layer monitor of a :class:`~dynsim.systems.deep.DeepHebbianNet` while it settles."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dynsim.callbacks import Callback
from dynsim.systems.deep import DeepHebbianNet


class LayerMonitor(Callback):
    """Iterations and residual per layer, for every training batch.

    The coupled layers settle as one state; this monitor looks inside. After each step it
    evaluates every layer's residual ``‖du_p/ds‖/‖u_p‖`` and records, per layer, the first
    step after which it stayed below ``tol`` for all samples of the batch (exact for
    batch 1; with larger batches it is tracked while no sample has finished yet and falls
    back to the batch's last step count after that). At the settled state it records each
    layer's residual (in ``on_settled``: list the monitor *before* the plasticity callback,
    so it sees the weights the state settled with). Costs one extra field evaluation per step.

    Attributes
    ----------
    layer_steps : list of (P,) lists, one per batch.
    layer_residual : list of (P,) lists (batch mean of the final per-layer residual).
    layer_abs_rate : list of (P,) lists (batch mean of ``mean_i |r_{p,i}|`` at the settled
        state: 1 means saturated).

    Per epoch it logs ``layer_mean_iterations``, ``layer_mean_residual``, ``layer_mean_abs_rate``
    (lists, bottom first) and, at the epoch's end, the weight norms ``layer_w_norm``
    (``‖W_p‖_F``) and ``layer_l_norm`` (``‖L_p − I‖_F``), the measurements behind docs/deep.md.
    """

    def __init__(self, net: DeepHebbianNet, *, tol: float = 1e-4):
        self.net, self.tol = net, tol
        self.layer_steps: list[list[int]] = []
        self.layer_residual: list[list[float]] = []
        self.layer_abs_rate: list[list[float]] = []
        self._epoch_start = 0
        self._drive: torch.Tensor | None = None
        self._first: list[int | None] = []

    def on_epoch_start(self, engine, epoch):
        self._epoch_start = len(self.layer_steps)

    def on_input(self, engine, batch):
        with torch.no_grad():
            self._drive = self.net.drive(batch.x)
        self._first = [None] * self.net.n_layers

    def on_step(self, engine, step, u, residual):
        if self._drive is None or u.shape[0] != self._drive.shape[0]:
            return
        with torch.no_grad():
            res = self.net.layer_residuals(u, self._drive).amax(dim=0)
        for p, below in enumerate((res < self.tol).tolist()):
            if not below:
                self._first[p] = None
            elif self._first[p] is None:
                self._first[p] = step

    def on_settled(self, engine, batch, result):
        last = int(result.steps.max())
        self.layer_steps.append([last if s is None else min(s, last) for s in self._first])
        with torch.no_grad():
            res = self.net.layer_residuals(result.u, self._drive).mean(dim=0)
            act = [float(r.abs().mean()) for r in self.net.split(result.r)]
        self.layer_residual.append(res.tolist())
        self.layer_abs_rate.append(act)

    def on_epoch_end(self, engine, epoch):
        steps = np.asarray(self.layer_steps[self._epoch_start :], dtype=float)
        res = np.asarray(self.layer_residual[self._epoch_start :], dtype=float)
        act = np.asarray(self.layer_abs_rate[self._epoch_start :], dtype=float)
        if steps.size:
            engine.log(
                layer_mean_iterations=steps.mean(axis=0).tolist(),
                layer_mean_residual=res.mean(axis=0).tolist(),
                **({"layer_mean_abs_rate": act.mean(axis=0).tolist()} if act.size else {}),
            )
        with torch.no_grad():
            engine.log(
                layer_w_norm=[float(torch.linalg.vector_norm(layer.ff.weight * layer.ff.mask))
                              for layer in self.net.layers],
                layer_l_norm=[_lateral_offset_norm(layer) for layer in self.net.layers],
            )

    def state_dict(self) -> dict[str, Any]:
        return {"layer_steps": self.layer_steps, "layer_residual": self.layer_residual,
                "layer_abs_rate": self.layer_abs_rate}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.layer_steps = [list(v) for v in state["layer_steps"]]
        self.layer_residual = [list(v) for v in state["layer_residual"]]
        self.layer_abs_rate = [list(v) for v in state.get("layer_abs_rate", [])]


def _lateral_offset_norm(layer) -> float:
    """``‖L − I‖_F`` from the stored lateral weights (S, M, K·M); each site's own M×M block comes first."""
    w = layer.lateral.weight * layer.lateral.mask
    d = w.clone()
    d[:, :, : layer.nps] -= torch.eye(layer.nps, dtype=w.dtype, device=w.device)
    return float(torch.linalg.vector_norm(d))
