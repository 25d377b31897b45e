"""Per-site Newton–CG: Newton's method whose block systems are solved by conjugate gradients.

For a site-separable :class:`~dynsim.systems.HebbianLayer` the Newton system of site ``k`` is
``J_k z = G_k`` with ``G = τF(u) = −u + d + a f(u)``, ``a_k = s·(L_k − I)`` (symmetric) and

    J_k = −I + a_k D_k,        D_k = diag f'(u_k) ≥ 0.

:class:`~dynsim.solvers.SiteNewton` forms every ``J_k`` (B·S·M² numbers) and factorises it, an
O(M³) LU per site per step. Here nothing of that size is built. With ``h = D^{1/2}`` and
``v = h z`` the system becomes symmetric:

    K_k v = −h G_k,   K_k = I − h a_k h,   z = −G_k + a_k h v,

and for the authors' inhibitory sign (``s = −1``, ``a = I − L``) ``K = (I − D) + h L h`` is
positive definite whenever ``L`` is (``L`` starts at ``I`` and the Hebbian update keeps it a
positive combination of ``I`` and ``r rᵀ``; ``0 ≤ f' ≤ 1`` for tanh). No ``D⁻¹`` appears, so
saturated units (``f' → 0``) need no guard: there ``h = 0`` and ``z = −G``, the Picard step.
``K`` is solved per site by conjugate gradients (Hestenes & Stiefel 1952), one ``a_k``-times-
vector product per iteration for all samples and sites at once (a batched matrix product,
``S`` products of (B, M) by (M, M)), to a relative residual ``η_b = min(forcing, ‖G_b‖/‖u_b‖)``
(at least what the stop threshold needs, :func:`newton_cg_step`) per sample: an inexact Newton
method whose forcing term shrinks with the residual, so it keeps Newton's fast local convergence
(Eisenstat & Walker 1996; Dembo, Eisenstat & Steihaug 1982).

Each site stops on its equal share of the sample's CG budget (:func:`site_cg`). Where ``K_k``
is not positive definite (``s = +1`` with a large ``L``, an indefinite ``L`` given by hand) CG
meets ``pᵀKp ≤ 0`` or does not reach its share in ``max_cg`` iterations; that site of that sample
takes the exact Newton step ``J_k⁻¹G_k`` instead (LU, as ``SiteNewton``), and a non-symmetric
``L`` makes every sample take :func:`~dynsim.solvers.newton.newton_step`, so the solver is
correct for every layer and fast where the theory applies. On CPU the compiled backend
:mod:`dynsim.compiled_cg` runs the same iteration site by site in cache.

The first step is the same Picard start as ``SiteNewton`` (``u_1 = d + s·A f(u_0)``; optional, and
off in the DSSM's ``auto``), the safeguard the same tanh box. Each site's step is damped by a
backtracking line search checked one step late: for tanh layers with symmetric blocks on the
network's energy ``Φ_k`` (:func:`~dynsim.solvers.newton.energy_line_search`: convex in the rates
where ``L_k ≻ 0``, so the damped iteration cannot cycle), else (``merit="residual"``) on
``½‖F_k‖²`` from step ``SEARCH_AFTER`` as ``SiteNewton`` (:func:`~dynsim.solvers.newton.line_search`).
CG's tolerance never asks for more than the settling loop's stop threshold needs
(:func:`newton_cg_step`). A sample stops on the same residual test as every solver.
"""

from __future__ import annotations

import torch

from dynsim.errors import ConfigError
from dynsim.solvers.base import Solver, StepResult
from dynsim.solvers.newton import SEARCH_AFTER, _parse_bool, energy_line_search, line_search, newton_step


