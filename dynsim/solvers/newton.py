"""Block Newton: a fixed-point solver for systems whose field splits into small blocks.

For a :class:`~dynsim.systems.HebbianLayer` with lateral connections inside each site only
(lateral distance 0, the DSSM default), the fixed-point equation ``F(u) = 0`` separates into
one ``nps``-dimensional problem per site. :class:`SiteNewton` takes full Newton steps
``u_{n+1} = u_n − J(u_n)⁻¹ F(u_n)`` on all blocks at once (one batched M × M solve),
converging quadratically: a handful of steps reach ``‖F‖/‖u‖ < 1e-4`` where the seed's Euler
schedule needs hundreds. It settles to the same fixed point, judged by the same
solver-independent residual, so it is a drop-in for training and evaluation.

The system is reached through the :class:`~dynsim.systems.base.BlockJacobian` protocol:
``jacobian_blocks(u, drive)`` gives ``G = τF(u)`` and ``∂G/∂u`` per block, and
``newton_safeguard(u_next, drive)`` brings a wild step back (for the tanh layer, a projection
onto the box that holds every fixed point).

For a tanh layer the first step (``picard_start``, default True) is one Picard/Euler step with
``dt = τ``, ``u_1 = d + s·A f(u_0)`` — from rest exactly ``u_1 = W x``, the drive — and Newton
starts from there: Newton from ``u = 0`` first has to undo tanh's saturation, so this saves
steps on trained weights (benchmarks/README.md). Any start is legitimate: a sample stops only
when its own field residual passes the test, and the inhibitory DSSM layer has one fixed point.

Plain Newton is not globally convergent: on trained layers it can cycle where a site's Jacobian is
near-singular (issue 15: ~11 % of Fashion-MNIST images at NpS 16). From step ``SEARCH_AFTER`` (12,
the Picard start counted) on, every Newton step is therefore damped per site by :func:`line_search`
(Armijo backtracking on ``½‖F_k‖²``, checked one step late, so it costs no field evaluation); an
input that settles in fewer steps takes exactly plain Newton's steps.
"""

from __future__ import annotations

import torch

from dynsim.errors import ConfigError
from dynsim.solvers.base import Solver, StepResult
from dynsim.systems.base import BlockJacobian

_JACOBIAN_BUDGET = 1 << 25  # Jacobian entries built at once (128 MiB in float32): larger batches go in chunks


class SiteNewton(Solver):
    """Newton's method on the fixed-point equation, block by block (see module docstring)."""

    name = "newton"

    def __init__(self, picard_start: bool | str | int = True):
        self.picard_start = _parse_bool(picard_start, "picard_start")

    def __repr__(self) -> str:
        return "SiteNewton()" if self.picard_start else "SiteNewton(picard_start=False)"

    def step(self, field, u, state, n):
        system = getattr(field, "system", None)
        if not callable(getattr(system, "jacobian_blocks", None)):  # the BlockJacobian protocol (isinstance is slow)
            raise ConfigError(
                "the newton solver needs a system with Jacobian blocks (jacobian_blocks, e.g. a HebbianLayer "
                "with lateral distance 0), run through dynsim.settle; use --solver euler otherwise"
            )
        tau = float(getattr(system, "tau", 1.0))
        if n == 0 and self.picard_start and getattr(system, "activation", None) == "tanh":
            f = field(u)  # u_1 = u_0 + τ F(u_0) = d + s·A f(u_0): from rest, the drive
            return StepResult(u + tau * f, f, state, 1)
        u_next, f = newton_step(system, u, field.drive, tau)
        if n >= SEARCH_AFTER:
            u_next, state = line_search(system, u, f, u_next, state)
        return StepResult(u_next, f, state, 1)


# Armijo's sufficient-decrease constant and the most halvings of a site's Newton step
ARMIJO_C = 1e-4
MAX_HALVINGS = 10
SEARCH_AFTER = 12  # steps (the Picard start included) of plain Newton before the line search starts


