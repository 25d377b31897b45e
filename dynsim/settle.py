"""``settle``: run a system's dynamics on a batch until each sample stops on its own rule.

The loop keeps only the samples still running (the batch shrinks as samples settle), so
settled samples stop costing and stop changing. Each sample records how many steps it
took, why it stopped (:class:`~dynsim.stopping.Status`) and its final residual
``‖du/ds‖/‖u‖``, evaluated the same way whatever the solver or the stop rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from dynsim.errors import ConfigError, DataError
from dynsim.solvers.base import Solver
from dynsim.stopping import AnyOf, MaxSteps, RelativeChange, Status, StopRule
from dynsim.systems.base import System

StepHook = Callable[[int, torch.Tensor, torch.Tensor], None]
_TINY = 1e-12


@dataclass
class SettleResult:
    """What :func:`settle` returns (all tensors batch-first).

    Attributes
    ----------
    u : (B, D) settled state.
    r : (B, D) settled rates ``f(u)``.
    steps : (B,) long, solver steps each sample took.
    status : (B,) int8, :class:`~dynsim.stopping.Status` codes.
    residual : (B,) ``‖du/ds‖/‖u‖`` at the returned state.
    n_evals : int, vector-field evaluations summed over samples (one per sample per stage).
    """

    u: torch.Tensor
    r: torch.Tensor
    steps: torch.Tensor
    status: torch.Tensor
    residual: torch.Tensor
    n_evals: int

    @property
    def converged(self) -> torch.Tensor:
        """(B,) bool: the sample met its tolerance."""
        return self.status == Status.SETTLED

    @property
    def diverged(self) -> torch.Tensor:
        """(B,) bool: the state became non-finite or unbounded."""
        return self.status == Status.DIVERGED


class BoundField:
    """The vector field ``v -> system.field(v, drive)`` of the running samples.

    Solvers call it like a function; fixed-point solvers that need more than the field
    (e.g. :class:`~dynsim.solvers.SiteNewton`) read ``.system`` and ``.drive``.
    """

    __slots__ = ("system", "drive")

    def __init__(self, system: System, drive: torch.Tensor):
        self.system, self.drive = system, drive

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.system.field(v, self.drive)


def _simple_limits(stop: StopRule) -> tuple[float | None, int | None] | None:
    """``(tol, cap)`` such that a sample of the built-in rules runs iff ``residual >= tol``
    and ``steps < cap`` (``None``: that part absent); ``None`` for other rule types."""
    rules = stop.rules if type(stop) is AnyOf else (stop,)
    tols, caps = [], []
    for rule in rules:
        if type(rule) is RelativeChange:
            tols.append(rule.tol)
        elif type(rule) is MaxSteps:
            caps.append(rule.n)
        else:
            return None
    return (max(tols) if tols else None, min(caps) if caps else None)


def _cap_wins(stop: StopRule) -> bool:
    """True when a :class:`MaxSteps` comes before every :class:`RelativeChange` in ``stop``
    (its status code wins when both fire on the same step)."""
    rules = stop.rules if type(stop) is AnyOf else (stop,)
    kinds = [type(r) for r in rules]
    return MaxSteps in kinds and (RelativeChange not in kinds or kinds.index(MaxSteps) < kinds.index(RelativeChange))


def _all_settle_now(limits, residual: torch.Tensor, steps: int, all_running: bool) -> bool:
    """True when all samples are still running and all meet the tolerance before the cap.

    Then every status code is ``SETTLED`` (a settled sample is never marked diverged, and
    the cap has not fired), whatever the order of the rules."""
    if limits is None or not all_running:
        return False
    tol, cap = limits
    if tol is None or (cap is not None and steps >= cap):
        return False
    return bool((residual < tol).all())


def relative_norm(f: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per-sample ``‖f‖ / ‖u‖`` (``‖f‖ / 1e-12`` where ``u = 0``, 0 where ``f = 0``)."""
    num = torch.linalg.vector_norm(f, dim=1)
    den = torch.linalg.vector_norm(u, dim=1)
    return num / den.clamp_min(_TINY)  # 0 where f = 0; large where u = 0 only


