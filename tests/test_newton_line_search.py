"""The per-site Newton line search (issue 15): plain Newton cycles on a near-singular site; the damped
Newton of every backend reaches the fixed point the dynamics (Euler) reaches.

The cases are single sites (NpS 2 and 4) with ``L`` positive definite and near-singular (a trained
site is like this: L decays towards 0 except along the rates it has seen), found by a search over
random sites ``L = εI + c V Vᵀ`` for ones where plain Newton from the Picard start does not converge.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from dynsim import HebbianLayer, Status, backend, compiled, settle, stop_rule
from dynsim.solvers import make_solver

torch.set_num_threads(1)
_NEWTON = sys.modules["dynsim.solvers.newton"]  # the module (dynsim.solvers re-exports names over it)


_SITES = {  # (L, drive): NpS 2, L's eigenvalues 0.0048 and 20.4; NpS 4, 0.034, 0.035, 1.94 and 13.8
    "nps2": ([[17.45, 7.135], [7.135, 2.923]], [0.706, 0.055]),
    "nps4": ([[1.871, -0.329, 0.766, -0.249], [-0.329, 0.202, 1.063, 0.01], [0.766, 1.063, 13.653, -0.486],
              [-0.249, 0.01, -0.486, 0.079]], [0.546, -1.068, 1.414, -0.206]),
}


def _near_singular_site(case: str = "nps2") -> tuple[HebbianLayer, torch.Tensor]:
    """A 2×2-pixel layer with one site (all four pixels in its field) and the given L and drive."""
    lat, drive = (torch.tensor(v, dtype=torch.float64) for v in _SITES[case])
    layer = HebbianLayer((1, 2, 2), nps=len(drive), stride=2, radius=3.0).double()
    with torch.no_grad():
        layer.lateral.weight.copy_(lat[None])
        layer.ff.weight[0] = drive[:, None].repeat(1, 4)
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    return layer, x


def _euler_fixed_point(layer, x) -> torch.Tensor:
    """The dynamics' own fixed point: the seed's Euler schedule to ‖F‖/‖u‖ < 1e-9."""
    with compiled.disabled():
        res = settle(layer, x, solver=make_solver("euler"), stop=stop_rule(1e-9, 5000))
    assert res.status.tolist() == [Status.SETTLED]
    return res.u


def test_the_site_is_monotone_and_near_singular():
    layer, x = _near_singular_site()
    ev = torch.linalg.eigvalsh(layer.lateral.weight[0])
    assert 0 < float(ev[0]) < 0.005 and float(ev[1]) > 20
    assert layer.monotone_sites().tolist() == [True]  # I − s·(L − I) = L ≻ 0: one fixed point
    torch.testing.assert_close(layer.drive(x), torch.tensor([[0.706, 0.055]], dtype=torch.float64))


@pytest.mark.parametrize("case", sorted(_SITES))
def test_plain_newton_does_not_converge_here(monkeypatch, case):
    """Without the line search (the old step) Newton cycles far from the fixed point, with the box
    projection active: the cases are real ones, and the tests below fail on the old code (Newton–CG
    too on the NpS 4 site)."""
    layer, x = _near_singular_site(case)
    monkeypatch.setattr(_NEWTON, "line_search", lambda system, u, f, u_full, state: (u_full, None))
    with compiled.disabled():
        res = settle(layer, x, solver=make_solver("newton"), stop=stop_rule(1e-10, 200))
    assert res.status.tolist() == [Status.MAX_STEPS]
    assert float((res.u - _euler_fixed_point(layer, x)).abs().max()) > 0.1


@pytest.mark.parametrize("case", sorted(_SITES))
@pytest.mark.parametrize("fast", [False, True], ids=["torch", "compiled"])
@pytest.mark.parametrize("name", ["newton", "newton-cg"])
def test_damped_newton_reaches_eulers_fixed_point(name, fast, case):
    layer, x = _near_singular_site(case)
    solver, stop = make_solver(name), stop_rule(1e-10, 200)
    kernel = backend.compiled_settle(layer, x, None, solver, stop.limits(), 1e6)
    if fast:
        if kernel is None:
            pytest.skip("no compiled backend (numba missing)")
        res = settle(layer, x, solver=solver, stop=stop)
    else:
        with compiled.disabled():
            res = settle(layer, x, solver=solver, stop=stop)
    assert res.status.tolist() == [Status.SETTLED]
    assert int(res.steps[0]) <= 30  # Euler: hundreds of steps to 1e-9
    # Euler stops at ‖F‖/‖u‖ < 1e-9; J's eigenvalue nearest 0 (≈ −0.005 for NpS 2) scales that up in u
    torch.testing.assert_close(res.u, _euler_fixed_point(layer, x), rtol=0, atol=1e-6)


def test_fused_online_loop_converges_here():
    """The fused online loop (dynsim.compiled._train_online, learning off) settles the same way."""
    layer, x = _near_singular_site()
    if not compiled.available():
        pytest.skip("no compiled backend (numba missing)")
    w, ff_index, n_pixels, channels, lat, _ = compiled._arrays(layer)
    loop = compiled.loop_arguments(layer, method="newton", tol=1e-10, cap=200, cap_first=False,
                                   max_state_norm=1e6)
    u, r = np.zeros((1, 2)), np.zeros((1, 2))
    steps, status = np.empty(1, dtype=np.int64), np.empty(1, dtype=np.int8)
    residual, n_evals = np.empty(1), np.empty(1, dtype=np.int64)
    compiled._train_online(x.numpy(), np.zeros(1, dtype=np.int64), w, ff_index, n_pixels, channels, lat, *loop,
                           0.0, 0.0, False, True, False, u, r, steps, status, residual, n_evals)
    assert status.tolist() == [int(Status.SETTLED)] and steps[0] <= 30
    np.testing.assert_allclose(u, _euler_fixed_point(layer, x).numpy(), rtol=0, atol=1e-6)


def test_an_easy_step_is_plain_newtons():
    """Where the full step decreases the merit enough the line search changes nothing (closed form:
    the returned state is the full step and the carried state records it with α = 1)."""
    from dynsim.solvers.newton import line_search

    layer, x = _near_singular_site()
    u = torch.tensor([[0.36, -0.97]], dtype=torch.float64)  # next to the fixed point
    f = layer.field(u, layer.drive(x))
    u_full = u + torch.tensor([[0.1, -0.3]], dtype=torch.float64)
    f_full = layer.field(u_full, layer.drive(x))
    out, state = line_search(layer, u, f, u_full, None)
    assert torch.equal(out, u_full) and float(state[3]) == 1.0
    # a second step from u_full is checked against ‖F(u)‖²: it failed, so the site goes back halfway
    assert float(f_full.square().sum()) > float(f.square().sum())
    back, state2 = line_search(layer, u_full, f_full, u_full + 1.0, state)
    torch.testing.assert_close(back, u + 0.5 * (u_full - u))
    assert float(state2[3]) == 0.5
    # an indefinite site keeps the full step (several fixed points: no guarantee)
    with torch.no_grad():
        layer.lateral.weight[0] = torch.tensor([[-0.5, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert layer.monotone_sites().tolist() == [False]
    kept, _ = line_search(layer, u_full, f_full, u_full + 1.0, state)
    torch.testing.assert_close(kept, u_full + 1.0)
