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


# Site 119 of the NpS 16 layer of benchmarks/newton_hard.py (2,000 online Fashion-MNIST images) and
# the drive of training image 2, where plain Newton cycles (L rounded to 6 decimals; it still does)
_TRAINED_L = [
    [0.418055, -0.019818, 0.132657, -0.013665, -0.020019, -0.03595, -0.012932, 0.020277,
     0.134565, -0.016148, -0.007666, 0.341159, 0.112587, -0.003734, 0.011564, -0.013785],
    [-0.019818, 0.425606, 0.313841, 0.387325, 0.418569, 0.408978, 0.420577, -0.4132,
     0.313843, 0.388892, 0.386277, 0.157576, 0.327861, 0.424619, -0.382046, 0.420404],
    [0.132657, 0.313841, 0.598473, 0.354953, 0.314153, 0.306452, 0.321878, -0.315458,
     0.591541, 0.35419, 0.353442, 0.362014, 0.586051, 0.330679, -0.350248, 0.319422],
    [-0.013665, 0.387325, 0.354953, 0.454611, 0.387361, 0.380465, 0.39282, -0.385576,
     0.354577, 0.446168, 0.447247, 0.169597, 0.364184, 0.398876, -0.443824, 0.390646],
    [-0.020019, 0.418569, 0.314153, 0.387361, 0.425185, 0.409209, 0.420652, -0.413695,
     0.314164, 0.388791, 0.386332, 0.157571, 0.32826, 0.424546, -0.38235, 0.420407],
    [-0.03595, 0.408978, 0.306452, 0.380465, 0.409209, 0.428064, 0.414362, -0.414257,
     0.304972, 0.378395, 0.376622, 0.143876, 0.32018, 0.417163, -0.37833, 0.410713],
    [-0.012932, 0.420577, 0.321878, 0.39282, 0.420652, 0.414362, 0.431571, -0.419523,
     0.32137, 0.392553, 0.391572, 0.16941, 0.3341, 0.429055, -0.388909, 0.423474],
    [0.020277, -0.4132, -0.315458, -0.385576, -0.413695, -0.414257, -0.419523, 0.42927,
     -0.314086, -0.384069, -0.383985, -0.158818, -0.327901, -0.422407, 0.386557, -0.417408],
    [0.134565, 0.313843, 0.591541, 0.354577, 0.314164, 0.304972, 0.32137, -0.314086,
     0.598569, 0.35432, 0.35343, 0.363952, 0.585729, 0.330499, -0.349328, 0.319377],
    [-0.016148, 0.388892, 0.35419, 0.446168, 0.388791, 0.378395, 0.392553, -0.384069,
     0.35432, 0.453717, 0.446261, 0.161215, 0.365034, 0.398348, -0.441404, 0.391638],
    [-0.007666, 0.386277, 0.353442, 0.447247, 0.386332, 0.376622, 0.391572, -0.383985,
     0.35343, 0.446261, 0.454594, 0.173682, 0.362419, 0.397996, -0.443602, 0.390115],
    [0.341159, 0.157576, 0.362014, 0.169597, 0.157571, 0.143876, 0.16941, -0.158818,
     0.363952, 0.161215, 0.173682, 0.568383, 0.33825, 0.184158, -0.166415, 0.166019],
    [0.112587, 0.327861, 0.586051, 0.364184, 0.32826, 0.32018, 0.3341, -0.327901,
     0.585729, 0.365034, 0.362419, 0.33825, 0.602107, 0.341103, -0.359214, 0.332474],
    [-0.003734, 0.424619, 0.330679, 0.398876, 0.424546, 0.417163, 0.429055, -0.422407,
     0.330499, 0.398348, 0.397996, 0.184158, 0.341103, 0.441359, -0.394161, 0.427674],
    [0.011564, -0.382046, -0.350248, -0.443824, -0.38235, -0.37833, -0.388909, 0.386557,
     -0.349328, -0.441404, -0.443602, -0.166415, -0.359214, -0.394161, 0.45105, -0.386442],
    [-0.013785, 0.420404, 0.319422, 0.390646, 0.420407, 0.410713, 0.423474, -0.417408,
     0.319377, 0.391638, 0.390115, 0.166019, 0.332474, 0.427674, -0.386442, 0.429965],
]
_TRAINED_DRIVE = [1.007932, 2.094941, 2.522142, 2.286522, 2.094796, 2.045509, 2.143026, -2.093611,
                  2.524494, 2.267598, 2.291099, 2.120243, 2.513023, 2.200554, -2.265727, 2.127298]


