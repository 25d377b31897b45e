"""``settle``: run a system's dynamics on a batch until each sample stops on its own rule.

One entry point, two backends with the same semantics, statuses and counts: the torch loop
below (everywhere: any system, solver, stop rule, device) and the compiled CPU kernels of
:mod:`dynsim.compiled`, chosen inside :func:`settle` where they apply (a site-separable
:class:`~dynsim.systems.HebbianLayer` on CPU, Euler or per-site Newton, a stop rule that
describes its limits, no step hook). The torch loop keeps only the samples still running (the
batch shrinks as samples settle), so settled samples stop costing and stop changing. Each
sample records how many steps it took, why it stopped (:class:`~dynsim.stopping.Status`) and
its final residual ``‖du/ds‖/‖u‖``, evaluated the same way whatever the solver or stop rule.

The system is a :class:`~dynsim.systems.System` driven by an input ``x``, or any module or
function ``f(t, u)`` (a vector field in torchdiffeq's convention) started from ``u0``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from dynsim import backend
from dynsim.errors import ConfigError, DataError
from dynsim.solvers.base import Solver, StepResult
from dynsim.stopping import Status, StopLimits, StopRule, relative_norm
from dynsim.systems.base import System

StepHook = Callable[[int, torch.Tensor, torch.Tensor], None]


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
    """The vector field ``(u, t) -> system.field(u, drive)`` of the running samples (autonomous).

    Solvers call it like a function; fixed-point solvers that need more than the field
    (e.g. :class:`~dynsim.solvers.SiteNewton`) read ``.system`` and ``.drive``; ``.target`` is the
    relative field residual the loop stops at (the stop rule's ``rtol + atol/‖u‖`` is judged per
    sample; here its ``rtol``, or ``None``), for solvers that size inner solves to it
    (:class:`~dynsim.solvers.SiteNewtonCG`: no CG accuracy beyond what the last step needs).
    """

    __slots__ = ("system", "drive", "target")
    time_dependent = False

    def __init__(self, system: System, drive: torch.Tensor, target: float | None = None):
        self.system, self.drive, self.target = system, drive, target

    def __call__(self, u: torch.Tensor, t=None) -> torch.Tensor:
        return self.system.field(u, self.drive)


class TimeField:
    """A user's vector field ``f(t, u)`` called as ``(u, t) -> f(t, u)`` (``t = 0`` when not given)."""

    __slots__ = ("f",)
    time_dependent = True
    system = None
    drive = None

    def __init__(self, f: Callable[..., torch.Tensor]):
        self.f = f

    def __call__(self, u: torch.Tensor, t=None) -> torch.Tensor:
        return self.f(0.0 if t is None else t, u)


def _all_settle_now(limits: StopLimits | None, residual: torch.Tensor, state_norm: torch.Tensor, steps: int,
                    all_running: bool) -> bool:
    """True when all samples are still running and all meet the tolerance before the cap.

    Then every status code is ``SETTLED`` (a settled sample is never marked diverged, and
    the cap has not fired), whatever the order of the rules."""
    if limits is None or not all_running or limits.rtol is None:
        return False
    if limits.cap is not None and steps >= limits.cap:
        return False
    return not bool(limits.running(residual, state_norm).any())


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


def _check_options(solver, stop, max_state_norm) -> None:
    if not isinstance(solver, Solver):
        raise ConfigError(f"solver must be a dynsim Solver (e.g. Euler()), got {solver!r}")
    if not isinstance(stop, StopRule):
        raise ConfigError(f"stop must be a StopRule (e.g. ResidualBelow(1e-4) | MaxSteps(3000)), got {stop!r}")
    if (isinstance(max_state_norm, bool) or not isinstance(max_state_norm, (int, float))
            or not (math.isfinite(max_state_norm) and max_state_norm > 0)):
        raise ConfigError(f"max_state_norm must be a finite number > 0 (e.g. 1e6), got {max_state_norm!r}")


def _checked_input(system: System, x) -> torch.Tensor:
    """Validate ``x``; return it on the system's device and dtype."""
    if x is None:
        raise ConfigError(f"settling a {type(system).__name__} needs an input x of shape (batch, features)")
    x = _as_float_tensor(x, "x", _float_tensor_of(system))
    if x.ndim != 2:
        raise ConfigError(f"x must be a (batch, features) tensor, got shape {tuple(x.shape)}; "
                          "flatten images with x.reshape(len(x), -1)")
    _reject_non_finite(x, "x")
    return x



