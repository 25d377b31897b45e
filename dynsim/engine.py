"""The event loop: feed batches, let the settler run, call the callbacks.

The :class:`Engine` owns control flow and nothing else. What "settling" means is the
``settler``: :class:`DynamicsSettler` integrates an ODE system (with optional streaming
input, the state carried from one input to the next); a feed-forward pipeline passes
its own callable. Plasticity, monitors and evaluators are callbacks (see
:mod:`dynsim.callbacks`). Per-epoch metrics that callbacks report with
:meth:`Engine.log` end up in ``engine.history``, one dict per epoch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dynsim.callbacks import Callback, overrides
from dynsim.errors import ConfigError, DivergenceError
from dynsim.settle import SettleResult, StepHook, relative_norm, settle
from dynsim.solvers.base import Solver
from dynsim.stopping import MaxSteps, Status, StopRule
from dynsim.systems.base import System


@dataclass
class Batch:
    """One presentation of inputs.

    Attributes
    ----------
    x : (B, D_in) inputs on the engine's device.
    y : (B,) labels, or ``None``.
    index : (B,) long, positions of the samples in their data set.
    epoch : int, 0-based.
    number : int, batch number within the epoch (0-based).
    """

    x: torch.Tensor
    y: torch.Tensor | None
    index: torch.Tensor
    epoch: int
    number: int

    @property
    def size(self) -> int:
        return int(self.x.shape[0])


Settler = Callable[[Batch, StepHook | None], Any]


class EpochDraws:
    """``batches(epoch)`` for :meth:`Engine.fit`: ``images`` rows of ``x`` drawn with replacement
    per epoch, seeded by ``(seed, epoch)`` (an epoch of the DSSM papers is 1000 images drawn at
    random; Obeid, Ramambason & Pehlevan 2019), in batches of ``batch_size``.

    :meth:`order` gives an epoch's draws as indices, so that the engine's fused online backend
    (:mod:`dynsim.fused`) can run them without building a :class:`Batch` per image.
    """

    def __init__(self, x: torch.Tensor, *, images: int, batch_size: int, seed: int):
        self.x, self.images, self.batch_size, self.seed = x, images, batch_size, seed

    def order(self, epoch: int) -> torch.Tensor:
        """(images,) long: the rows of ``x`` drawn in ``epoch``, in presentation order."""
        rng = np.random.default_rng([self.seed, epoch])
        return torch.from_numpy(rng.integers(0, self.x.shape[0], size=self.images))

    def __call__(self, epoch: int) -> Iterator[Batch]:
        order = self.order(epoch)
        for number, start in enumerate(range(0, self.images, self.batch_size)):
            idx = order[start : start + self.batch_size]
            yield Batch(x=self.x[idx.to(self.x.device)], y=None, index=idx, epoch=epoch, number=number)


STREAM_CARRIES = ("u", "r")


class DynamicsSettler:
    """Settles an ODE :class:`System` on each batch with a solver and a stop rule.

    Parameters
    ----------
    system, solver, stop : see :func:`dynsim.settle`.
    stream_every : int or None
        Streaming ("continuous") input: the state is *not* reset between inputs; each
        input is presented for at most ``stream_every`` steps (or until it settles) and
        the next one starts from where the last left off. ``None``: reset to ``u = 0``.
    on_divergence : {"raise", "skip"}
        What to do when a sample diverges: raise :class:`DivergenceError` naming the
        sample, step and solver, or keep going (the result marks it; plasticity skips it).
    carry : {"u", "r"}
        What streaming carries to the next input. ``"u"`` (default): the state; the next input
        starts from it. ``"r"`` (the reproduction report's code): the state restarts at
        ``u = 0`` but the first step's lateral input uses the carried rates
        ``r′ = f(u_prev)``; that first step is the forward Euler step
        ``u₁ = dt₀ (W x ± (L − I) r′)/τ = dt₀ (F(u_prev) + u_prev/τ)`` (the field at ``u_prev``
        plus ``u_prev/τ`` is the field at 0 with rates ``r′``), and settling continues from
        ``u₁`` for at most ``stream_every − 1`` more steps. Needs a fixed-step solver (Euler).
    """

    def __init__(
        self,
        system: System,
        solver: Solver,
        stop: StopRule,
        *,
        stream_every: int | None = None,
        on_divergence: str = "raise",
        carry: str = "u",
    ):
        if carry not in STREAM_CARRIES:
            raise ConfigError(f"stream carry must be one of {', '.join(STREAM_CARRIES)}, got {carry!r}")
        if carry == "r" and not hasattr(solver, "schedule"):
            raise ConfigError(f"stream carry 'r' restarts u at 0 with one Euler step, so it needs a fixed-step "
                              f"solver such as euler, not {solver!r}")
        self.system, self.solver = system, solver
        self.stream_every = stream_every
        self.stop = stop if stream_every is None else stop | MaxSteps(stream_every)
        self.carry = carry
        if carry == "r" and stream_every is not None and stream_every > 1:
            self._stop_after_first = stop | MaxSteps(stream_every - 1)
        self.on_divergence = on_divergence
        self.state: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget the carried state (streaming)."""
        self.state = None

    def state_dict(self) -> dict[str, Any]:
        """The carried streaming state (``None`` when inputs start from rest)."""
        return {"state": self.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state["state"]

    def __call__(self, batch: Batch, on_step: StepHook | None = None) -> SettleResult:
        u0 = None
        if self.stream_every is not None and self.state is not None:
            u0 = self.state[: batch.size]
            if u0.shape[0] < batch.size:  # a larger batch: new rows start at rest
                pad = u0.new_zeros(batch.size - u0.shape[0], u0.shape[1])
                u0 = torch.cat([u0, pad])
        if self.carry == "r" and u0 is not None:
            result = self._settle_carrying_rates(batch.x, u0, on_step)
        else:
            result = settle(self.system, batch.x, solver=self.solver, stop=self.stop, u0=u0, on_step=on_step)
        return self._checked(batch, result)

    def _checked(self, batch: Batch, result: SettleResult) -> SettleResult:
        """Raise on divergence (``on_divergence="raise"``); carry the state when streaming."""
        if self.on_divergence == "raise" and _any_diverged(result.status):
            i = int(torch.nonzero(result.diverged)[0])
            raise DivergenceError(
                f"dynamics diverged for sample {int(batch.index[i])} (epoch {batch.epoch}, batch "
                f"{batch.number}) at step {int(result.steps[i])} with solver {self.solver!r}; "
                "lower the step size, check the weights/learning rate, or pass on_divergence='skip'"
            )
        if self.stream_every is not None:
            self.state = result.u.detach()
        return result

    def _settle_carrying_rates(self, x: torch.Tensor, u_prev: torch.Tensor, on_step) -> SettleResult:
        """``carry="r"``: one Euler step from u = 0 with the carried rates, then settle on."""
        system = self.system
        tau = float(getattr(system, "tau", 1.0))
        u1 = self.solver.schedule(0) * (system.field(u_prev, system.drive(x)) + u_prev / tau)
        if self.stream_every == 1:
            f1 = system.field(u1, system.drive(x))
            n = x.shape[0]
            return SettleResult(u=u1, r=system.rates(u1), steps=torch.ones(n, dtype=torch.long, device=x.device),
                                status=torch.full((n,), int(Status.MAX_STEPS), dtype=torch.int8, device=x.device),
                                residual=relative_norm(f1, u1), n_evals=n)
        rest = settle(system, x, solver=self.solver, stop=self._stop_after_first, u0=u1, on_step=on_step)
        rest.steps += 1
        rest.n_evals += x.shape[0]
        return rest


def _any_diverged(status: torch.Tensor) -> bool:
    """``(status == DIVERGED).any()``; small batches through a Python list, which is cheaper than
    a tensor comparison with the ``Status`` enum at batch 1 (timings: benchmarks/online_profile.py)."""
    if status.numel() <= _LIST_TEST_MAX:
        return int(Status.DIVERGED) in status.tolist()
    return bool((status == int(Status.DIVERGED)).any())


_LIST_TEST_MAX = 64
_BATCH_HOOKS = ("on_input", "on_settled", "on_batch_end")


class Engine:
    """Runs epochs of batches through a settler and dispatches callback hooks.

    Parameters
    ----------
    settler : callable ``(batch, on_step) -> result``
    callbacks : sequence of :class:`~dynsim.callbacks.Callback`, called in order.
    progress : show a tqdm bar (images/s; callbacks add fields with :meth:`set_postfix`).
    desc : label of the progress bar.
    fused : let the fused online backend (:mod:`dynsim.fused`) run epochs where it applies
        (batch-1 :class:`EpochDraws`, compiled kernels, every per-input callback with a fused
        form); same inputs, numbers and weights as the per-input loop. ``False``: always the
        per-input loop. Each epoch's record says which ran (``online_backend``).

    Attributes
    ----------
    epoch, batches_seen, images_seen : counters.
    should_stop : set by a callback to end training after the current batch.

    The per-batch hooks (``on_input``, ``on_settled``, ``on_batch_end``) are looked up at the
    start of every epoch and called only on the callbacks that override them (on the class or
    the instance); a callback added to :attr:`callbacks` mid-epoch joins at the next epoch.
    history : list of per-epoch dicts (epoch, images_seen, train_seconds, + logged metrics).
    """

    def __init__(
        self,
        settler: Settler,
        callbacks: Sequence[Callback] = (),
        *,
        progress: bool = True,
        desc: str = "train",
        fused: bool = True,
    ):
        self.settler = settler
        self.callbacks = list(callbacks)
        self.progress = progress
        self.desc = desc
        self.fused = fused
        self.epoch = 0
        self.batches_seen = 0
        self.images_seen = 0
        self.should_stop = False
        self.history: list[dict[str, Any]] = []
        self._record: dict[str, Any] = {}
        self._bar: tqdm | None = None

    def log(self, **metrics: Any) -> None:
        """Add metrics to the current epoch's record in :attr:`history`."""
        self._record.update(metrics)

    def set_postfix(self, **fields: Any) -> None:
        """Show fields on the progress bar."""
        if self._bar is not None:
            self._bar.set_postfix(fields, refresh=False)

    def state_dict(self) -> dict[str, Any]:
        """Counters, history, every callback's state and the settler's (for checkpoints)."""
        settler = self.settler.state_dict() if hasattr(self.settler, "state_dict") else {}
        return {
            "epoch": self.epoch,
            "batches_seen": self.batches_seen,
            "images_seen": self.images_seen,
            "history": [dict(h) for h in self.history],
            "callbacks": [{"type": type(cb).__name__, "state": cb.state_dict()} for cb in self.callbacks],
            "settler": settler,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the callbacks must be the same, in order)."""
        saved = [c["type"] for c in state["callbacks"]]
        have = [type(cb).__name__ for cb in self.callbacks]
        if saved != have:
            raise ConfigError(f"checkpoint callbacks {saved} do not match this engine's {have}")
        self.epoch = state["epoch"]
        self.batches_seen = state["batches_seen"]
        self.images_seen = state["images_seen"]
        self.history = [dict(h) for h in state["history"]]
        for cb, c in zip(self.callbacks, state["callbacks"], strict=True):
            cb.load_state_dict(c["state"])
        if hasattr(self.settler, "load_state_dict") and state.get("settler"):
            self.settler.load_state_dict(state["settler"])

    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def _listeners(self, hook: str) -> list[Callable[..., None]]:
        """Bound ``hook`` methods of the callbacks that override it (set on the class or the
        instance), in order: the per-batch hooks skip the no-op base methods."""
        return [getattr(cb, hook) for cb in self.callbacks if overrides(cb, hook) or hook in vars(cb)]

    def _fused_runner(self, batches, on_step):
        """The fused online backend (:mod:`dynsim.fused`) for an epoch of ``batches``, or ``None``:
        it needs batch-1 :class:`EpochDraws`, a plain :class:`DynamicsSettler` (a subclass with its
        own ``__call__`` settles its own way), no ``on_step`` listener, and ``fused=True``."""
        settler = self.settler
        if (not self.fused or on_step is not None or not isinstance(batches, EpochDraws) or batches.batch_size != 1
                or not isinstance(settler, DynamicsSettler) or type(settler).__call__ is not DynamicsSettler.__call__):
            return None
        from dynsim.fused import online_runner

        return online_runner(settler, batches, self.callbacks, Batch)

    def _step_hook(self) -> StepHook | None:
        listeners = [cb for cb in self.callbacks if overrides(cb, "on_step")]
        if not listeners:
            return None

        def hook(n: int, u: torch.Tensor, residual: torch.Tensor) -> None:
            for cb in listeners:
                cb.on_step(self, n, u, residual)

        return hook

    def fit(
        self,
        batches: Callable[[int], Iterable[Batch]],
        epochs: int,
        *,
        start_epoch: int = 0,
        images_per_epoch: int | None = None,
        resume: bool = False,
    ) -> Engine:
        """Train for epochs ``start_epoch .. epochs-1``; ``batches(epoch)`` yields that epoch's batches.

        ``resume=True``: a :class:`~dynsim.checkpoint.Checkpoint` callback restores the last
        checkpoint (if its file exists) and training continues after its last epoch.
        """
        if resume:
            for cb in self.callbacks:
                if hasattr(cb, "restore"):
                    start_epoch = max(start_epoch, cb.restore(self))
        on_step = self._step_hook()
        total = None if images_per_epoch is None else images_per_epoch * max(epochs - start_epoch, 0)
        self._bar = tqdm(total=total, unit="img", desc=self.desc, disable=not self.progress, dynamic_ncols=True)
        bar_on = not self._bar.disable
        try:
            self._call("on_fit_start")
            for epoch in range(start_epoch, epochs):
                self.epoch = epoch
                self._record = {"epoch": epoch}
                t0 = time.perf_counter()
                self._call("on_epoch_start", epoch)
                on_input, on_settled, on_batch_end = (self._listeners(h) for h in _BATCH_HOOKS)
                runner = self._fused_runner(batches, on_step)
                fused = runner is not None and runner.run_epoch(self, epoch, self._bar if bar_on else None)
                self._record["online_backend"] = "fused" if fused else "per-input"
                for batch in () if fused else batches(epoch):
                    for hook in on_input:
                        hook(self, batch)
                    result = self.settler(batch, on_step)
                    for hook in on_settled:
                        hook(self, batch, result)
                    for hook in on_batch_end:
                        hook(self, batch, result)
                    size = batch.size
                    self.batches_seen += 1
                    self.images_seen += size
                    if bar_on:
                        self._bar.update(size)
                    if self.should_stop:
                        break
                self._record.update(images_seen=self.images_seen, train_seconds=time.perf_counter() - t0)
                # appended before on_epoch_end so that a checkpoint saved there includes this
                # epoch; callbacks still add metrics to it with log()
                self.history.append(self._record)
                self._call("on_epoch_end", epoch)
                if self.should_stop:
                    break
            self._call("on_fit_end")
        finally:
            self._bar.close()
            self._bar = None
        return self