class SiteNewtonCG(Solver):
    """Newton's method per site with conjugate-gradient inner solves (see module docstring).

    Parameters
    ----------
    picard_start : take one Picard step ``u_1 = d + s·A f(u_0)`` first (tanh layers), as SiteNewton.
        Off, the first Newton step from rest (``f'(0) = 1``) solves the linearised network; on
        layers trained by the Hebbian rule (``L ≻ 0``: the energy is convex and the damped iteration
        converges from any start) that settles in fewer steps and seconds, so the DSSM's ``auto``
        runs ``newton-cg,picard_start=false`` (``benchmarks/nps100.py``, issue 15). With an
        indefinite ``L`` (by hand) Newton from rest can wander; the Picard start is the safe default.
    max_cg : CG iterations per Newton step (0: the block size M, where CG is exact in exact arithmetic).
    forcing : the largest relative CG residual accepted (0 < forcing < 1); near the fixed point the
        tolerance is the relative field residual itself, but never below what the last step
        needs (:func:`newton_cg_step`'s ``target``).
    merit : ``"energy"`` (default for tanh layers): every Newton step is checked by
        :func:`~dynsim.solvers.newton.energy_line_search` on the network's energy ``Φ_k``;
        ``"residual"``: :func:`~dynsim.solvers.newton.line_search` on ``½‖F_k‖²`` from step
        ``SEARCH_AFTER`` on, as :class:`~dynsim.solvers.SiteNewton` (and every non-tanh layer).
    """

    name = "newton-cg"

    def __init__(self, picard_start: bool | str = True, max_cg: int | str = 0, forcing: float | str = 0.1,
                 merit: str = "energy"):
        self.picard_start = _parse_bool(picard_start, "picard_start")
        if merit not in ("energy", "residual"):
            raise ConfigError(f"newton-cg: merit must be 'energy' or 'residual', got {merit!r}")
        self.merit = merit
        try:
            self.max_cg = int(max_cg)
            self.forcing = float(forcing)
        except (TypeError, ValueError):
            raise ConfigError(f"newton-cg: max_cg must be an integer and forcing a number, got {max_cg!r}, "
                              f"{forcing!r}") from None
        if self.max_cg < 0:
            raise ConfigError(f"newton-cg: max_cg must be >= 0 (0: the block size), got {self.max_cg}")
        if not 0 < self.forcing < 1:
            raise ConfigError(f"newton-cg: forcing must be in (0, 1), got {self.forcing}")

    def __repr__(self) -> str:
        return (f"SiteNewtonCG(picard_start={self.picard_start}, max_cg={self.max_cg}, forcing={self.forcing}, "
                f"merit={self.merit!r})")

    def step(self, field, u, state, n):
        system = getattr(field, "system", None)
        if not callable(getattr(system, "jacobian_factors", None)):
            raise ConfigError(
                "the newton-cg solver needs a system with factored Jacobian blocks (jacobian_factors, e.g. a "
                "HebbianLayer with lateral distance 0), run through dynsim.settle; use --solver euler otherwise"
            )
        tau = float(getattr(system, "tau", 1.0))
        if n == 0 and self.picard_start and getattr(system, "activation", None) == "tanh":
            f = field(u)
            return StepResult(u + tau * f, f, state, 1)
        energy = (self.merit == "energy" and getattr(system, "activation", None) == "tanh"
                  and getattr(system, "symmetric_blocks", False))
        late = not energy and n >= SEARCH_AFTER
        u_next, f, *within = newton_cg_step(system, u, field.drive, tau, self.max_cg, self.forcing, with_sites=late,
                                            target=getattr(field, "target", None))
        if energy:
            u_next, state = energy_line_search(system, u, f, u_next, field.drive, state)
        elif late:
            u_next, state = line_search(system, u, f, u_next, state, unchecked=within[0])  # as SiteNewton's
        return StepResult(u_next, f, state, 1)


def site_cg(a: torch.Tensor, h: torch.Tensor, b: torch.Tensor, tol: torch.Tensor, max_iter: int):
    """Solve ``(I − h a h) v = b`` per site by conjugate gradients, all samples at once.

    Shapes (site first, then sample): a (S, M, M) symmetric, h and b (S, B, M), tol (B,) the
    relative residual ``‖b − Kv‖/‖b‖`` (over all sites of a sample) to reach. Each site stops on
    its own equal share of that budget, ``‖b_k − K_k v_k‖² ≤ tol² ‖b‖² / S`` (so the sample meets
    ``tol``, and a site whose right-hand side is already within its share costs nothing; the
    compiled backend, :mod:`dynsim.compiled_cg`, solves site by site with the same test). ``a`` is
    applied as ``x a`` on rows (``= (a x)ᵀ`` for symmetric ``a``), the layout in which one batched
    product reads ``a`` once, also for B = 1 (benchmarks/README.md, issue 15). Returns v (S, B, M),
    the CG iterations each site of each sample ran (S, B) and an (S, B) bool: the site of the
    sample met ``pᵀKp ≤ 0`` (K not positive definite) or did not reach its share within
    ``max_iter`` iterations."""
    v = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = (r * r).sum(-1)  # (S, B)
    target = tol.square() * rr.sum(0) / b.shape[0]  # (B,): each site's share
    failed = torch.zeros_like(rr, dtype=torch.bool)
    iters = torch.zeros_like(rr, dtype=torch.long)
    for _ in range(max_iter):
        active = (rr > target) & ~failed  # (S, B)
        if not bool(active.any()):
            break
        iters += active
        q = p - h * torch.bmm(h * p, a)
        pq = (p * q).sum(-1)
        failed |= active & ~(pq > 0)
        go = active & ~failed
        alpha = torch.where(go, rr / pq.clamp_min(torch.finfo(pq.dtype).tiny), 0.0)
        v.addcmul_(alpha.unsqueeze(-1), p)
        r.addcmul_(alpha.unsqueeze(-1), q, value=-1.0)
        rr_new = (r * r).sum(-1)
        beta = torch.where(go, rr_new / rr.clamp_min(torch.finfo(rr.dtype).tiny), 0.0)
        p = torch.where(go.unsqueeze(-1), r + beta.unsqueeze(-1) * p, p)
        rr = torch.where(go, rr_new, rr)
    failed |= rr > target
    return v, iters, failed