def _trained_site(dtype) -> tuple[HebbianLayer, torch.Tensor]:
    """The trained NpS 16 site (one site, all four pixels in its field) and its input."""
    layer = HebbianLayer((1, 2, 2), nps=16, stride=2, radius=3.0).to(dtype)
    with torch.no_grad():
        layer.lateral.weight.copy_(torch.tensor(_TRAINED_L, dtype=dtype)[None])
        layer.ff.weight[0] = torch.tensor(_TRAINED_DRIVE, dtype=dtype)[:, None].repeat(1, 4)
    return layer, torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_trained_site_where_plain_newton_cycles(monkeypatch, dtype):
    """On the trained site (L's eigenvalues 0.0068 … 5.6) plain Newton hits the cap; newton and newton-cg,
    torch and compiled, settle in ≤ 25 steps to Euler's fixed point (within Euler's tolerance)."""
    layer, x = _trained_site(dtype)
    assert layer.monotone_sites().tolist() == [True]
    stop = stop_rule(1e-4, 3000)
    with compiled.disabled():
        euler = settle(layer, x, solver=make_solver("euler"),
                       stop=stop_rule(1e-7 if dtype == torch.float64 else 1e-5, 20000))
    assert euler.status.tolist() == [Status.SETTLED]
    for name in ("newton", "newton-cg"):
        for fast in (True, False):
            if fast:
                res = settle(layer, x, solver=make_solver(name), stop=stop)
            else:
                with compiled.disabled():
                    res = settle(layer, x, solver=make_solver(name), stop=stop)
            assert res.status.tolist() == [Status.SETTLED] and int(res.steps[0]) <= 25, (name, fast)
            dist = torch.linalg.vector_norm(res.u - euler.u) / torch.linalg.vector_norm(euler.u)
            assert float(dist) < 2e-2, (name, fast, float(dist))  # 1e-4 residual / |λ| ≈ 0.0068
    monkeypatch.setattr(_NEWTON, "line_search", lambda system, u, f, u_full, state, unchecked=None: (u_full, None))
    with compiled.disabled():
        plain = settle(layer, x, solver=make_solver("newton"), stop=stop_rule(1e-4, 300))
    assert plain.status.tolist() == [Status.MAX_STEPS]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_energy_search_settles_the_cycling_sites_faster(monkeypatch, dtype):
    """newton-cg without a line search cycles on the trained site (cap 300); with the energy merit
    (the default) it settles in 6 steps, torch and compiled alike, where the residual's late search
    needs 20; on the NpS 4 site 8 against 20."""
    layer, x = _trained_site(dtype)
    stop = stop_rule(1e-4, 3000)
    for merit, want in (("energy", 6), ("residual", 20)):
        for fast in (True, False):
            if fast:
                res = settle(layer, x, solver=make_solver("newton-cg", merit=merit), stop=stop)
            else:
                with compiled.disabled():
                    res = settle(layer, x, solver=make_solver("newton-cg", merit=merit), stop=stop)
            assert res.status.tolist() == [Status.SETTLED] and res.steps.tolist() == [want], (merit, fast)
    nps4, x4 = _near_singular_site("nps4")
    for merit, want in (("energy", 8), ("residual", 20)):
        res = settle(nps4, x4, solver=make_solver("newton-cg", merit=merit), stop=stop)
        assert res.steps.tolist() == [want], merit
    cg_module = sys.modules["dynsim.solvers.newton_cg"]
    monkeypatch.setattr(cg_module, "energy_line_search", lambda system, u, f, u_full, drive, state: (u_full, None))
    with compiled.disabled():
        plain = settle(layer, x, solver=make_solver("newton-cg"), stop=stop_rule(1e-4, 300))
    assert plain.status.tolist() == [Status.MAX_STEPS]
