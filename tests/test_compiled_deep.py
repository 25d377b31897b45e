"""The compiled deep backend (dynsim.compiled_deep) gives what the torch block / Euler path gives:
same steps, statuses, evaluation counts and fixed points."""

from __future__ import annotations

import pytest
import torch

from dynsim import ConstantStep, Euler, MaxSteps, RelativeChange, Status, compiled, settle, stop_rule
from dynsim.solvers import BlockNewton
from dynsim.systems.deep import DeepHebbianNet, LayerSpec

pytestmark = pytest.mark.skipif(not compiled.available(), reason="numba not installed")

SPECS2 = [LayerSpec(nps=3, stride=2, radius=3.0), LayerSpec(nps=2, stride=1, radius=1.5)]
SPECS3 = [*SPECS2, LayerSpec(nps=4, stride=1, radius=1.0)]


def net_with(specs=SPECS2, gamma=0.3, gains=None, mult=None, layer_stop="each", dtype=torch.float64, channels=1,
             perturb=0.15, scale=1.0, activation="tanh"):
    net = DeepHebbianNet((channels, 8, 8), specs, gamma=gamma, gains=gains, mult_factors=mult,
                         layer_stop=layer_stop, activation=activation).to(dtype)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in net.layers:  # L = I + a symmetric per-site perturbation; stronger W
            w = layer.lateral.weight
            a = perturb * torch.randn(w.shape, generator=gen, dtype=torch.float64).to(dtype)
            w += 0.5 * (a + a.mT)
            layer.ff.weight.mul_(scale)
    return net