def residual_norm_of(system: System) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-sample residual ``(f, u) -> (B,)`` that stop rules judge for ``system``: its own
    ``residual_norm`` when it defines one (a deep network judges every layer's ``‖f_p‖/‖u_p‖``,
    :meth:`~dynsim.systems.deep.DeepHebbianNet.residual_norm`), else :func:`relative_norm`."""
    return getattr(system, "residual_norm", relative_norm)


def _as_float_tensor(v, name: str, like: torch.Tensor | None = None) -> torch.Tensor:
    """``v`` as a floating tensor (``like``'s dtype and device when given; else its own float
    dtype, integers becoming the default float); :class:`DataError` if it is not real numbers."""
    if not isinstance(v, torch.Tensor):
        try:
            v = torch.as_tensor(np.asarray(v))
        except (TypeError, ValueError, RuntimeError):
            what = getattr(v, "dtype", type(v).__name__)
            raise DataError(f"{name} must be a numeric tensor or array, got {what}") from None
    if v.dtype.is_complex or v.dtype == torch.bool:
        raise DataError(f"{name} must hold real numbers, got dtype {v.dtype}")
    if like is not None:
        return v.to(device=like.device, dtype=like.dtype)
    return v if v.dtype.is_floating_point else v.to(torch.get_default_dtype())


def _float_tensor_of(system: System) -> torch.Tensor | None:
    """The first floating parameter or buffer of ``system`` (its dtype and device), if any."""
    for attr in ("parameters", "buffers"):
        if callable(getattr(system, attr, None)):
            found = next((t for t in getattr(system, attr)() if t.dtype.is_floating_point), None)
            if found is not None:
                return found
    return None


def _reject_non_finite(v: torch.Tensor, name: str) -> None:
    finite = torch.isfinite(v)
    if v.numel() and not bool(finite.all()):
        row = int(torch.nonzero(~finite.all(dim=1))[0])
        bad = v[row][~finite[row]][0]
        what = "NaN" if bool(torch.isnan(bad)) else "inf (or a value too large for the system's dtype)"
        raise DataError(f"{name}[{row}] contains {what}; remove or clean that sample")


def _checked_input(system: System, x, solver, stop, max_state_norm) -> torch.Tensor:
    """Validate the arguments of :func:`settle`; return ``x`` on the system's device and dtype."""
    if not isinstance(solver, Solver):
        raise ConfigError(f"solver must be a dynsim Solver (e.g. Euler()), got {solver!r}")
    if not isinstance(stop, StopRule):
        raise ConfigError(f"stop must be a StopRule (e.g. RelativeChange(1e-4) | MaxSteps(3000)), got {stop!r}")
    if (isinstance(max_state_norm, bool) or not isinstance(max_state_norm, (int, float))
            or not (math.isfinite(max_state_norm) and max_state_norm > 0)):
        raise ConfigError(f"max_state_norm must be a finite number > 0 (e.g. 1e6), got {max_state_norm!r}")
    x = _as_float_tensor(x, "x", _float_tensor_of(system))
    if x.ndim != 2:
        raise ConfigError(f"x must be a (batch, features) tensor, got shape {tuple(x.shape)}; "
                          "flatten images with x.reshape(len(x), -1)")
    _reject_non_finite(x, "x")
    return x