def _checked_u0(u0, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    u0 = _as_float_tensor(u0, "u0", like)
    if tuple(u0.shape) != tuple(shape):
        raise ConfigError(f"u0 must have shape {tuple(shape)}, got {tuple(u0.shape)}")
    _reject_non_finite(u0, "u0")
    return u0


def settle(
    system: System | Callable[..., torch.Tensor],
    x: torch.Tensor | None = None,
    *,
    solver: Solver,
    stop: StopRule,
    u0: torch.Tensor | None = None,
    max_state_norm: float = 1e6,
    on_step: StepHook | None = None,
    grad: bool = False,
) -> SettleResult:
    """Integrate ``du/ds = system.field(u, system.drive(x))`` (or ``du/ds = f(s, u)``) from ``u0`` until ``stop``.

    Parameters
    ----------
    system : a System, or any module/function ``f(t, u)`` -> (B, D) (then no ``x``; ``u0`` required,
        rates ``r = u``).
    x : (B, D_in) inputs of a System, held fixed while settling.
    solver : Solver, e.g. ``Euler(SEED_SCHEDULE)``.
    stop : StopRule, judged per sample, e.g. ``ResidualBelow(1e-4) | MaxSteps(3000)``, or
        ``ResidualBelow(1e-4, atol=1e-8)`` for a fixed point at ``u = 0``.
    u0 : (B, D) initial state (streaming input carries it over); zeros when ``None``.
    max_state_norm : a sample whose RMS state exceeds this, or turns non-finite, is
        marked ``Status.DIVERGED`` and keeps its last finite state.
    on_step : optional ``hook(n, u_running, residual_running)`` after each step (it costs one
        extra field evaluation per step, not counted in ``n_evals``).
    grad : record the autograd graph through the steps (default: no, as under ``torch.no_grad()``).

    Raises
    ------
    ConfigError : wrong shapes, a solver/stop rule of the wrong type, a bad ``max_state_norm``.
    DataError : ``x`` or ``u0`` is not numeric or holds NaN/Inf (the message names the row).

    Returns
    -------
    SettleResult

    Examples
    --------
    >>> from dynsim import HebbianLayer, Euler, ResidualBelow, MaxSteps, settle
    >>> layer = HebbianLayer((1, 8, 8), nps=2, stride=2, radius=3.0)
    >>> res = settle(layer, torch.randn(5, 64), solver=Euler(), stop=ResidualBelow(1e-4) | MaxSteps(3000))
    >>> res.r.shape, bool(res.converged.all())
    (torch.Size([5, 32]), True)

    Any ``f(t, u)``: ``du/ds = −u`` from 1 settles (‖du/ds‖ < 1e-6) after ``⌈ln(1e-6)/ln(1 − 0.5)⌉`` steps of 0.5:

    >>> from dynsim import ConstantStep
    >>> res = settle(lambda t, u: -u, u0=torch.ones(1, 1), solver=Euler(ConstantStep(0.5)),
    ...              stop=ResidualBelow(1e-4, atol=1e-6) | MaxSteps(100))
    >>> int(res.steps[0]), res.status.tolist()
    (20, [1])
    """
    _check_options(solver, stop, max_state_norm)
    if isinstance(system, System):
        x = _checked_input(system, x)
        if x.shape[0] and on_step is None:
            # the compiled backend (no autograd: it applies only to tensors without grad); same
            # rules, steps, statuses and counts as the torch loop
            fast = backend.compiled_settle(system, x, u0, solver, stop.limits(), max_state_norm)
            if fast is not None:
                return SettleResult(*fast)
    with contextlib.nullcontext() if grad else torch.no_grad():
        if isinstance(system, System):
            return _settle_torch(system, x, solver, stop, u0, max_state_norm, on_step)
        if not callable(system):
            raise ConfigError(f"system must be a dynsim System or a vector field f(t, u), got {system!r}")
        if x is not None:
            raise ConfigError("a vector field f(t, u) takes no input x; give the initial state as u0=")
        if u0 is None:
            raise ConfigError("settling a vector field f(t, u) needs the initial state u0 (batch, state)")
        u0 = _as_float_tensor(u0, "u0")
        if u0.ndim != 2:
            raise ConfigError(f"u0 must be a (batch, state) tensor, got shape {tuple(u0.shape)}")
        _reject_non_finite(u0, "u0")
        return _settle_torch(None, TimeField(system), solver, stop, u0, max_state_norm, on_step)


def _settle_torch(system: System | None, x, solver: Solver, stop: StopRule, u0, max_state_norm: float,
                  on_step: StepHook | None) -> SettleResult:
    """The torch backend: ``system`` with inputs ``x``, or (``system=None``) the TimeField ``x``."""
    if system is None:
        field_all = x
        drive_all = None
        template = u0
        rates = lambda u: u  # noqa: E731
    else:
        if x.shape[0] == 0:  # an empty batch settles trivially (the drive's reshape cannot infer sizes from 0 rows)
            want = getattr(system, "input_size", x.shape[1])
            if x.shape[1] != want:
                raise ConfigError(f"input must have shape (batch, {want}), got {tuple(x.shape)}")
            empty = x.new_zeros(0, system.state_size)
            z = torch.zeros(0, dtype=torch.long, device=x.device)
            return SettleResult(u=empty, r=empty.clone(), steps=z, status=z.to(torch.int8), residual=x.new_zeros(0),
                                n_evals=0)
        drive_all = system.drive(x)
        field_all = BoundField(system, drive_all)
        template = drive_all
        if u0 is not None:
            u0 = _checked_u0(u0, drive_all, drive_all.shape)
        rates = system.rates
    b = template.shape[0]
    device = template.device
    start = torch.zeros_like(template) if u0 is None else u0
    u_all = start.clone()  # the returned states; the loop steps from ``start`` (kept intact for autograd)
    steps = torch.zeros(b, dtype=torch.long, device=device)
    status = torch.zeros(b, dtype=torch.int8, device=device)
    bound = max_state_norm * math.sqrt(template.shape[1])
    n_evals = 0
    limits = stop.limits()
    on = stop.on or "field"

    active = torch.arange(b, device=device)
    u, drive = start, drive_all
    target = limits.rtol if limits is not None and on == "field" else None
    field = BoundField(system, drive, target) if system is not None else field_all

    state = solver.init(field, u)
    n = 0
    cap = stop.max_steps
    if cap == 0:
        active = active[:0]
        status.fill_(Status.MAX_STEPS)
    # Cheap per-step test when the rule describes its limits (exactly "some sample's code is
    # not RUNNING"); the full status codes are computed only on steps where something stops.
    residual_all = torch.zeros(b, dtype=template.dtype, device=device) if on == "field" else None
    norm = relative_norm if system is None else residual_norm_of(system)
    while active.numel():
        out = solver.step(field, u, state, n)
        if isinstance(out, StepResult):
            u_next, f, state, evals = out
        else:  # a solver written for the older 3-tuple contract: its class's evals_per_step
            (u_next, f, state), evals = out, getattr(solver, "evals_per_step", 1)
        n_evals += evals * active.numel()
        if on == "field":
            r_vec, candidate, cand_steps = f, u, n
        else:
            r_vec, candidate, cand_steps = u_next - u, u_next, n + 1
        u_norm = torch.linalg.vector_norm(u, dim=1)
        residual = norm(r_vec, u)
        state_norm = torch.linalg.vector_norm(u_next, dim=1)
        if limits is not None:
            ok = state_norm <= bound  # False for inf and NaN states
            if limits.rtol is not None:  # False for NaN residuals
                ok &= residual >= (limits.threshold(u_norm) if limits.atol else limits.rtol)
            event = (limits.cap is not None and cand_steps >= limits.cap) or not bool(ok.all())
        else:
            event = True
        if event and _all_settle_now(limits, residual, u_norm, cand_steps, active.numel() == b):
            # every sample meets its tolerance at this step (always so at batch 1): the
            # per-sample bookkeeping below would give exactly this, at a fraction of its cost
            u_all = candidate
            status.fill_(int(Status.SETTLED))
            steps.fill_(cand_steps)
            if residual_all is not None:
                residual_all = residual
            break
        if event:
            code = stop.status(residual, cand_steps, state_norm=u_norm)
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
                active, u_next = active[keep], u_next[keep]
                if drive is not None:
                    drive = drive[keep]
                    field.drive = drive
                state = solver.select(state, keep)
        u = u_next
        n += 1
        if on_step is not None and active.numel():
            on_step(n, u, norm(field(u), u))
    if residual_all is None or cap == 0:
        residual_all = norm(field_all(u_all), u_all)
    return SettleResult(u=u_all, r=rates(u_all), steps=steps, status=status, residual=residual_all, n_evals=n_evals)