def newton_cg_step(system, u: torch.Tensor, drive: torch.Tensor, tau: float = 1.0, max_cg: int = 0,
                   forcing: float = 0.1, with_sites: bool = False, target: float | None = None):
    """``(u − J⁻¹G, F(u))`` with the Newton system solved per site by CG (module docstring).

    CG stops at the relative residual ``η = min(forcing, max(ρ, 50 eps, ½·target/ρ))`` per sample,
    ``ρ = ‖F(u)‖/‖u‖`` (``τ = 1``) and ``target`` the relative residual the settling loop stops at
    (``None``: no such term): ``η ≤ ρ`` keeps Newton's fast local convergence (Eisenstat & Walker
    1996), and ``η ≥ ½·target/ρ`` keeps the last steps from solving more accurately than reaching
    ``target`` needs (Kelley 2003, §3.2.3: the safeguard against oversolving).

    Shapes: u, drive (B, D) -> (B, D), (B, D). ``with_sites``: also the (B, S) bool of the sites
    whose right-hand side was already within their CG share (no CG iteration: ``z = −G_k``, a
    Picard step, not a Newton step; :func:`~dynsim.solvers.newton.line_search` leaves it
    unchecked), or None."""
    g, a, fp, symmetric = system.jacobian_factors(u, drive)  # (B, S, M), (S, M, M), (B, S, M), bool
    bsz, _, m = g.shape
    if not symmetric:  # CG needs symmetric blocks: every sample takes the exact step
        out = newton_step(system, u, drive, tau)
        return (*out, None) if with_sites else out
    gs = g.transpose(0, 1)  # (S, B, M)
    h = fp.clamp_min(0).sqrt().transpose(0, 1)
    rel = torch.linalg.vector_norm(g.reshape(bsz, -1), dim=1) / torch.linalg.vector_norm(u, dim=1).clamp_min(1e-12)
    floor = 50 * torch.finfo(g.dtype).eps
    tol = rel.clamp(min=floor)
    if target is not None:
        tol = torch.maximum(tol, 0.5 * target * tau / rel.clamp_min(torch.finfo(rel.dtype).tiny))  # ρ = rel/τ
    tol = tol.clamp(max=forcing)
    rhs = -h * gs
    v, _, failed = site_cg(a, h, rhs, tol, max_cg or m)
    z = (torch.bmm(h * v, a) - gs).transpose(0, 1)  # (B, S, M); a symmetric: (h v) a = (a h v)ᵀ
    if bool(failed.any()):  # K_k not positive definite there, or CG short of its share: the exact step
        site, sample = failed.nonzero(as_tuple=True)
        jac = a[site] * fp[sample, site].unsqueeze(-2)  # J_k = −I + a_k diag f'(u_k)
        jac.diagonal(dim1=-2, dim2=-1).sub_(1.0)
        z = z.clone()
        z[sample, site] = torch.linalg.solve_ex(jac, g[sample, site])[0]
    u_next = system.newton_safeguard(u.reshape(g.shape) - z, drive)
    f = g if tau == 1.0 else g / tau
    if with_sites:  # site_cg's share test before its first iteration
        rr = rhs.square().sum(-1)  # (S, B)
        within = (rr <= tol.square() * rr.sum(0) / rhs.shape[0]) & ~failed
        return u_next.reshape(bsz, -1), f.reshape(bsz, -1), within.T
    return u_next.reshape(bsz, -1), f.reshape(bsz, -1)
