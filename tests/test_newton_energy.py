"""Newton–CG's energy line search and its CG tolerance (issue 15): the site energy Φ_k is the
potential whose gradient is −G_k; damped by it, Newton–CG settles where plain Newton cycles, in
no more steps than the residual's line search (on the sites where plain Newton cycles:
tests/test_newton_line_search.py); CG stops no earlier than the oversolving guard allows."""

from __future__ import annotations

import pytest
import torch

from dynsim import HebbianLayer, MaxSteps, ResidualBelow, Status, compiled, settle, stop_rule
from dynsim.errors import ConfigError
from dynsim.solvers import SiteNewtonCG, make_solver
from dynsim.solvers import newton_cg as newton_cg_module
from dynsim.solvers.newton import site_energy
from dynsim.solvers.newton_cg import newton_cg_step

torch.set_num_threads(1)


def _layer(nps: int = 6, seed: int = 0, dtype=torch.float64) -> HebbianLayer:
    """An 8×8 layer whose L = 0.02·I + (2/k) Σ r rᵀ: positive definite, near-singular as trained L are."""
    layer = HebbianLayer((1, 8, 8), nps=nps, stride=2, radius=3.0, seed=seed).to(dtype)
    gen = torch.Generator().manual_seed(seed + 3)
    r = torch.tanh(torch.randn(layer.lateral.weight.shape[0], nps, 2, generator=gen, dtype=dtype))
    gram = r @ r.mT
    with torch.no_grad():
        layer.lateral.weight.copy_(0.02 * torch.eye(nps, dtype=dtype) + 2.0 * (gram + gram.mT) / 2)
        layer.ff.weight.mul_(4.0)  # strong drive: a hard start for Newton
    return layer