def settle(
    system: System,
    x: torch.Tensor,
    *,
    solver: Solver,
    stop: StopRule,
    u0: torch.Tensor | None = None,
    max_state_norm: float = 1e6,
    on_step: StepHook | None = None,
) -> SettleResult:
    """Integrate ``du/ds = system.field(u, system.drive(x))`` from ``u0`` until ``stop``.

    Parameters
    ----------
    system : System
    x : (B, D_in) inputs, held fixed while settling.
    solver : Solver, e.g. ``Euler(SEED_SCHEDULE)``.
    stop : StopRule, judged per sample, e.g. ``RelativeChange(1e-4) | MaxSteps(3000)``.
    u0 : (B, D) initial state (streaming input carries it over); zeros when ``None``.
    max_state_norm : a sample whose RMS state exceeds this, or turns non-finite, is
        marked ``Status.DIVERGED`` and keeps its last finite state.
    on_step : optional ``hook(n, u_running, residual_running)`` after each step (it costs one
        extra field evaluation per step, not counted in ``n_evals``).

    Raises
    ------
    ConfigError : wrong shapes, a solver/stop rule of the wrong type, a bad ``max_state_norm``.
    DataError : ``x`` or ``u0`` is not numeric or holds NaN/Inf (the message names the row).

    Returns
    -------
    SettleResult

    Examples
    --------
    >>> from dynsim import HebbianLayer, Euler, RelativeChange, MaxSteps, settle
    >>> layer = HebbianLayer((1, 8, 8), nps=2, stride=2, radius=3.0)
    >>> res = settle(layer, torch.randn(5, 64), solver=Euler(), stop=RelativeChange(1e-4) | MaxSteps(3000))
    >>> res.r.shape, bool(res.converged.all())
    (torch.Size([5, 32]), True)
    """
    x = _checked_input(system, x, solver, stop, max_state_norm)
    b = x.shape[0]
    if b == 0:  # an empty batch settles trivially (the drive's reshape cannot infer sizes from 0 rows)
        want = getattr(system, "input_size", x.shape[1])
        if x.shape[1] != want:
            raise ConfigError(f"input must have shape (batch, {want}), got {tuple(x.shape)}")
        empty = x.new_zeros(0, system.state_size)
        z = torch.zeros(0, dtype=torch.long, device=x.device)
        return SettleResult(u=empty, r=empty.clone(), steps=z, status=z.to(torch.int8), residual=x.new_zeros(0),
                            n_evals=0)
    limits = _simple_limits(stop)
    on = stop.on or "field"
    if limits is not None and on == "field" and on_step is None and stop.max_steps != 0:
        fast = solver.settle_compiled(system, x, u0, tol=limits[0], cap=limits[1], cap_first=_cap_wins(stop),
                                      max_state_norm=max_state_norm)
        if fast is not None:  # the solver's compiled loop: same rules, steps and status (see dynsim.compiled)
            return SettleResult(*fast)
    drive_all = system.drive(x)
    if u0 is not None:
        u0 = _as_float_tensor(u0, "u0", drive_all)
        if u0.shape != drive_all.shape:
            raise ConfigError(f"u0 must have shape {tuple(drive_all.shape)}, got {tuple(u0.shape)}")
        _reject_non_finite(u0, "u0")
    u_all = torch.zeros_like(drive_all) if u0 is None else u0.clone()
    steps = torch.zeros(b, dtype=torch.long, device=x.device)
    status = torch.zeros(b, dtype=torch.int8, device=x.device)
    bound = max_state_norm * math.sqrt(drive_all.shape[1])
    n_evals = 0

    active = torch.arange(b, device=x.device)
    u, drive = u_all, drive_all

    field = BoundField(system, drive)

    state = solver.init(field, u)
    n = 0
    cap = stop.max_steps
    if cap == 0:
        active = active[:0]
        status.fill_(Status.MAX_STEPS)
    # Cheap per-step test for the built-in stop rules (exactly "some sample's code is not
    # RUNNING"); the full status codes are computed only on steps where something stops.
    residual_all = torch.zeros(b, dtype=drive_all.dtype, device=x.device) if on == "field" else None
    norm = residual_norm_of(system)
    while active.numel():
        u_next, f, state = solver.step(field, u, state, n)
        n_evals += solver.evals_per_step * active.numel()
        if on == "field":
            residual = norm(f, u)
            candidate, cand_steps = u, n
        else:
            residual = norm(u_next - u, u)
            candidate, cand_steps = u_next, n + 1
        state_norm = torch.linalg.vector_norm(u_next, dim=1)
        if limits is not None:
            tol, cap_ = limits
            ok = state_norm <= bound  # False for inf and NaN states
            if tol is not None:
                ok &= residual >= tol  # False for NaN residuals
            event = (cap_ is not None and cand_steps >= cap_) or not bool(ok.all())
        else:
            event = True
        if event and _all_settle_now(limits, residual, cand_steps, active.numel() == b):
            # every sample meets its tolerance at this step (always so at batch 1): the
            # per-sample bookkeeping below would give exactly this, at 30 ops' cost
            u_all = candidate
            status.fill_(int(Status.SETTLED))
            steps.fill_(cand_steps)
            if residual_all is not None:
                residual_all = residual
            break
        if event:
            code = stop.status(residual, cand_steps)
            bad = ~torch.isfinite(residual) | ~torch.isfinite(u_next).all(dim=1)
            bad |= state_norm > bound
            code = torch.where(bad & (code == Status.RUNNING), int(Status.DIVERGED), code).to(torch.int8)
            done = code != Status.RUNNING
            if bool(done.any()):
                ids = active[done]
                final = torch.where((code[done] == Status.DIVERGED)[:, None], u[done], candidate[done])
                u_all[ids] = final
                status[ids] = code[done]
                steps[ids] = torch.where(code[done] == Status.DIVERGED, n, cand_steps)
                if residual_all is not None:  # on="field": the residual of the returned state
                    residual_all[ids] = residual[done]
                keep = ~done
                active, u_next, drive = active[keep], u_next[keep], drive[keep]
                field.drive = drive
                state = solver.select(state, keep)
        u = u_next
        n += 1
        if on_step is not None and active.numel():
            on_step(n, u, norm(field(u), u))
    if residual_all is None or cap == 0:
        residual_all = norm(system.field(u_all, drive_all), u_all)
    return SettleResult(
        u=u_all,
        r=system.rates(u_all),
        steps=steps,
        status=status,
        residual=residual_all,
        n_evals=n_evals,
    )