def line_search(system, u: torch.Tensor, f: torch.Tensor, u_full: torch.Tensor, state,
                unchecked: torch.Tensor | None = None):
    """A per-site backtracking line search on the merit ``φ_k = ½‖F_k‖²`` (Armijo), checked one step late.

    A Newton step from ``u_n`` to ``u_n + p`` (``p_k = −J_k⁻¹G_k`` where the box is inactive) is
    accepted on site ``k`` if at the next step, where ``F`` is evaluated anyway,

        ‖F_k(u_n + α p)‖² ≤ (1 − 2cα) ‖F_k(u_n)‖²,    c = 1e-4,

    (or ``‖τF_k‖² ≤ (16 eps)²(‖u_k‖² + 1)``, rounding level); else the site goes back to
    ``u_n + (α/2) p`` and is tested again, down to ``α = 2^−10``, which is accepted. Checking late
    costs no field evaluation: a step is one evaluation as before, and a site whose full step
    decreases its merit enough (every site of an easy input) takes exactly plain Newton's steps;
    a halving costs a step. ``p`` is a descent direction of ``φ_k`` (``∇φ_kᵀp = −‖F_k‖²``), so
    the merit decreases on every accepted step (Dennis & Schnabel 1996, §6.3; Nocedal & Wright
    2006, §11.2). :class:`SiteNewton` and :class:`~dynsim.solvers.SiteNewtonCG` call it from step
    ``SEARCH_AFTER`` on (the torch path and the compiled kernels alike). For a site with
    ``I − s·A_k ≻ 0`` (inhibitory sign: ``L_k`` positive definite, which the Hebbian rule keeps
    from ``L = I``; :meth:`HebbianLayer.monotone_sites`)
    ``−J_k = (I − D) + D^{1/2}(I − s·A_k)D^{1/2}`` is similar to a positive definite matrix for
    every ``0 ≤ D = diag f' ≤ I``: ``F_k`` has one root, ``φ_k`` no other stationary point, and the
    damped iteration converges to that root from any start. Plain Newton need not: on a trained
    NpS 16 layer it cycles (period 2, the box projection active every other step) on ~11 % of
    inputs (benchmarks/newton_hard.py). A site without that property may have several fixed
    points and merit minima that are not roots, where backtracking would stall; it keeps plain
    Newton (checked only when one of its steps fails the test).

    ``unchecked`` (B, S) bool, optional: sites whose step from ``u`` is not a Newton step (Newton–CG
    sites already within their CG share, which take ``z = −G_k``); the next step does not check
    them (α = 0 in the state). ``state``: ``None`` (no step to check: the first Newton step) or the
    solver state this function returned, ``(u_n, ‖F(u_n)‖² per site, p, α)``. Shapes: u, f, u_full (B, D); returns
    the next state (B, D) and the solver state (tensors (B, S, M) and (B, S))."""
    us = system.sites(u)
    m = system.sites(f).square().sum(-1)  # (B, S)
    full = system.sites(u_full)
    one = torch.ones_like(m) if unchecked is None else (~unchecked).to(m.dtype)  # α of the new steps
    if state is None:
        return u_full, (us, m, full - us, one)
    _, m0, _, a0 = state
    floor = (16 * torch.finfo(u.dtype).eps) ** 2 * (us.square().sum(-1) + 1.0)
    tau = float(getattr(system, "tau", 1.0))
    fail = (m > (1 - 2 * ARMIJO_C * a0) * m0) & (m * (tau * tau) > floor) & (a0 > 2.0 ** -MAX_HALVINGS)
    return _go_back(system, fail, state, (us, m, full - us, one), u_full)


