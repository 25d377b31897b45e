"""The callback contract of the dynsim event loop.

The :class:`~dynsim.engine.Engine` owns control flow; a :class:`Callback` adds behaviour
(plasticity, monitoring, evaluation, checkpoints) by overriding typed no-op hooks. The
order of events for one training run is::

    on_fit_start
    for each epoch:
        on_epoch_start
        for each batch:
            on_input          # the batch is known, before settling
            on_step           # after every solver step (only if some callback overrides it)
            on_settled        # the batch has settled: plasticity rules act here
            on_batch_end      # after every on_settled: monitors, progress
        on_epoch_end          # evaluators, learning-rate schedules, checkpoints
    on_fit_end

Where the engine's fused online backend runs an epoch (:mod:`dynsim.fused`: batch 1, compiled
kernels), the per-input hooks are replaced by one ``on_inputs(engine, inputs)`` per chunk of
inputs, with their per-input numbers as arrays; it runs only when every callback that
overrides a per-input hook also defines such a fused form (``on_inputs``, or
``fused_update`` for a plasticity rule), so no callback misses an input.

A callback that wants training to stop sets ``engine.should_stop = True``; the loop stops
after the current batch. ``state_dict``/``load_state_dict`` make a callback's state part of
a checkpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from dynsim.engine import Batch, Engine, SettleResult
    from dynsim.fused import SettledInputs


class Callback:
    """Base class with no-op hooks. Override the ones you need."""

    def on_fit_start(self, engine: Engine) -> None:
        """Called once before the first epoch."""

    def on_epoch_start(self, engine: Engine, epoch: int) -> None:
        """Called at the start of epoch ``epoch`` (0-based)."""

    def on_input(self, engine: Engine, batch: Batch) -> None:
        """Called when a batch is presented, before the dynamics run."""

    def on_step(self, engine: Engine, step: int, u: torch.Tensor, residual: torch.Tensor) -> None:
        """Called after solver step ``step`` with the state ``u`` (B, D) of the samples still
        running and their residual ``‖du/ds‖/‖u‖`` (B,). Costly: only overridden hooks run."""

    def on_settled(self, engine: Engine, batch: Batch, result: SettleResult) -> None:
        """Called when the batch has settled. Plasticity rules update weights here."""

    def on_batch_end(self, engine: Engine, batch: Batch, result: SettleResult) -> None:
        """Called after every callback's ``on_settled``: monitors and progress bars."""

    def on_inputs(self, engine: Engine, inputs: SettledInputs) -> None:
        """Fused backend only: a chunk of batch-1 inputs has settled and been learned from;
        ``inputs`` holds their indices, steps, statuses, residuals and evaluations as (k,) arrays.
        A monitor that defines it beside ``on_batch_end`` records the same numbers either way."""

    def on_epoch_end(self, engine: Engine, epoch: int) -> None:
        """Called at the end of epoch ``epoch`` (0-based)."""

    def on_fit_end(self, engine: Engine) -> None:
        """Called once after the last epoch (also after an early stop)."""

    def state_dict(self) -> dict[str, Any]:
        """State to store in a checkpoint (empty for stateless callbacks)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def overrides(callback: Callback, hook: str) -> bool:
    """True when ``callback`` overrides ``hook`` (so the engine can skip costly no-op hooks)."""
    return getattr(type(callback), hook) is not getattr(Callback, hook)