def x_batch(b=6, seed=2, channels=1, dtype=torch.float64):
    return torch.randn(b, channels * 64, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def both_paths(net, x, solver, stop, u0=None, **kw):
    fast = settle(net, x, solver=solver, stop=stop, u0=u0, **kw)
    with compiled.disabled():
        ref = settle(net, x, solver=solver, stop=stop, u0=u0, **kw)
    return fast, ref


def assert_same(fast, ref, rtol):
    assert torch.equal(fast.steps, ref.steps)
    assert torch.equal(fast.status, ref.status)
    assert fast.n_evals == ref.n_evals
    scale = ref.u.norm(dim=1).clamp_min(1e-6)
    assert float(((fast.u - ref.u).norm(dim=1) / scale).max()) < rtol
    torch.testing.assert_close(fast.r, ref.r, rtol=0, atol=10 * rtol * float(scale.max()))  # |Δr| ≤ g|Δu|
    atol = 1e-6 if fast.u.dtype == torch.float32 else 1e-12
    assert torch.allclose(fast.residual, ref.residual, rtol=1e-2, atol=atol)


def test_the_compiled_backend_runs_for_a_deep_net():
    from dynsim import compiled_deep

    net = net_with()
    assert compiled_deep.can_settle(net, x_batch(), None)
    limits = stop_rule(1e-6, 100).limits()
    assert compiled_deep.settle_backend(net, x_batch(), None, BlockNewton(), limits, 1e6) is not None
    with compiled.disabled():
        assert not compiled_deep.can_settle(net, x_batch(), None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [0.0, 0.3])
@pytest.mark.parametrize("layer_stop", ["each", "state"])
def test_compiled_block_reaches_the_torch_blocks_fixed_point(dtype, gamma, layer_stop):
    """Parity: the same sweeps, statuses and field evaluations, the same fixed point up to rounding."""
    net = net_with(gamma=gamma, gains=(0.7, 1.6), mult=(1.5, 2.5), layer_stop=layer_stop, dtype=dtype)
    x = x_batch(dtype=dtype)
    fast, ref = both_paths(net, x, BlockNewton(), stop_rule(1e-5 if dtype == torch.float32 else 1e-9, 2000))
    assert bool(ref.converged.all())
    assert_same(fast, ref, rtol=1e-4 if dtype == torch.float32 else 1e-10)
    assert float(net.layer_residuals(fast.u, net.drive(x)).max()) < (1e-4 if dtype == torch.float32 else 1e-8)


@pytest.mark.parametrize("picard_start", [True, False])
def test_compiled_block_three_layers_channels_and_options(picard_start):
    net = net_with(SPECS3, gamma=0.2, mult=(1.0, 2.0, 3.0), channels=3, scale=2.0)
    x = x_batch(channels=3)
    solver = BlockNewton(picard_start=picard_start, damp_after=3)
    fast, ref = both_paths(net, x, solver, stop_rule(1e-9, 200))
    assert_same(fast, ref, rtol=1e-9)
    assert int(fast.steps.max()) > 3  # the damped sweeps ran


@pytest.mark.parametrize("activation", ["linear", "relu"])
def test_compiled_block_other_rates(activation):
    net = net_with(gamma=0.1, activation=activation, perturb=0.05)
    fast, ref = both_paths(net, x_batch(), BlockNewton(), RelativeChange(1e-9) | MaxSteps(60))
    assert_same(fast, ref, rtol=1e-9)


def test_compiled_euler_streaming_with_start_state_and_cap():
    """Euler with a cap (the streaming path): the state carried in, cap-limited statuses."""
    net = net_with(gamma=0.3, gains=(1.0, 1.5), mult=(1.0, 2.0))
    x = x_batch()
    u0 = 0.3 * torch.randn(6, net.state_size, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    fast, ref = both_paths(net, x, Euler(ConstantStep(0.2)), stop_rule(1e-4, 10), u0=u0)
    assert bool((ref.status == Status.MAX_STEPS).all())
    assert_same(fast, ref, rtol=1e-12)
    fast, ref = both_paths(net, x, Euler(), stop_rule(1e-4, 3000))  # the seed's schedule, to T
    assert bool(ref.converged.all())
    assert_same(fast, ref, rtol=1e-10)


def test_compiled_block_large_batch_in_threads_equals_one_thread():
    """Batches of ≥ 128 rows run in parallel chunks (the dense maps of the torch path above 32 rows)."""
    net = net_with(gamma=0.2, dtype=torch.float32)
    x = x_batch(256, dtype=torch.float32)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fast, ref = both_paths(net, x, BlockNewton(), stop_rule(1e-5, 200))
    finally:
        torch.set_num_threads(old)
    assert_same(fast, ref, rtol=1e-4)
    one = settle(net, x[:7], solver=BlockNewton(), stop=stop_rule(1e-5, 200))
    torch.testing.assert_close(one.u, fast.u[:7])


def test_compiled_block_marks_divergence_as_the_torch_path():
    net = net_with(gamma=0.0, scale=5.0)
    x = x_batch() * torch.linspace(0.05, 3.0, 6, dtype=torch.float64)[:, None]  # small inputs stay bounded
    fast, ref = both_paths(net, x, BlockNewton(), stop_rule(1e-8, 50), max_state_norm=1.0)
    assert bool(ref.diverged.any()) and not bool(ref.diverged.all())
    assert_same(fast, ref, rtol=1e-12)


def test_compiled_block_is_used_only_where_it_applies():
    """Lateral distance > 0, grad, or a non-tensor u0: the torch path runs (same answer)."""
    from dynsim import compiled_deep

    net = DeepHebbianNet((1, 8, 8), [LayerSpec(2, 2, 3.0, lateral_distance=1.0), LayerSpec(2, 1, 1.5)])
    assert not compiled_deep.can_settle(net, torch.zeros(1, 64), None)
    ok = net_with()
    assert not compiled_deep.can_settle(ok, torch.zeros(1, 64, requires_grad=True, dtype=torch.float64), None)
    assert not compiled_deep.can_settle(ok, torch.zeros(1, 63, dtype=torch.float64), None)
    assert not compiled_deep.can_settle(ok, torch.zeros(1, 64, dtype=torch.float64), [0.0])


def test_float64_network_keeps_exact_gains():
    """r_p = tanh(g_p u_p) with g_p exactly as given after .double() (a float32 gain buffer rounded
    0.7 to 0.69999998808, so the torch and compiled paths' rates differed by ~1e-8)."""
    net = net_with(gains=(0.7, 1.6))
    u = torch.randn(3, net.state_size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    u1, u2 = net.split(u)
    expected = torch.cat([torch.tanh(0.7 * u1), torch.tanh(1.6 * u2)], dim=1)
    torch.testing.assert_close(net.rates(u), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("gamma", [0.0, 0.3])
def test_compiled_block_with_inner_solves_equals_torch_path(gamma):
    """inner_tol: each layer takes per-site Newton steps (b_p fixed) until ‖F_p‖/‖u_p‖ < inner_tol
    within a sweep; the same sweeps, statuses and fixed point on both paths, the same evaluations
    sample by sample (batch 1: the torch path counts the batch's slowest sample)."""
    net = net_with(gamma=gamma, gains=(0.7, 1.6), mult=(1.5, 2.5))
    x = x_batch()
    solver = BlockNewton(inner_tol=1e-9)
    fast, ref = both_paths(net, x, solver, stop_rule(1e-9, 500))
    assert torch.equal(fast.steps, ref.steps) and torch.equal(fast.status, ref.status)
    assert float(((fast.u - ref.u).norm(dim=1) / ref.u.norm(dim=1)).max()) < 1e-10
    for i in range(2):
        one, one_ref = both_paths(net, x[i : i + 1], solver, stop_rule(1e-9, 500))
        assert one.n_evals == one_ref.n_evals and torch.equal(one.steps, one_ref.steps)
    if gamma == 0.0:  # one-way coupling: one sweep solves every layer, the second only tests
        assert bool((fast.steps == 1).all()) and bool(fast.converged.all())
    else:  # the lagged feedback needs more sweeps, each solving every layer
        assert int(fast.steps.min()) > 1


def test_inner_solves_reach_the_one_step_sweeps_fixed_point():
    net = net_with(gamma=0.3)
    x = x_batch()
    inner = settle(net, x, solver=BlockNewton(inner_tol=1e-10), stop=stop_rule(1e-10, 500))
    one = settle(net, x, solver=BlockNewton(), stop=stop_rule(1e-10, 500))
    assert bool(inner.converged.all()) and bool(one.converged.all())
    torch.testing.assert_close(inner.u, one.u, rtol=0, atol=1e-8)
    assert int(inner.steps.max()) < int(one.steps.max())


def test_block_inner_options_are_checked():
    from dynsim import ConfigError
    from dynsim.solvers import solver_from_spec

    assert solver_from_spec("block,inner_tol=0.0001").inner_tol == 1e-4
    for spec, msg in (("block,inner_tol=0", "inner_tol must be a number > 0"),
                      ("block,inner_tol=1e-4,inner_max=0", "inner_max must be an integer >= 1")):
        with pytest.raises(ConfigError, match=msg):
            solver_from_spec(spec)
