"""The compiled (numba) kernels give what the torch path gives: same steps, status, fixed points, updates."""

from __future__ import annotations

import pytest
import torch

from dynsim import HebbianLayer, MaxSteps, RelativeChange, Status, compiled, settle
from dynsim.plasticity import hebbian_update
from dynsim.solvers import ConstantStep, Euler, SiteNewton

pytestmark = pytest.mark.skipif(not compiled.available(), reason="numba not installed")


def coupled(activation="tanh", *, nps=4, channels=1, sign=-1, dtype=torch.float32, seed=0, strength=0.15):
    layer = HebbianLayer((channels, 8, 8), nps=nps, stride=2, radius=3.0, activation=activation,
                         lateral_sign=sign, seed=seed).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    lat = layer.lateral.weight
    noise = strength * torch.randn(lat.shape, generator=g, dtype=torch.float64).to(dtype)
    lat += (noise + noise.mT) / 2  # symmetric, as the Hebbian rule keeps it
    return layer


def both_paths(layer, x, stop, u0=None, solver=None, **kw):
    solver = solver or SiteNewton()
    fast = settle(layer, x, solver=solver, stop=stop, u0=u0, **kw)
    with compiled.disabled():
        ref = settle(layer, x, solver=solver, stop=stop, u0=u0, **kw)
    return fast, ref


def assert_same(fast, ref, rtol=1e-5):
    assert torch.equal(fast.steps, ref.steps)
    assert torch.equal(fast.status, ref.status)
    assert fast.n_evals == ref.n_evals
    ok = ref.status != Status.DIVERGED
    scale = ref.u[ok].norm(dim=1).clamp_min(1e-6)
    assert float(((fast.u[ok] - ref.u[ok]).norm(dim=1) / scale).max()) < rtol
    # residuals below ~1e-6 are float32 rounding noise of ‖F‖
    atol = 1e-6 if fast.u.dtype == torch.float32 else 1e-12
    assert torch.allclose(fast.residual[ok], ref.residual[ok], rtol=1e-2, atol=atol)


