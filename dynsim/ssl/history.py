"""Per-epoch record of SSL training, as a callback on the event loop."""

from __future__ import annotations

import math
import time
from typing import Any

from dynsim.callbacks import Callback
from dynsim.errors import DivergenceError


class LossHistory(Callback):
    """Per-epoch loss (per image), images seen and wall seconds.

    A non-finite hinge loss raises :class:`DivergenceError` naming the epoch and batch, so
    the run stops before the weights (now NaN) reach a checkpoint.
    """

    def __init__(self, lr: float, rule: str) -> None:
        self.lr, self.rule = lr, rule
        self.rows: list[dict[str, Any]] = []

    def on_epoch_start(self, engine, epoch):  # noqa: D102
        self._t0, self._losses = time.perf_counter(), []

    def on_batch_end(self, engine, batch, result):  # noqa: D102
        loss = float(result.loss)
        if not math.isfinite(loss):
            raise DivergenceError(
                f"the hinge loss became {loss} at epoch {batch.epoch}, batch {batch.number} "
                f"(rule {self.rule}, lr {self.lr}); lower --lr"
            )
        self._losses.append(loss / batch.x.shape[0])

    def on_epoch_end(self, engine, epoch):  # noqa: D102
        self.rows.append(
            {
                "epoch": epoch,
                "images_seen": engine.images_seen,
                "batches": len(self._losses),
                "loss": sum(self._losses) / max(len(self._losses), 1),
                "wall_seconds": time.perf_counter() - self._t0,
            }
        )

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"rows": [dict(r) for r in self.rows]}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        # in place: the probe monitor and the plateau rule hold this same list
        self.rows[:] = [dict(r) for r in state["rows"]]