def _x(n: int, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_site_energy_gradient_in_r_is_minus_the_field():
    """dΦ_k/dr_i = −G_k,i (central differences in r, float64), for every site."""
    layer = _layer()
    x = _x(1)
    d = layer.sites(layer.drive(x))
    u = 0.7 * torch.randn(d.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def phi_at(uu):
        g = layer.sites(layer.field(uu.reshape(1, -1), layer.drive(x)))  # τ = 1: G = F
        return site_energy(torch.tanh(uu), uu, g, d)[0]

    g0 = layer.sites(layer.field(u.reshape(1, -1), layer.drive(x)))
    r = torch.tanh(u)
    eps = 1e-6
    for i in range(layer.nps):
        e = torch.zeros_like(r)
        e[..., i] = eps
        num = (phi_at(torch.atanh(r + e)) - phi_at(torch.atanh(r - e))) / (2 * eps)
        torch.testing.assert_close(num, -g0[..., i], rtol=1e-6, atol=1e-7)


def test_site_energy_value():
    """Φ_k = Σ ½[(1+r)ln(1+r) + (1−r)ln(1−r)] − ½ rᵀa r − dᵀr, by its definition (a = s(L − I))."""
    layer = _layer(nps=4)
    x = _x(2)
    drive = layer.drive(x)
    u = torch.randn(drive.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    g = layer.sites(layer.field(u, drive))
    us, d, r = layer.sites(u), layer.sites(drive), layer.sites(torch.tanh(u))
    a = layer.lateral_sign * (layer.lateral.weight - torch.eye(4, dtype=torch.float64))
    ar = torch.einsum("sij,bsj->bsi", a, r)
    want = (0.5 * ((1 + r) * torch.log(1 + r) + (1 - r) * torch.log(1 - r))).sum(-1) - 0.5 * (r * ar).sum(-1) \
        - (d * r).sum(-1)
    phi, scale = site_energy(r, us, g, d)
    torch.testing.assert_close(phi, want, rtol=1e-12, atol=1e-12)
    assert bool((scale > 0).all()) and float(scale.max()) < 1e-10  # 16 eps(float64) × O(10)


@pytest.mark.parametrize("fast", [True, False])
def test_energy_search_settles_in_no_more_steps_than_the_residual_search(fast):
    """On near-singular trained-like sites both merits settle every input to the same fixed point;
    the energy merit takes at most as many steps in total (torch step and compiled kernel)."""
    layer = _layer(nps=8, dtype=torch.float64)
    x = _x(12)
    stop = stop_rule(1e-8, 300)
    out = {}
    for merit in ("energy", "residual"):
        if fast:
            out[merit] = settle(layer, x, solver=SiteNewtonCG(merit=merit), stop=stop)
        else:
            with compiled.disabled():
                out[merit] = settle(layer, x, solver=SiteNewtonCG(merit=merit), stop=stop)
    for res in out.values():
        assert res.status.tolist() == [Status.SETTLED] * 12
    rel = torch.linalg.vector_norm(out["energy"].u - out["residual"].u, dim=1) / torch.linalg.vector_norm(
        out["residual"].u, dim=1)
    assert float(rel.max()) < 1e-5
    assert int(out["energy"].steps.sum()) <= int(out["residual"].steps.sum())


def test_cg_tolerance_has_the_oversolving_guard(monkeypatch):
    """η = min(forcing, max(ρ, 50 eps, ½·target·τ/ρ)), ρ = ‖τF‖/‖u‖ per sample."""
    layer = _layer(nps=4)
    x = _x(3)
    drive = layer.drive(x)
    u = torch.randn(drive.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    seen = {}
    real = newton_cg_module.site_cg

    def spy(a, h, b, tol, max_iter):
        seen["tol"] = tol.clone()
        return real(a, h, b, tol, max_iter)

    monkeypatch.setattr(newton_cg_module, "site_cg", spy)
    g = layer.field(u, drive)
    rho = torch.linalg.vector_norm(g, dim=1) / torch.linalg.vector_norm(u, dim=1)
    for target in (None, 1e-4, 10 * float(rho.max()) ** 2):
        newton_cg_step(layer, u, drive, 1.0, 0, 0.1, target=target)
        want = rho.clamp(min=50 * torch.finfo(torch.float64).eps)
        if target is not None:
            want = torch.maximum(want, 0.5 * target / rho)
        torch.testing.assert_close(seen["tol"], want.clamp(max=0.1))


def test_merit_option_is_checked():
    with pytest.raises(ConfigError, match="merit must be 'energy' or 'residual', got 'phi'"):
        make_solver("newton-cg", merit="phi")
    assert "merit='residual'" in repr(SiteNewtonCG(merit="residual"))


@pytest.mark.parametrize("tau,atol,picard",
                         [(1.0, 0.0, False), (2.5, 0.0, True), (1.0, 1e-3, True), (2.5, 1e-3, False)])
def test_compiled_kernel_equals_the_torch_step_with_many_halvings(tau, atol, picard):
    """On sites where the energy search backs up often, the kernel takes the torch step's steps and
    reaches its states (float64, 1e-11), for τ ≠ 1, an absolute tolerance and both starts."""
    layer = _layer(nps=8)
    layer.tau = tau
    x = _x(12)
    stop = ResidualBelow(1e-8, atol=atol) | MaxSteps(300)
    solver = SiteNewtonCG(picard_start=picard)
    fast = settle(layer, x, solver=solver, stop=stop)
    with compiled.disabled():
        ref = settle(layer, x, solver=solver, stop=stop)
    assert fast.steps.tolist() == ref.steps.tolist()
    assert fast.status.tolist() == ref.status.tolist() == [Status.SETTLED] * 12
    torch.testing.assert_close(fast.u, ref.u, rtol=1e-11, atol=1e-11)


def test_energy_line_search_state():
    """A site whose energy rose goes back to u0 + (α/2)p0 with α halved and its Φ0, p0, slope kept;
    a site that decreased takes the new full step with α = 1; the first call records the step."""
    from dynsim.solvers.newton import energy_line_search

    layer = _layer(nps=4)
    x = _x(1)
    drive = layer.drive(x)
    u = 0.3 * torch.randn(drive.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    f = layer.field(u, drive)
    full = u + f  # a step along +F: a descent direction of Φ on every site
    out, state = energy_line_search(layer, u, f, full, drive, None)
    torch.testing.assert_close(out, full)
    u0, phi0, p0, alpha, slope = state
    assert bool((slope < 0).all()) and alpha.tolist() == [[1.0] * layer.n_sites]
    # pretend every site's energy at u0 was far lower: every monotone site must go back to half the step
    lowered = (u0, phi0 - 1e6, p0, alpha, slope)
    f_full = layer.field(full, drive)
    out2, state2 = energy_line_search(layer, full, f_full, full + f_full, drive, lowered)
    back = layer.monotone_sites()
    assert bool(back.any())
    want = torch.where(back[None, :, None], u0 + 0.5 * p0, layer.sites(full + f_full))
    torch.testing.assert_close(layer.sites(out2), want)
    assert state2[3][0, back].tolist() == [0.5] * int(back.sum())
    torch.testing.assert_close(state2[1][0, back], phi0[0, back] - 1e6)
