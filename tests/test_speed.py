"""Fast paths (issue 5) agree with the plain computations they replace."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dynsim import compiled, settle
from dynsim.errors import ConfigError
from dynsim.plasticity import hebbian_update
from dynsim.settle import BoundField, relative_norm
from dynsim.solvers import Euler, SiteNewton, make_solver
from dynsim.stopping import MaxSteps, RelativeChange, Status
from dynsim.systems import HebbianLayer


@pytest.fixture(autouse=True)
def _no_grad():
    """These tests run without autograd, like training does; scoped to this module so the
    global grad mode is restored for the other test files."""
    with torch.no_grad():
        yield


def trained_layer(seed=0, lateral_distance=0.0):
    """An 8x8 layer whose L has moved away from I (so settling is not trivial)."""
    layer = HebbianLayer((1, 8, 8), nps=4, stride=2, radius=3.0, lateral_distance=lateral_distance, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for _ in range(200):
        x = torch.randn(1, 64, generator=g)
        res = settle(layer, x, solver=Euler(), stop=RelativeChange(1e-3) | MaxSteps(500))
        hebbian_update(layer, x, res.r, 2e-2)
    return layer


def plain_settle(system, x, solver, stop, u0=None, max_state_norm=1e6):
    """The generic loop as first written: status codes computed on every step."""
    import math

    drive_all = system.drive(x)
    u_all = torch.zeros_like(drive_all) if u0 is None else u0.clone()
    b = x.shape[0]
    steps = torch.zeros(b, dtype=torch.long)
    status = torch.zeros(b, dtype=torch.int8)
    on = stop.on or "field"
    bound = max_state_norm * math.sqrt(drive_all.shape[1])
    active, u, drive, n = torch.arange(b), u_all, drive_all, 0
    while active.numel():
        f = system.field(u, drive)
        u_next = u + solver.schedule(n) * f
        if on == "field":
            num, den = f.norm(dim=1), u.norm(dim=1)
            candidate, cand = u, n
        else:
            num, den = (u_next - u).norm(dim=1), u.norm(dim=1)
            candidate, cand = u_next, n + 1
        residual = torch.where(num == 0, torch.zeros_like(num), num / den.clamp_min(1e-12))
        code = stop.status(residual, cand)
        bad = ~torch.isfinite(residual) | ~torch.isfinite(u_next).all(dim=1) | (u_next.norm(dim=1) > bound)
        code = torch.where(bad & (code == 0), 3, code).to(torch.int8)
        done = code != 0
        if bool(done.any()):
            ids = active[done]
            u_all[ids] = torch.where((code[done] == 3)[:, None], u[done], candidate[done])
            status[ids] = code[done]
            steps[ids] = torch.where(code[done] == 3, n, cand)
            keep = ~done
            active, u_next, drive = active[keep], u_next[keep], drive[keep]
        u, n = u_next, n + 1
    return u_all, steps, status


@pytest.mark.parametrize("on", ["field", "increment"])
@pytest.mark.parametrize("cap", [3000, 40])
def test_lean_settle_loop_equals_plain_loop(on, cap):
    layer = trained_layer()
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(1))
    stop = RelativeChange(1e-4, on=on) | MaxSteps(cap)
    with compiled.disabled():  # the torch loop's bookkeeping (the compiled loop: tests/test_compiled.py)
        res = settle(layer, x, solver=Euler(), stop=stop)
    u, steps, status = plain_settle(layer, x, Euler(), stop)
    assert torch.equal(res.steps, steps)
    assert torch.equal(res.status, status)
    torch.testing.assert_close(res.u, u, atol=1e-6, rtol=0)
    torch.testing.assert_close(res.residual, relative_norm(layer.field(res.u, layer.drive(x)), res.u), rtol=1e-4,
                               atol=1e-9)
    if cap == 40:
        assert (res.status == Status.MAX_STEPS).any()


def test_batch_one_equals_batched_rows():
    layer = trained_layer()
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    stop = RelativeChange(1e-4) | MaxSteps(3000)
    batched = settle(layer, x, solver=Euler(), stop=stop)
    for i in range(5):
        one = settle(layer, x[i : i + 1], solver=Euler(), stop=stop)
        assert int(one.steps) == int(batched.steps[i])
        torch.testing.assert_close(one.u[0], batched.u[i], atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.drive(x[i : i + 1])[0], layer.drive(x)[i], atol=1e-6, rtol=0)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_newton_reaches_the_euler_fixed_point(tau):
    layer = trained_layer()
    layer.tau = tau
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))
    stop = RelativeChange(1e-6) | MaxSteps(20000)
    euler = settle(layer, x, solver=Euler(), stop=stop)
    newton = settle(layer, x, solver=make_solver("newton"), stop=stop)
    assert bool(newton.converged.all()) and bool(euler.converged.all())
    assert int(newton.steps.max()) <= 10 < int(euler.steps.min())
    assert float(newton.residual.max()) < 1e-6
    torch.testing.assert_close(newton.u, euler.u, atol=1e-4, rtol=1e-4)


def test_newton_step_is_exact_for_a_linear_layer():
    layer = trained_layer()
    layer.activation, layer._f = "linear", (lambda u: u)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    res = settle(layer, x, solver=SiteNewton(), stop=RelativeChange(1e-6) | MaxSteps(10))
    assert res.steps.tolist() == [1, 1, 1]  # one Newton step solves a linear system


def test_newton_refuses_lateral_links_between_sites():
    layer = HebbianLayer((1, 8, 8), nps=2, stride=2, radius=3.0, lateral_distance=1.0)
    with pytest.raises(ConfigError, match="euler"):
        settle(layer, torch.randn(1, 64), solver=SiteNewton(), stop=RelativeChange(1e-4) | MaxSteps(10))


@pytest.mark.parametrize("b", [1, 3])
def test_hebbian_update_matches_dense_formula(b):
    layer = trained_layer(lateral_distance=0.0)
    w0, l0 = layer.dense_weights()
    mask_w, mask_l = (w0 != 0).float(), (l0 != 0).float()
    g = torch.Generator().manual_seed(5)
    x, r = torch.randn(b, 64, generator=g), torch.tanh(torch.randn(b, layer.state_size, generator=g))
    hebbian_update(layer, x, r, 0.01, batch_rule="sum")
    w1, l1 = layer.dense_weights()
    torch.testing.assert_close(w1, w0 + 0.01 * b * (r.T @ x / b - w0) * mask_w, atol=1e-6, rtol=0)
    torch.testing.assert_close(l1, l0 + 0.005 * b * (r.T @ r / b - l0) * mask_l, atol=1e-6, rtol=0)


def test_reference_loop_matches_dynsim_euler():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from reference_loop import reference_settle

    layer = trained_layer()
    w, lat = layer.dense_weights()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(6))
    res = settle(layer, x, solver=Euler(), stop=RelativeChange(1e-4) | MaxSteps(3000))
    for i in range(4):
        u, n, status, _ = reference_settle(w, lat, x[i])
        assert (n, status) == (int(res.steps[i]), int(res.status[i]))
        torch.testing.assert_close(u, res.u[i], atol=1e-5, rtol=0)


def test_newton_chunks_large_batches(monkeypatch):
    import dynsim.solvers.newton as newton

    layer = trained_layer()
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(7))
    stop = RelativeChange(1e-5) | MaxSteps(50)
    with compiled.disabled():  # the torch path is the one that chunks
        whole = settle(layer, x, solver=SiteNewton(), stop=stop)
        monkeypatch.setattr(newton, "_JACOBIAN_BUDGET", 2 * layer.n_sites * layer.nps**2)
        chunked = settle(layer, x, solver=SiteNewton(), stop=stop)
    assert torch.equal(whole.steps, chunked.steps)
    torch.testing.assert_close(whole.u, chunked.u, atol=1e-6, rtol=0)


@pytest.mark.parametrize("first_cap", [False, True])
def test_simultaneous_settling_shortcut_matches_plain_loop(first_cap):
    layer = trained_layer()
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(8)).repeat(4, 1)  # all settle together
    plain_steps = plain_settle(layer, x[:1], Euler(), RelativeChange(1e-4) | MaxSteps(3000))[1]
    cap = int(plain_steps[0])  # the cap fires on the very step the tolerance is met
    stop = (MaxSteps(cap) | RelativeChange(1e-4)) if first_cap else (RelativeChange(1e-4) | MaxSteps(cap))
    res = settle(layer, x, solver=Euler(), stop=stop)
    u, steps, status = plain_settle(layer, x, Euler(), stop)
    assert torch.equal(res.steps, steps) and torch.equal(res.status, status)
    assert int(status[0]) == (Status.MAX_STEPS if first_cap else Status.SETTLED)
    torch.testing.assert_close(res.u, u, atol=1e-6, rtol=0)


def test_auto_solver_resolves_by_structure():
    """--solver auto (default): newton for one site-separable layer with a field threshold, else euler."""
    from dynsim.pipelines.dssm import DSSMConfig

    assert DSSMConfig().solver == "auto"
    assert DSSMConfig().resolved_solver() == "newton"
    assert DSSMConfig(solver="euler").resolved_solver() == "euler"
    assert DSSMConfig(lateral_distance=1.5).resolved_solver() == "euler"
    assert DSSMConfig(residual="increment").resolved_solver() == "euler"
    assert DSSMConfig(stream_every=10).resolved_solver() == "euler"
    # deep: Gauss–Seidel over layers (issue 16)
    assert DSSMConfig(layers=2).resolved_solver() == "block,inner_tol=0.0001"
    assert DSSMConfig(layers=2, lateral_distance=[0.0, 1.0]).resolved_solver() == "euler"
    assert DSSMConfig(threshold=None).resolved_solver() == "euler"


def test_eval_warm_start_settles_from_previous_fixed_points():
    """settle_dataset from u0 = previous fixed points: every sample still passes its residual test."""
    from dynsim.evaluation import settle_dataset
    from dynsim.solvers import SiteNewton
    from dynsim.stopping import stop_rule

    layer = HebbianLayer((1, 8, 8), nps=2, stride=2, radius=3.0)
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(1))
    stop = stop_rule(1e-4, 3000)
    cold = settle_dataset(layer, x, solver=SiteNewton(), stop=stop, batch_size=20, keep_states=True)
    warm = settle_dataset(layer, x, solver=SiteNewton(), stop=stop, batch_size=20, u0=cold.u, keep_states=True)
    assert warm.fraction_converged == 1.0 and (warm.steps == 0).all()  # already settled at its start
    assert np.allclose(warm.r, cold.r)
    res = layer.field(warm.u, layer.drive(x))
    assert bool((res.norm(dim=1) / warm.u.norm(dim=1) < 1e-4).all())


def test_reference_weights_load_back_into_a_layer():
    """load_dense inverts dense_weights: the reference's weights are read out with dynsim's evaluation."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from reference_loop import load_dense

    layer = HebbianLayer((1, 8, 8), nps=2, stride=2, radius=3.0)
    layer.ff.weight.normal_().mul_(layer.ff.mask)
    layer.lateral.weight.normal_()
    w, lat = layer.dense_weights()
    other = load_dense(HebbianLayer((1, 8, 8), nps=2, stride=2, radius=3.0), w, lat)
    assert torch.equal(other.ff.weight, layer.ff.weight) and torch.equal(other.lateral.weight, layer.lateral.weight)