def _go_back(system, fail: torch.Tensor, old: tuple, new: tuple, u_full: torch.Tensor):
    """The step of both line searches once their test is made: the monotone sites that ``fail``
    (B, S) go back to ``u0 + (α/2) p0`` and keep their checked step's state with α halved; every
    other site takes ``u_full`` and the ``new`` state. States are ``(u0, merit, p0, α, …)``, the
    first and third (B, S, M), the others (B, S). Returns the next state (B, D) and the solver state."""
    if bool(fail.any()):
        monotone = getattr(system, "monotone_sites", None)
        if monotone is not None:
            fail = fail & monotone()
    if not bool(fail.any()):
        return u_full, new
    u0, p0, half = old[0], old[2], 0.5 * old[3]
    keep = fail.unsqueeze(-1)
    out = torch.where(keep, u0 + half.unsqueeze(-1).to(u0.dtype) * p0, system.sites(u_full))
    state = tuple(torch.where(keep if o.dim() == keep.dim() else fail, o, n) for o, n in zip(old, new, strict=True))
    state = state[:3] + (torch.where(fail, half, new[3]),) + state[4:]
    return out.reshape(u_full.shape), state


def site_energy(r: torch.Tensor, us: torch.Tensor, g: torch.Tensor, d: torch.Tensor):
    """The energy ``Φ_k`` of every site of a tanh layer, and its rounding scale, in float64.

    With ``r = tanh(u)`` and ``a_k = s·(L_k − I)`` the fixed-point equation ``G_k = −u_k + d_k +
    a_k r_k = 0`` is the stationarity condition of

        Φ_k(r) = Σ_i ½[(1 + r_i) ln(1 + r_i) + (1 − r_i) ln(1 − r_i)] − ½ rᵀa_k r − d_kᵀr,

    (``∇Φ_k = atanh(r) − a_k r − d_k = −G_k``), the graded-response network's Lyapunov function
    (Hopfield 1984). Its Hessian ``diag(1/(1 − r²)) − a_k`` is positive definite wherever
    ``I − a_k ≻ 0`` (inhibitory sign, ``L_k ≻ 0``: :meth:`HebbianLayer.monotone_sites`), so
    ``Φ_k`` is strictly convex on ``(−1, 1)^M`` with the fixed point its only stationary point.
    ``rᵀa_k r`` is read off the field already computed, ``a_k r = G_k + u_k − d_k``. Shapes: r
    (= tanh u), us, g (= τF), d (B, S, M) -> (B, S) each; the scale ``16 eps Σ_i |r_i|(|u_i| + |d_i| + |G_i|)``
    bounds the rounding of ``Φ_k`` from that of ``G`` in the working precision."""
    r64, u64, g64, d64 = r.double(), us.double(), g.double(), d.double()
    # the entropy in the working precision, as the compiled kernel: its rounding (≈ eps per unit, from
    # 1 ± r) is not covered by the scale where |u| is tiny, which rarely sends a good step back (3 of
    # 51,000 checks on a trained NpS 100 layer in float32); float64 logs would cost the kernel ~50 %
    # more per field evaluation
    ent = 0.5 * (torch.xlogy(1 + r, 1 + r) + torch.xlogy(1 - r, 1 - r)).double()  # 0·ln 0 = 0 where tanh saturates
    phi = ent.sum(-1) - 0.5 * (r64 * (g64 + u64 + d64)).sum(-1)
    scale = 16 * torch.finfo(us.dtype).eps * (r64.abs() * (u64.abs() + d64.abs() + g64.abs())).sum(-1)
    return phi, scale


