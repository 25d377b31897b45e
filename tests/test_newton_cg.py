"""Newton–CG (issue 15): the conjugate-gradient block solve, its fallback, and parity with SiteNewton.

The solver also runs through the whole conformance table of tests/test_solvers.py."""

from __future__ import annotations

import pytest
import torch

from dynsim import HebbianLayer, MaxSteps, ResidualBelow, Status, compiled, settle
from dynsim.configs.dssm import DSSMConfig
from dynsim.errors import ConfigError
from dynsim.plasticity import hebbian_update
from dynsim.solvers import SiteNewton, SiteNewtonCG, make_solver
from dynsim.solvers.newton_cg import newton_cg_step, site_cg

torch.set_num_threads(1)


def _trained_like_layer(nps: int, seed: int = 0, sign: int = -1) -> HebbianLayer:
    """An 8×8 layer in float64 whose L = c·I + (1/k) Σ r rᵀ (positive definite, as the Hebbian rule makes it)."""
    layer = HebbianLayer((1, 8, 8), nps=nps, stride=2, radius=3.0, lateral_sign=sign, seed=seed).double()
    gen = torch.Generator().manual_seed(seed + 7)
    w = layer.lateral.weight
    r = torch.tanh(torch.randn(w.shape[0], nps, 3 * nps, generator=gen, dtype=w.dtype))
    with torch.no_grad():
        w.copy_(0.3 * torch.eye(nps, dtype=w.dtype) + r @ r.mT / (3 * nps) * 2.0)
    return layer


def test_site_cg_solves_each_block_system():
    """(I − h a h) v = b per site and sample, against torch.linalg.solve on the dense blocks."""
    gen = torch.Generator().manual_seed(0)
    s, m, b = 5, 6, 3
    q = torch.randn(s, m, m, generator=gen, dtype=torch.float64)
    a = torch.eye(m, dtype=torch.float64) - (q @ q.mT / m + 0.2 * torch.eye(m, dtype=torch.float64))  # I − L
    h = torch.rand(s, b, m, generator=gen, dtype=torch.float64)
    rhs = torch.randn(s, b, m, generator=gen, dtype=torch.float64)
    v, iters, failed = site_cg(a, h, rhs, torch.full((b,), 1e-12, dtype=torch.float64), 3 * m)
    for j in range(b):
        k = torch.eye(m, dtype=torch.float64) - h[:, j, :, None] * a * h[:, j, None, :]
        expected = torch.linalg.solve(k, rhs[:, j, :])
        torch.testing.assert_close(v[:, j, :], expected, rtol=1e-9, atol=1e-10)
    assert not bool(failed.any())
    assert iters.shape == (s, b) and 1 <= int(iters.min()) and int(iters.max()) <= 3 * m


def test_site_cg_flags_an_indefinite_block():
    """A block with a negative eigenvalue meets pᵀKp ≤ 0 (reported per site and sample)."""
    m = 4
    a = torch.diag(torch.tensor([0.0, 0.0, 0.0, 3.0], dtype=torch.float64))[None]  # K = I − a: eigenvalue −2
    h = torch.ones(1, 2, m, dtype=torch.float64)
    rhs = torch.zeros(1, 2, m, dtype=torch.float64)
    rhs[0, 1, 3] = 1.0  # sample 1 excites the negative direction, sample 0 only positive ones
    rhs[0, 0, 0] = 1.0
    _, _, failed = site_cg(a, h, rhs, torch.full((2,), 1e-12, dtype=torch.float64), m)
    assert failed.tolist() == [[False, True]]


@pytest.mark.parametrize("nps", [2, 4, 8])
def test_same_fixed_point_as_site_newton(nps):
    """Both settle to ‖F‖/‖u‖ < 1e-10 and their fixed points agree to 1e-9 (float64)."""
    layer = _trained_like_layer(nps)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    stop = ResidualBelow(1e-10) | MaxSteps(100)
    ref = settle(layer, x, solver=SiteNewton(), stop=stop)
    fast = settle(layer, x, solver=SiteNewtonCG(), stop=stop)
    assert fast.status.tolist() == [Status.SETTLED] * 6 and ref.status.tolist() == [Status.SETTLED] * 6
    rel = torch.linalg.vector_norm(fast.u - ref.u, dim=1) / torch.linalg.vector_norm(ref.u, dim=1)
    assert float(rel.max()) < 1e-9
    assert float(fast.residual.max()) < 1e-10