@pytest.mark.parametrize("activation", ["tanh", "linear", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_settle_equals_torch_path(activation, dtype):
    layer = coupled(activation, dtype=dtype)
    x = torch.randn(12, 64, generator=torch.Generator().manual_seed(3), dtype=dtype)
    fast, ref = both_paths(layer, x, RelativeChange(1e-5) | MaxSteps(50))
    assert_same(fast, ref, rtol=1e-4 if dtype == torch.float32 else 1e-10)
    if activation != "relu":  # Newton may cycle on relu's kinks (in both paths alike)
        assert bool((fast.status == Status.SETTLED).all())
    assert torch.allclose(fast.r, layer.rates(fast.u))


@pytest.mark.parametrize("nps", [1, 2, 5])
def test_compiled_settle_other_sizes_and_channels(nps):
    layer = coupled(nps=nps, channels=3)
    x = torch.randn(6, 3 * 64, generator=torch.Generator().manual_seed(4))
    fast, ref = both_paths(layer, x, RelativeChange(1e-5) | MaxSteps(50))
    assert_same(fast, ref, rtol=1e-4)
    # and the fixed point is one: F(u) = 0 within the tolerance
    f = layer.field(fast.u, layer.drive(x))
    assert float((f.norm(dim=1) / fast.u.norm(dim=1)).max()) < 1e-5


def test_compiled_settle_from_u0_cap_and_rule_order():
    layer = coupled(strength=0.6)
    g = torch.Generator().manual_seed(5)
    x, u0 = torch.randn(8, 64, generator=g), torch.randn(8, layer.state_size, generator=g)
    for stop in (RelativeChange(1e-7) | MaxSteps(2), MaxSteps(2) | RelativeChange(1e-7), MaxSteps(3)):
        fast, ref = both_paths(layer, x, stop, u0=u0)
        assert_same(fast, ref, rtol=1e-4)
        assert bool((fast.status == Status.MAX_STEPS).all())
    # tolerance met on the step the cap fires (n = 1, after the Picard start): the first rule's code wins
    for stop, code in ((RelativeChange(10.0) | MaxSteps(1), Status.SETTLED),
                       (MaxSteps(1) | RelativeChange(10.0), Status.MAX_STEPS)):
        fast, ref = both_paths(layer, x, stop)
        assert_same(fast, ref)
        assert bool((fast.status == code).all()) and bool((fast.steps == 1).all())


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_compiled_euler_equals_torch_path(activation):
    """The seed's Euler (decaying schedule) and a constant step: same steps, status and states."""
    layer = coupled(activation)
    g = torch.Generator().manual_seed(11)
    x, u0 = torch.randn(10, 64, generator=g), 0.1 * torch.randn(10, layer.state_size, generator=g)
    for solver, stop in ((Euler(), RelativeChange(1e-4) | MaxSteps(3000)),
                         (Euler(ConstantStep(0.5)), RelativeChange(1e-5) | MaxSteps(3000)),
                         (Euler(), MaxSteps(7))):
        fast, ref = both_paths(layer, x, stop, u0=u0, solver=solver)
        assert_same(fast, ref, rtol=1e-4)
    assert int(fast.steps.max()) == 7 and bool((fast.status == Status.MAX_STEPS).all())


def test_compiled_euler_divergence_matches():
    """Euler with a step far beyond stability: the state blows up, in both paths at the same step."""
    layer = coupled(strength=0.5)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(12))
    fast, ref = both_paths(layer, x, RelativeChange(1e-6) | MaxSteps(500), solver=Euler(ConstantStep(50.0)))
    assert torch.equal(fast.status, ref.status) and torch.equal(fast.steps, ref.steps)
    assert bool((fast.status == Status.DIVERGED).all())
    assert torch.allclose(fast.u, ref.u, rtol=1e-4, atol=1e-4)  # the last finite state is returned


def test_compiled_euler_needs_a_cap():
    layer = coupled()
    x = torch.randn(2, 64)
    from dynsim.stopping import StopLimits

    assert compiled.settle_backend(layer, x, None, Euler(), StopLimits(rtol=1e-4), 1e6) is None
    out = compiled.settle_backend(layer, x, None, Euler(), StopLimits(rtol=1e-4, cap=3000), 1e6)
    assert out is not None and bool((out[3] == Status.SETTLED).all())


def test_compiled_settle_divergence_matches():
    """A state whose RMS exceeds max_state_norm is marked diverged and keeps its last state."""
    layer = coupled()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(6))
    x[0] *= 1e-6  # this one stays below the bound and settles
    fast, ref = both_paths(layer, x, RelativeChange(1e-5) | MaxSteps(50), max_state_norm=1e-3)
    assert torch.equal(fast.status, ref.status) and torch.equal(fast.steps, ref.steps)
    assert fast.status.tolist() == [Status.SETTLED] + [Status.DIVERGED] * 3
    assert fast.steps[1:].tolist() == [0, 0, 0] and float(fast.u[1:].abs().max()) == 0.0  # the start, u = 0


def test_compiled_settle_parallel_chunks_equal_one_thread():
    layer = coupled()
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(7))
    stop = RelativeChange(1e-5) | MaxSteps(50)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = settle(layer, x, solver=SiteNewton(), stop=stop)
        torch.set_num_threads(2)
        two = settle(layer, x, solver=SiteNewton(), stop=stop)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one.u, two.u) and torch.equal(one.steps, two.steps)
    assert one.n_evals == two.n_evals


