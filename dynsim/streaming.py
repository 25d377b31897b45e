"""Streaming ("continuous") input as a data source, and a monitor of the response to switches.

An :class:`InputStream` presents inputs one after another with a dwell time of at most
``dwell`` solver steps each; the network state is *never* reset between inputs (the
"continuous input" variant of the reproduction of Obeid et al. 2019). It builds on
:class:`~dynsim.engine.DynamicsSettler`, which carries the state across batches:
:meth:`InputStream.settler` returns one with ``stream_every=dwell``, so an input is switched
when it settles (the stop rule) or after ``dwell`` steps, whichever comes first. To hold
every input for exactly ``dwell`` steps, use a stop rule without a threshold
(``MaxSteps(dwell)``). Any :class:`~dynsim.systems.base.System` (single layer, deep net) and
any registered solver work, since only ``settle`` touches the dynamics.

:class:`SwitchMonitor` records for every switch the residual jump the new input causes
(``‖du/ds‖/‖u‖`` of the carried state under the new input), the steps until the state
settled again (censored at the dwell), whether it did, and the residual when the input
was switched; :class:`SwitchTraceMonitor` adds the residual after every step (a trace).

Example
-------
>>> import torch
>>> from dynsim import Engine, Euler, HebbianLayer, stop_rule
>>> layer = HebbianLayer((1, 8, 8), nps=2, stride=2, radius=3.0)
>>> stream = InputStream(torch.randn(50, 64), dwell=10, inputs_per_epoch=20)
>>> monitor = SwitchMonitor(stream.settler(layer, Euler(), stop_rule(1e-4, None)))
>>> engine = Engine(monitor.settler, [monitor], progress=False).fit(stream, epochs=1)
>>> len(monitor.switch_residual), engine.history[0]["stream_dwell"]
(20, 10)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dynsim.callbacks import Callback
from dynsim.engine import Batch, DynamicsSettler
from dynsim.errors import ConfigError
from dynsim.settle import relative_norm
from dynsim.solvers.base import Solver
from dynsim.stopping import Status, StopRule
from dynsim.systems.base import System


@dataclass
class InputStream:
    """A stream of inputs, each presented for at most ``dwell`` steps, state carried over.

    Parameters
    ----------
    x : (n, D_in) pool of inputs.
    dwell : steps per input (the cap; the stop rule may switch earlier).
    inputs_per_epoch : inputs presented per epoch.
    n_streams : independent streams run side by side (the batch size).
    order : ``"random"`` (with replacement, seeded by (seed, epoch)) or ``"sequential"``.
    y : (n,) optional labels, passed along in each :class:`~dynsim.engine.Batch`.
    seed : int.

    Calling the stream with an epoch number yields that epoch's batches, so it plugs into
    :meth:`Engine.fit <dynsim.engine.Engine.fit>` as ``batches``.
    """

    x: torch.Tensor
    dwell: int
    inputs_per_epoch: int
    n_streams: int = 1
    order: str = "random"
    y: torch.Tensor | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("dwell", "inputs_per_epoch", "n_streams"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"stream {name} must be an integer >= 1, got {v!r}")
        if self.order not in ("random", "sequential"):
            raise ConfigError(f"stream order must be 'random' or 'sequential', got {self.order!r}")
        if self.x.ndim != 2 or self.x.shape[0] < 1:
            raise ConfigError(
                f"stream inputs must be a non-empty (n, features) tensor, got {tuple(self.x.shape)}"
            )

    def __call__(self, epoch: int) -> Iterator[Batch]:
        n = self.x.shape[0]
        if self.order == "random":
            rng = np.random.default_rng([self.seed, epoch])
            order = torch.from_numpy(rng.integers(0, n, size=self.inputs_per_epoch))
        else:
            order = (torch.arange(self.inputs_per_epoch) + epoch * self.inputs_per_epoch) % n
        for number, start in enumerate(range(0, self.inputs_per_epoch, self.n_streams)):
            idx = order[start : start + self.n_streams]
            dev = idx.to(self.x.device)
            y = None if self.y is None else self.y[dev]
            yield Batch(x=self.x[dev], y=y, index=idx, epoch=epoch, number=number)

    def settler(
        self, system: System, solver: Solver, stop: StopRule, *, on_divergence: str = "raise"
    ) -> DynamicsSettler:
        """A :class:`DynamicsSettler` carrying the state, each input capped at ``dwell`` steps."""
        return DynamicsSettler(
            system, solver, stop, stream_every=self.dwell, on_divergence=on_divergence
        )


class SwitchMonitor(Callback):
    """Records the response of a streaming settler to every input switch.

    Parameters
    ----------
    settler : the streaming :class:`DynamicsSettler` (``stream_every`` set) the engine runs.

    Attributes (one entry per input and stream, in presentation order)
    ----------
    switch_residual : ``‖du/ds‖/‖u‖`` of the carried state under the new input, at the
        switch (NaN for the very first input, which starts at rest).
    steps : steps the input was presented.
    settled : whether the state met the stop rule's tolerance before the dwell ran out
        (then ``steps`` is the settling time after the switch; otherwise it is censored).
    final_residual : residual when the input was switched away.

    Per epoch it logs ``stream_dwell``, ``switch_residual_mean``, ``steps_after_switch_mean``,
    ``fraction_settled_in_dwell`` and ``final_residual_mean``.
    """

    def __init__(self, settler: DynamicsSettler):
        if settler.stream_every is None:
            raise ConfigError("SwitchMonitor needs a streaming settler (stream_every set)")
        self.settler = settler
        self.switch_residual: list[float] = []
        self.steps: list[int] = []
        self.settled: list[bool] = []
        self.final_residual: list[float] = []
        self._epoch_start = 0

    def on_epoch_start(self, engine, epoch):
        self._epoch_start = len(self.steps)

    def on_input(self, engine, batch):
        state, system = self.settler.state, self.settler.system
        if state is None:
            self.switch_residual.extend([float("nan")] * batch.size)
            return
        u = state[: batch.size]
        if u.shape[0] < batch.size:
            u = torch.cat([u, u.new_zeros(batch.size - u.shape[0], u.shape[1])])
        with torch.no_grad():
            res = relative_norm(system.field(u, system.drive(batch.x)), u)
        self.switch_residual.extend(res.tolist())

    def on_batch_end(self, engine, batch, result):
        self.steps.extend(result.steps.tolist())
        self.settled.extend((result.status == Status.SETTLED).tolist())
        self.final_residual.extend(result.residual.tolist())

    def on_epoch_end(self, engine, epoch):
        sl = slice(self._epoch_start, None)
        if not self.steps[sl]:
            return
        jump = np.asarray(self.switch_residual[sl], dtype=float)
        engine.log(
            stream_dwell=self.settler.stream_every,
            switch_residual_mean=float(np.nanmean(jump)) if np.isfinite(jump).any() else None,
            steps_after_switch_mean=float(np.mean(self.steps[sl])),
            fraction_settled_in_dwell=float(np.mean(self.settled[sl])),
            final_residual_mean=float(np.mean(self.final_residual[sl])),
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            k: list(getattr(self, k))
            for k in ("switch_residual", "steps", "settled", "final_residual")
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, list(v))


class SwitchTraceMonitor(SwitchMonitor):
    """:class:`SwitchMonitor` plus the residual after every step of the first ``keep`` inputs.

    ``traces[i]`` lists the largest running residual over the batch after each step of input
    ``i``. Costs one extra field evaluation per step (the engine's ``on_step`` hook).
    """

    def __init__(self, settler: DynamicsSettler, *, keep: int = 100):
        super().__init__(settler)
        self.keep = keep
        self.traces: list[list[float]] = []

    def on_input(self, engine, batch):
        super().on_input(engine, batch)
        if len(self.traces) < self.keep:
            self.traces.append([])
            self._recording = True
        else:
            self._recording = False

    def on_step(self, engine, step, u, residual):
        if self._recording:
            self.traces[-1].append(float(residual.max()))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "traces": [list(t) for t in self.traces]}