def energy_line_search(system, u: torch.Tensor, f: torch.Tensor, u_full: torch.Tensor, drive: torch.Tensor, state):
    """The per-site backtracking line search of :func:`line_search` on the energy ``Φ_k``
    (:func:`site_energy`) instead of ``½‖F_k‖²``, checked one step late, from the first Newton step.

    A step ``p`` from ``u_n`` (the safeguarded Newton step, or ``z = −G_k``'s Picard step of a
    site within its CG share) is accepted on site ``k`` if at the next step

        Φ_k(u_n + α p) ≤ Φ_k(u_n) + c α ∇Φ_kᵀp + (rounding scale),    ∇_uΦ_k = −f'(u_k) G_k,

    else the site goes back to ``u_n + (α/2) p`` (to at most 2⁻¹⁰), as :func:`line_search`. Every
    CG iterate from 0 of ``K_k v = −hG_k`` gives a descent direction of ``Φ_k``
    (``∇Φ_kᵀp = −G_kᵀ h K_k⁻¹ h G_k`` restricted to the Krylov space, < 0), as does the Picard
    step, so no step needs to be left unchecked; a step with ``∇Φ_kᵀp ≥ 0`` (the box projection
    turned it: not seen in 583,000 checks on a trained NpS 100 layer) is accepted. Unlike
    ``½‖F_k‖²``, whose full Newton steps on trained layers raise it before the root (the cycles of
    :func:`line_search`), ``Φ_k`` is convex in ``r`` on monotone sites, so the damped iteration
    cannot cycle — down to ``Φ_k``'s rounding level (the scale of :func:`site_energy`; in float32
    it exceeds ``c·|∇Φ_kᵀp|`` in most checks near the fixed point, where the test then only
    bounds the rise by the scale). From the Picard start it settles a trained NpS 100 layer in
    9.3 Newton steps against the residual search's 14.4; from rest the two need about the same
    there (6.5 and 6.4), and on the near-singular sites of the tests 4–29 against 4–20
    (``benchmarks/newton_cg_work.py``, ``tests/test_newton_line_search.py``). Only sites with
    ``I − s·A_k ≻ 0`` go back (elsewhere ``Φ_k`` need not be convex). ``state``: ``None`` or
    ``(u_n, Φ_k(u_n), p, α, ∇Φ_kᵀp)``; shapes as :func:`line_search`; ``f`` is ``F(u)`` and
    ``drive`` the running samples' ``W x``."""
    tau = float(getattr(system, "tau", 1.0))
    us = system.sites(u)
    g = system.sites(f) if tau == 1.0 else system.sites(f) * tau
    r = torch.tanh(us)
    phi, scale = site_energy(r, us, g, system.sites(drive))
    full = system.sites(u_full)
    p_new = full - us
    slope_new = -((1 - r.double().square()) * g.double() * p_new.double()).sum(-1)
    one = torch.ones_like(phi)
    if state is None:
        return u_full, (us, phi, p_new, one, slope_new)
    _, phi0, _, a0, s0 = state
    fail = (phi > phi0 + ARMIJO_C * a0 * s0 + scale) & (s0 < 0) & (a0 > 2.0 ** -MAX_HALVINGS)
    return _go_back(system, fail, state, (us, phi, p_new, one, slope_new), u_full)


def _parse_bool(value: bool | str | int, name: str) -> bool:
    """A boolean option, also from a spec string (e.g. ``"newton,picard_start=false"``)."""
    if isinstance(value, str):
        if value.lower() not in ("true", "false"):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value.lower() == "true"
    return bool(value)


def newton_step(system: BlockJacobian, u: torch.Tensor, drive: torch.Tensor, tau: float = 1.0):
    """``(u − J⁻¹G, F(u))`` with ``G = τF`` and ``J = ∂G/∂u`` per block, the safeguard applied.

    Shapes: u, drive (B, D) -> (B, D), (B, D). Batches whose Jacobians exceed a memory budget
    are done in chunks."""
    b = u.shape[0]
    per_sample = system.state_size * system.block_size  # Jacobian entries per sample
    if b > 1 and b * per_sample > _JACOBIAN_BUDGET:
        chunk = max(1, _JACOBIAN_BUDGET // per_sample)
        parts = [newton_step(system, u[i : i + chunk], drive[i : i + chunk], tau) for i in range(0, b, chunk)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    g, jac = system.jacobian_blocks(u, drive)  # (B, S, M), (B, S, M, M)
    z = torch.linalg.solve_ex(jac, g)[0]
    u_next = system.newton_safeguard(u.reshape(g.shape) - z, drive)
    f = g if tau == 1.0 else g / tau
    return u_next.reshape(b, -1), f.reshape(b, -1)