def test_newton_cg_step_equals_exact_newton_step():
    """One step with tight CG is the exact Newton step u − J⁻¹G (torch path, float64)."""
    layer = _trained_like_layer(5)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    drive = layer.drive(x)
    u = drive + 0.1
    from dynsim.solvers.newton import newton_step

    exact, f_exact = newton_step(layer, u, drive)
    cg, f_cg = newton_cg_step(layer, u, drive, forcing=1e-13)
    torch.testing.assert_close(cg, exact, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(f_cg, f_exact)


def test_same_weights_after_online_updates():
    """Five online updates (batch 1, η = 5e-3) settled by each solver give the same W and L (float64)."""
    weights = []
    for solver in (SiteNewton(), SiteNewtonCG()):
        layer = _trained_like_layer(6, seed=3)
        xs = torch.randn(5, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        with compiled.disabled():
            for i in range(5):
                res = settle(layer, xs[i : i + 1], solver=solver, stop=ResidualBelow(1e-10) | MaxSteps(100))
                hebbian_update(layer, xs[i : i + 1], res.r, 5e-3)
        weights.append((layer.ff.weight.clone(), layer.lateral.weight.clone()))
    torch.testing.assert_close(weights[0][0], weights[1][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(weights[0][1], weights[1][1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("sign,shift", [(-1, 1.2)])
def test_indefinite_or_positive_sign_falls_back_to_the_exact_step(sign, shift):
    """Where K is not positive definite (an indefinite L) the samples
    take SiteNewton's exact step: same fixed point as SiteNewton."""
    layer = _trained_like_layer(4, sign=sign)
    with torch.no_grad():
        layer.lateral.weight[0] -= shift * torch.eye(4, dtype=torch.float64)  # shift 1.2: an eigenvalue −0.72
    if shift:
        assert float(torch.linalg.eigvalsh(layer.lateral.weight[0]).min()) < -0.5
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    stop = ResidualBelow(1e-10) | MaxSteps(200)
    with compiled.disabled():  # the torch SiteNewton: the same arithmetic as the fallback step
        ref = settle(layer, x, solver=SiteNewton(), stop=stop)
    assert ref.status.tolist() == [Status.SETTLED] * 4
    fast = settle(layer, x, solver=SiteNewtonCG(), stop=stop)
    assert fast.status.tolist() == ref.status.tolist()
    ok = ref.status == Status.SETTLED
    torch.testing.assert_close(fast.u[ok], ref.u[ok], rtol=1e-8, atol=1e-9)


def test_non_symmetric_lateral_blocks_take_the_exact_step():
    layer = _trained_like_layer(3)
    with torch.no_grad():
        layer.lateral.weight[:, 0, 1] += 0.2  # L no longer symmetric
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    drive = layer.drive(x)
    from dynsim.solvers.newton import newton_step

    torch.testing.assert_close(newton_cg_step(layer, drive, drive)[0], newton_step(layer, drive, drive)[0])


def test_options_are_checked():
    assert make_solver("newton-cg", max_cg="7", forcing="0.01", picard_start="false").max_cg == 7
    with pytest.raises(ConfigError, match="forcing must be in"):
        make_solver("newton-cg", forcing=1.5)
    with pytest.raises(ConfigError, match="max_cg must be >= 0"):
        make_solver("newton-cg", max_cg=-1)
    with pytest.raises(ConfigError, match="picard_start must be true or false"):
        make_solver("newton-cg", picard_start="maybe")


def test_auto_picks_newton_cg_from_nps_32():
    assert DSSMConfig(nps=31).resolved_solver() == "newton"
    assert DSSMConfig(nps=32).resolved_solver() == "newton-cg,picard_start=false"
    assert DSSMConfig(nps=100).resolved_solver() == "newton-cg,picard_start=false"
    assert DSSMConfig(nps=100, lateral_sign=1).resolved_solver() == "newton"
    assert DSSMConfig(nps=100, solver="newton").resolved_solver() == "newton"
