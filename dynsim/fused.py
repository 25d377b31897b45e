"""The fused online backend of the :class:`~dynsim.engine.Engine`: many batch-1 steps per compiled call.

Online DSSM learning (batch 1, as in Obeid, Ramambason & Pehlevan 2019) settles one image, applies the
Hebbian/anti-Hebbian rule

    ΔW = η (r xᵀ − W),   ΔL = (η/2) (r rᵀ − L)      (stored entries only),

and moves on. Per image that is little arithmetic (the drive ``W x``, a few Newton steps on NpS
× NpS blocks, one pass over the weights), far less than the Python and torch dispatch of
calling ``settle`` and the rule once per image from the event loop. This backend runs a whole
chunk of the epoch's draws — the epoch, or 256 images while a progress bar is shown — in one
compiled call (:func:`dynsim.compiled._train_online`: for each drawn index, gather the image,
settle it with the same iteration as every compiled settle
(:func:`dynsim.compiled._settle_row`), apply the rule, write the per-input numbers), then hands
the monitors their arrays. It is a backend of the same loop, not a second engine: the same
settling iteration, stop rules, caps and statuses, and the same update formula as the per-input
path; the weights live in a site-last copy during the call, so the drive ``W x`` sums in
another order and the weights agree with the per-input path's to float rounding, far inside the
settling tolerance (the steps and statuses agree except where an input's residual lies within
that rounding of the threshold; tests: ``tests/test_fused.py``). Same divergence handling
(``on_divergence="raise"``: the input that diverged is not learned from, the inputs before it
are, and the engine raises the per-input path's :class:`~dynsim.errors.DivergenceError`;
``"skip"``: that input's update is left out), streaming with ``carry="u"`` (the state runs on
from input to input, capped at ``stream_every`` steps each).

It applies (the engine asks :func:`online_runner` each epoch) when all of these hold, else
the engine runs its per-input loop:

* the settler is a :class:`~dynsim.engine.DynamicsSettler` (not a subclass with its own
  ``__call__``) whose system, solver and stop rule
  the compiled kernels implement (a site-separable layer on CPU, SiteNewton or capped Euler, a
  field-residual rule; not streaming with ``carry="r"``), and ``Engine(fused=True)``;
* the batches are an :class:`~dynsim.engine.EpochDraws` with batch size 1 on CPU;
* no callback listens to ``on_step``, and every callback that overrides a per-input hook
  (``on_input``, ``on_settled``, ``on_batch_end``) has a fused form written by the same class:
  ``fused_update()`` (a plasticity rule: ``(layer, rate_ff, rate_lat)`` for the current epoch;
  :class:`~dynsim.plasticity.SimilarityMatchingRule`) or ``on_inputs(engine, inputs)`` (a
  monitor taking a chunk's :class:`SettledInputs` arrays; :class:`~dynsim.monitors.SettlingMonitor`).
  A callback that needs Python per input (a user ``on_settled``, a trajectory or switch
  monitor, a hook set on the instance) keeps the per-input path, so it still sees every input.

Granularity: ``engine.should_stop`` and the progress bar act between chunks; epoch-end hooks
(evaluation, checkpoints, learning-rate schedules) run as on the per-input path.
Timings: ``benchmarks/online_fused.py`` and benchmarks/README.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dynsim import compiled
from dynsim.callbacks import overrides
from dynsim.settle import SettleResult, settle
from dynsim.stopping import Status

BAR_CHUNK = 256  # images per compiled call while a progress bar is shown (it moves between calls)
_PER_INPUT_HOOKS = ("on_input", "on_settled", "on_batch_end")
_FUSED_FORMS = ("fused_update", "on_inputs")
_MAX_STATE_NORM = settle.__kwdefaults__["max_state_norm"]  # the divergence bound DynamicsSettler settles with


@dataclass
class SettledInputs:
    """Per-input numbers of a chunk of batch-1 inputs, in presentation order (all (k,) arrays).

    Attributes
    ----------
    index : int64, positions of the inputs in their data set.
    steps : int64, solver steps each input took.
    status : int8, :class:`~dynsim.stopping.Status` codes.
    residual : ``‖du/ds‖/‖u‖`` at each returned state (the weights' dtype).
    n_evals : int64, vector-field evaluations per input.
    epoch : int, 0-based; ``first`` : the position of the chunk's first input in the epoch
        (its batch number at batch 1).
    """

    index: np.ndarray
    steps: np.ndarray
    status: np.ndarray
    residual: np.ndarray
    n_evals: np.ndarray
    epoch: int
    first: int

    def __len__(self) -> int:
        return int(self.index.shape[0])


def _covered(callback) -> bool:
    """The callback's per-input hooks are all covered by a fused form written by the same class
    (a subclass that overrides ``on_settled`` again, or a hook set on the instance, is not)."""
    mro = type(callback).__mro__
    for hook in ("on_step", *_PER_INPUT_HOOKS):
        if hook in vars(callback):
            return False
        if not overrides(callback, hook):
            continue
        if hook == "on_step":
            return False
        owner = next(c for c in mro if hook in c.__dict__)
        if not any(form in owner.__dict__ for form in _FUSED_FORMS):
            return False
    return True


def online_runner(settler, batches, callbacks, batch_type) -> FusedOnline | None:
    """The fused backend for an epoch of ``batches`` (an ``EpochDraws`` of batch size 1, checked by
    the engine, as are ``Engine(fused=True)``, a plain ``DynamicsSettler`` and no ``on_step``
    listener), or ``None`` (then the engine runs its per-input loop). ``batch_type``: the engine's
    ``Batch`` (for the per-input path's divergence error). Conditions: module docstring."""
    if not compiled.available() or settler.on_divergence not in ("raise", "skip"):
        return None
    streaming = settler.stream_every is not None
    if streaming and settler.carry != "u":
        return None
    layer = settler.system
    x = batches.x
    if x.ndim != 2 or x.shape[0] == 0 or not compiled.applies(layer, x):
        return None
    if x.shape[1] != layer.input_size:
        return None
    settings = compiled.kernel_settings(settler.solver, settler.stop.limits(), _MAX_STATE_NORM)
    if settings is None:
        return None
    state = settler.state if streaming else None
    if state is not None and (tuple(state.shape) != (1, layer.state_size) or not compiled.applies(layer, state)
                              or not bool(torch.isfinite(state).all())):
        return None
    rules, monitors = [], []
    for cb in callbacks:
        if not _covered(cb):
            return None
        if hasattr(cb, "fused_update") and any(overrides(cb, h) for h in _PER_INPUT_HOOKS):
            rules.append(cb)
        elif overrides(cb, "on_inputs"):
            monitors.append(cb)
    if len(rules) > 1:
        return None
    return FusedOnline(settler, batches, settings, rules[0] if rules else None, monitors, batch_type)


class FusedOnline:
    """One epoch of batch-1 online steps in compiled chunks (built by :func:`online_runner`)."""

    def __init__(self, settler, batches, settings: dict, rule, monitors: list, batch_type):
        self.settler, self.batches, self.settings = settler, batches, settings
        self.rule, self.monitors, self.batch_type = rule, monitors, batch_type

    def run_epoch(self, engine, epoch: int, bar=None) -> bool:
        """Run ``epoch``'s draws; returns False (nothing done) if the rule has no fused form now
        (e.g. its layer is not the settled system), so the engine runs its per-input loop."""
        layer = self.settler.system
        learn, rate_ff, rate_lat = False, 0.0, 0.0
        if self.rule is not None:
            form = self.rule.fused_update()
            if form is None or form[0] is not layer:
                return False
            learn, rate_ff, rate_lat = True, form[1], form[2]
        w, ff_index, n_pixels, channels, lat, lat_index = compiled._arrays(layer)
        npt = w.dtype.type
        loop = compiled.loop_arguments(layer, **self.settings)
        xs = self.batches.x.detach().contiguous().numpy()
        order = self.batches.order(epoch).numpy().astype(np.int64, copy=False)
        streaming = self.settler.stream_every is not None
        u = np.zeros((1, layer.state_size), dtype=w.dtype)
        if streaming and self.settler.state is not None:
            u[:] = self.settler.state.numpy()
        r = np.zeros_like(u)
        k = order.shape[0]
        chunk = k if bar is None else BAR_CHUNK
        stop_on_divergence = self.settler.on_divergence == "raise"
        for start in range(0, k, chunk):
            part = order[start : start + chunk]
            n = part.shape[0]
            steps, status = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int8)
            residual, n_evals = np.empty(n, dtype=w.dtype), np.empty(n, dtype=np.int64)
            done = compiled._train_online(xs, part, w, ff_index, n_pixels, channels, lat, *loop, npt(rate_ff),
                                 npt(rate_lat), learn, stop_on_divergence, streaming, u, r, steps, status, residual,
                                 n_evals)
            if learn and done:  # as an in-place torch op would: caches keyed on the versions see the change
                torch.autograd.graph.increment_version((layer.ff.weight, layer.lateral.weight))
            if streaming:
                self.settler.state = torch.from_numpy(u.copy())
            if done:
                inputs = SettledInputs(part[:done], steps[:done], status[:done], residual[:done], n_evals[:done],
                                       epoch, start)
                for cb in self.monitors:
                    cb.on_inputs(engine, inputs)
                engine.batches_seen += done
                engine.images_seen += done
                if bar is not None:
                    bar.update(done)
            if done < n:
                self._raise_diverged(epoch, start + done, int(part[done]), u, r, int(steps[done]),
                                     float(residual[done]), int(n_evals[done]))
            if engine.should_stop:
                break
        return True

    def _raise_diverged(self, epoch, number, index, u, r, steps, residual, n_evals):
        """The per-input path's DivergenceError for the input at ``number`` of ``epoch``."""
        batch = self.batch_type(x=self.batches.x[index : index + 1], y=None, index=torch.tensor([index]), epoch=epoch,
                      number=number)
        diverged = torch.tensor([int(Status.DIVERGED)], dtype=torch.int8)
        result = SettleResult(u=torch.from_numpy(u.copy()), r=torch.from_numpy(r.copy()), steps=torch.tensor([steps]),
                              status=diverged, residual=torch.tensor([residual]), n_evals=n_evals)
        self.settler._checked(batch, result)  # raises
        raise AssertionError("a diverged input passed the settler's check")  # pragma: no cover