@pytest.mark.parametrize("kernels", [True, False])
def test_newton_survives_a_singular_lateral_block(kernels):
    """J(0) = −L_k singular (a rank-deficient block, as a corner site's L becomes after many
    epochs): the projected Newton step still settles, where the plain step blew up (both the
    compiled loop and the torch path, which CUDA uses)."""
    layer = HebbianLayer((1, 8, 8), nps=2, stride=2, radius=3.0)
    layer.ff.weight.normal_(generator=torch.Generator().manual_seed(3)).mul_(layer.ff.mask)
    layer.lateral.weight[0] = torch.tensor([[0.5, 0.5], [0.5, 0.5]])  # rank 1
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    with contextlib.nullcontext() if kernels else compiled.disabled():  # from rest: the first Jacobian is −L_k
        res = settle(layer, x, solver=SiteNewton(picard_start=False), stop=RelativeChange(1e-4) | MaxSteps(3000))
    assert bool(res.converged.all()) and bool((res.residual < 1e-4).all())
    ref = settle(layer, x, solver=Euler(), stop=RelativeChange(1e-4) | MaxSteps(3000))
    assert bool(ref.converged.all())


def test_newton_picard_start_reaches_the_same_fixed_point():
    """SiteNewton's first step (tanh) is u_1 = d + s·A f(u_0) (the drive from rest); Newton then
    reaches the same fixed point as Newton from rest, within the tolerance."""
    layer = trained_layer()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(9))
    d = layer.drive(x)
    u1, f0, _, _ = SiteNewton().step(BoundField(layer, d), torch.zeros_like(d), None, 0)
    torch.testing.assert_close(u1, d)
    stop = RelativeChange(1e-6) | MaxSteps(100)
    a = settle(layer, x, solver=SiteNewton(), stop=stop)
    b = settle(layer, x, solver=SiteNewton(picard_start=False), stop=stop)
    assert bool(a.converged.all()) and bool(b.converged.all())
    torch.testing.assert_close(a.r, b.r, atol=1e-4, rtol=0)


def test_newton_spec_picard_start_option():
    assert not make_solver("newton", picard_start="false").picard_start
    from dynsim.solvers import solver_from_spec

    assert not solver_from_spec("newton,picard_start=false").picard_start
    assert solver_from_spec("newton").picard_start
    with pytest.raises(ConfigError):
        solver_from_spec("newton,picard_start=maybe")