def test_compiled_settle_from_worker_threads():
    """Two Python threads settling at once (the parallel layer is kept to the main thread)."""
    import threading

    layer = coupled()
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(13))
    stop = RelativeChange(1e-5) | MaxSteps(50)
    want = settle(layer, x, solver=SiteNewton(), stop=stop)
    got = []
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        workers = [threading.Thread(target=lambda: got.append(settle(layer, x, solver=SiteNewton(), stop=stop)))
                   for _ in range(2)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
    finally:
        torch.set_num_threads(old)
    assert len(got) == 2 and all(torch.equal(g.u, want.u) and torch.equal(g.steps, want.steps) for g in got)


@pytest.mark.parametrize("channels", [1, 3])
def test_compiled_online_update_equals_torch(channels):
    ref_layer = coupled(channels=channels)
    fast_layer = coupled(channels=channels)
    g = torch.Generator().manual_seed(8)
    for _ in range(3):
        x = torch.randn(1, channels * 64, generator=g)
        r = torch.tanh(torch.randn(1, ref_layer.state_size, generator=g))
        with compiled.disabled():
            hebbian_update(ref_layer, x, r, 0.01)
        hebbian_update(fast_layer, x, r, 0.01)
    for a, b in ((fast_layer.ff.weight, ref_layer.ff.weight), (fast_layer.lateral.weight, ref_layer.lateral.weight)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    # padding stays zero, and Newton's cached lateral blocks see the new L
    assert float((fast_layer.ff.weight * (1 - fast_layer.ff.mask)).abs().max()) == 0.0
    blocks, _ = fast_layer._lateral_blocks()
    eye = torch.eye(fast_layer.nps)
    assert torch.allclose(blocks, -(fast_layer.lateral.weight - eye))


def test_online_update_formula_by_hand():
    """One compiled update against ΔW = η(r xᵀ − W), ΔL = (η/2)(r rᵀ − L) on the dense matrices."""
    layer = coupled(nps=2)
    w0, l0 = layer.dense_weights()
    mw, ml = (w0 != 0).double(), (l0 != 0).double()
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(9))
    r = torch.tanh(torch.randn(1, layer.state_size, generator=torch.Generator().manual_seed(10)))
    hebbian_update(layer, x, r, 0.02)
    w1, l1 = layer.dense_weights()
    want_w = w0.double() + 0.02 * (r.double().T @ x.double() - w0.double()) * mw
    want_l = l0.double() + 0.01 * (r.double().T @ r.double() - l0.double()) * ml
    assert torch.allclose(w1.double(), want_w, atol=1e-6)
    assert torch.allclose(l1.double(), want_l, atol=1e-6)


def test_applies_only_where_it_should():
    layer = coupled()
    x = torch.randn(2, 64)
    assert compiled.applies(layer, x)
    assert not compiled.applies(layer, x.double())  # mixed dtypes: the torch path converts
    assert not compiled.applies(layer, x.requires_grad_())
    assert not compiled.applies(HebbianLayer((1, 8, 8), nps=2, stride=2, radius=3.0, lateral_distance=1.0), x)
    assert not compiled.applies(HebbianLayer((1, 8, 8), nps=compiled.MAX_NPS + 1, stride=2, radius=3.0),
                                torch.randn(2, 64))
    with compiled.disabled():
        assert not compiled.applies(layer, torch.randn(2, 64))
    assert compiled.applies(layer, torch.randn(2, 64))


def test_rational_tanh_is_within_one_ulp_of_correct_rounding():
    """The float32 kernel's tanh (a vectorisable rational) against float64 tanh rounded to float32."""
    import numba
    import numpy as np

    @numba.njit
    def evaluate(xs, out):
        for i in range(xs.size):
            out[i] = np.float32(compiled._tanh_rational(xs[i]))

    grid = np.linspace(-12, 12, 200001)
    tiny = np.geomspace(1e-30, 12, 20000)
    xs = np.concatenate([grid, tiny, -tiny, [0.0, 9.0, -9.0, 1e30, -1e30]]).astype(np.float32)
    out = np.empty_like(xs)
    evaluate(xs, out)
    want = np.tanh(xs.astype(np.float64)).astype(np.float32)
    ulps = np.abs(out.view(np.int32).astype(np.int64) - want.view(np.int32).astype(np.int64))
    assert ulps.max() <= 1
    assert np.array_equal(np.sign(out), np.sign(xs)) and out[-2] == 1.0 and out[-1] == -1.0
    nan = np.empty(1, np.float32)
    evaluate(np.array([np.nan], np.float32), nan)
    assert np.isnan(nan[0])


def test_without_numba_the_torch_path_runs():
    """numba missing: dynsim imports, the kernels report unavailable, settle and learn still work."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['numba'] = None\n"
        "import torch\n"
        "from dynsim import HebbianLayer, MaxSteps, RelativeChange, compiled, settle\n"
        "from dynsim.plasticity import hebbian_update\n"
        "from dynsim.solvers import Euler, SiteNewton\n"
        "layer = HebbianLayer((1, 8, 8), nps=2, stride=2, radius=3.0)\n"
        "x = torch.randn(3, 64)\n"
        "for solver in (SiteNewton(), Euler()):\n"
        "    res = settle(layer, x, solver=solver, stop=RelativeChange(1e-4) | MaxSteps(3000))\n"
        "    assert bool(res.converged.all())\n"
        "hebbian_update(layer, x[:1], res.r[:1], 0.01)\n"
        "print(compiled.available())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("solver", ["auto", "euler"])
def test_dssm_run_same_with_and_without_kernels(solver):
    """End to end (online batch-1 training + evaluations): the kernels change the speed, not the run.

    Same steps for every training input; weights within float rounding; same accuracy."""
    from dynsim.pipelines.dssm import DSSMConfig, run_dssm

    def run():
        cfg = DSSMConfig(data="digits", epochs=2, images_per_epoch=60, eval_every=1, eval_train_size=300,
                         eval_test_size=200, readout="svc", solver=solver, progress=False)
        return run_dssm(cfg)

    fast = run()
    with compiled.disabled():
        ref = run()
    assert fast["system"]["solver"] == ref["system"]["solver"]
    assert fast["iterations_per_input"] == ref["iterations_per_input"]
    for a, b in zip(fast["history"], ref["history"], strict=True):
        assert a["eval_mean_iterations"] == pytest.approx(b["eval_mean_iterations"], abs=0.02)
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=0.011)


@pytest.mark.parametrize("seed", [0, 3, 10, 17, 22, 30, 41, 50])
def test_compiled_status_matches_torch_on_pathological_layers(seed):
    """Singular Jacobians (L = 0 makes J(0) = 0), huge lateral weights, tiny and huge inputs, unstable
    Euler steps: no exception, and the same status and steps as the torch path (a zero pivot is
    handled as LAPACK does, so the safeguard restarts from the box, not from 0)."""
    g = torch.Generator().manual_seed(seed)
    activation = ["tanh", "linear", "relu"][seed % 3]
    layer = HebbianLayer((1, 6, 6), nps=1 + seed % 4, stride=2, radius=2.0, activation=activation,
                         lateral_sign=[-1, 1][seed % 2])
    layer.lateral.weight.add_([0.0, 0.5, 3.0, 1e3][seed % 4] * torch.randn(layer.lateral.weight.shape, generator=g))
    if seed % 5 == 0:
        layer.lateral.weight.zero_()
    x = torch.randn(4, 36, generator=g) * [1.0, 1e-3, 1e3, 1e20][seed % 4]
    for solver in (SiteNewton(), SiteNewton(picard_start=False), Euler(), Euler(ConstantStep(5.0))):
        fast, ref = both_paths(layer, x, RelativeChange(1e-4) | MaxSteps(60), solver=solver)
        assert torch.equal(fast.status, ref.status), (solver, fast.status, ref.status)
        assert torch.equal(fast.steps, ref.steps), (solver, fast.steps, ref.steps)


def test_compiled_euler_follows_a_changed_schedule():
    """The tabulated step sizes are keyed on the schedule: changing it on the solver takes effect."""
    layer = coupled()
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(14))
    solver = Euler(ConstantStep(0.1))
    slow = settle(layer, x, solver=solver, stop=RelativeChange(1e-4) | MaxSteps(3000))
    solver.schedule = ConstantStep(0.5)
    fast, ref = both_paths(layer, x, RelativeChange(1e-4) | MaxSteps(3000), solver=solver)
    assert torch.equal(fast.steps, ref.steps) and bool((fast.steps < slow.steps).all())
