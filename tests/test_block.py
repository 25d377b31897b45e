"""The deep network's per-layer settings (gains, mult factors, per-layer stop) and the block solver."""

from __future__ import annotations

import pytest
import torch

from dynsim import ConfigError, ConstantStep, Euler, settle, stop_rule
from dynsim.pipelines.dssm import DSSMConfig
from dynsim.solvers import BlockNewton, make_solver
from dynsim.systems.deep import DeepHebbianNet, LayerSpec

torch.set_num_threads(1)

SPECS = [LayerSpec(nps=3, stride=2, radius=3.0), LayerSpec(nps=2, stride=1, radius=1.5)]


def net_with(gamma=0.3, gains=(0.7, 1.6), mult=(1.5, 2.5), layer_stop="each", perturb=0.15):
    net = DeepHebbianNet((1, 8, 8), SPECS, gamma=gamma, gains=gains, mult_factors=mult,
                         layer_stop=layer_stop).double()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in net.layers:  # L = I + symmetric per-site perturbation (so L matters)
            w = layer.lateral.weight
            a = perturb * torch.randn(w.shape, generator=gen, dtype=w.dtype)
            w += 0.5 * (a + a.mT)
    return net


def x_batch(b=6, seed=2):
    return torch.randn(b, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_field_with_gains_and_mult_factors_matches_dense_formula():
    """du_1 = −u_1 + W_1 x/m_1 + γ m_2 W_2ᵀ r_2 − (L_1 − I) r_1, du_2 = −u_2 + W_2 r_1/m_2 − (L_2 − I) r_2,
    r_p = tanh(g_p u_p) (Obeid et al.'s deep_network with tanh_factors g and mult_factors m)."""
    net = net_with()
    (w1, l1), (w2, l2) = net.dense_weights()
    x = x_batch()
    u = torch.randn(6, net.state_size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    u1, u2 = net.split(u)
    r1, r2 = torch.tanh(0.7 * u1), torch.tanh(1.6 * u2)
    i1, i2 = torch.eye(l1.shape[0], dtype=u.dtype), torch.eye(l2.shape[0], dtype=u.dtype)
    du1 = -u1 + x @ w1.T / 1.5 + 0.3 * 2.5 * r2 @ w2 - r1 @ (l1 - i1).T
    du2 = -u2 + r1 @ w2.T / 2.5 - r2 @ (l2 - i2).T
    torch.testing.assert_close(net.field(u, net.drive(x)), torch.cat([du1, du2], dim=1))
    torch.testing.assert_close(net.rates(u), torch.cat([r1, r2], dim=1))


def test_residual_norm_is_the_largest_layer_residual():
    each, state = net_with(layer_stop="each"), net_with(layer_stop="state")
    f = torch.randn(4, each.state_size, dtype=torch.float64)
    u = torch.randn(4, each.state_size, dtype=torch.float64)
    n1 = each.sizes[0]
    by_hand = torch.stack([f[:, :n1].norm(dim=1) / u[:, :n1].norm(dim=1),
                           f[:, n1:].norm(dim=1) / u[:, n1:].norm(dim=1)], dim=1).amax(dim=1)
    torch.testing.assert_close(each.residual_norm(f, u), by_hand)
    torch.testing.assert_close(state.residual_norm(f, u), f.norm(dim=1) / u.norm(dim=1))


def test_settle_stops_on_every_layers_residual():
    """With layer_stop="each" the returned state has every layer's own ‖F_p‖/‖u_p‖ < T."""
    net, x = net_with(), x_batch()
    res = settle(net, x, solver=Euler(ConstantStep(0.2)), stop=stop_rule(1e-3, 5000))
    assert bool(res.converged.all())
    per_layer = net.layer_residuals(res.u, net.drive(x))
    assert float(per_layer.max()) < 1e-3
    torch.testing.assert_close(res.residual, per_layer.amax(dim=1))


@pytest.mark.parametrize("gamma", [0.0, 0.1])
def test_block_solver_reaches_eulers_fixed_point_in_few_sweeps(gamma):
    """Gauss–Seidel converges linearly at a rate ~ γ m_2 ‖W_2‖² f' (γ m_2 = 0.75 took 135 sweeps
    here), so the feedback is kept at γ m_2 = 0.1 as in the deep runs."""
    net, x = net_with(gamma=gamma, mult=(1.5, 1.0)), x_batch()
    ref = settle(net, x, solver=Euler(ConstantStep(0.1)), stop=stop_rule(1e-12, 50000))
    res = settle(net, x, solver=BlockNewton(), stop=stop_rule(1e-10, 200))
    assert bool(ref.converged.all()) and bool(res.converged.all())
    torch.testing.assert_close(res.u, ref.u, atol=1e-8, rtol=0)
    assert int(res.steps.max()) <= (8 if gamma == 0 else 25), res.steps
    assert int(res.steps.max()) * 20 < int(ref.steps.min())


def test_block_solver_exact_in_one_sweep_without_lateral_coupling():
    """γ = 0 and L = I (initial weights): the fixed point is u_1 = W_1 x/m_1, u_2 = W_2 tanh(g_1 u_1)/m_2,
    which the first (Picard) Gauss–Seidel sweep computes exactly: settled after 1 step, residual 0."""
    net = net_with(gamma=0.0, perturb=0.0)
    (w1, _), (w2, _) = net.dense_weights()
    x = x_batch()
    res = settle(net, x, solver=BlockNewton(), stop=stop_rule(1e-12, 10))
    u1 = x @ w1.T / 1.5
    u2 = torch.tanh(0.7 * u1) @ w2.T / 2.5
    torch.testing.assert_close(res.u, torch.cat([u1, u2], dim=1))
    assert res.steps.tolist() == [1] * 6


def test_block_solver_refuses_lateral_distance_and_unknown_system():
    net = DeepHebbianNet((1, 8, 8), [SPECS[0], LayerSpec(2, 1, 1.5, lateral_distance=1.0)]).double()
    with pytest.raises(ConfigError, match="lateral distance 0"):
        settle(net, x_batch(), solver=make_solver("block"), stop=stop_rule(1e-6, 10))


def test_config_auto_picks_block_for_deep_and_checks_factors():
    deep = DSSMConfig(layers=2, nps=[4, 4])
    assert deep.resolved_solver() == "block,inner_tol=0.0001"  # each layer solved to T within a sweep
    assert DSSMConfig(layers=2, threshold=1e-3).resolved_solver() == "block,inner_tol=0.001"
    assert DSSMConfig(layers=2, gamma=0.1).resolved_solver() == "block"  # feedback: one step per layer
    assert DSSMConfig().resolved_solver() == "newton"
    assert DSSMConfig(layers=2, stream_every=10).resolved_solver() == "euler"
    with pytest.raises(ConfigError, match="--gains applies to deep networks only"):
        DSSMConfig(gains=0.5).validate()
    with pytest.raises(ConfigError, match="--mult-factors has 3 values for 2 layer"):
        DSSMConfig(layers=2, mult_factors=[1.0, 2.0, 3.0]).validate()
    with pytest.raises(ConfigError, match="--gains must be > 0"):
        DSSMConfig(layers=2, gains=[1.0, -1.0]).validate()
    with pytest.raises(ConfigError, match="--layer-stop must be one of"):
        DSSMConfig(layers=2, layer_stop="all").validate()


def test_layer_monitor_logs_activity_and_weight_norms():
    """Without plasticity L stays I (‖L − I‖ = 0) and ‖W_p‖ is the initial weights' norm;
    mean |r_p| is the settled rates' mean absolute value."""
    from dynsim import Engine
    from dynsim.engine import DynamicsSettler
    from dynsim.layer_monitor import LayerMonitor

    net, x = net_with(gamma=0.0, perturb=0.0), x_batch(3)
    monitor = LayerMonitor(net, tol=1e-6)
    engine = Engine(DynamicsSettler(net, BlockNewton(), stop_rule(1e-8, 50)), [monitor], progress=False)
    with torch.no_grad():
        engine.fit(lambda epoch: iter([_batch(x)]), 1)
    h = engine.history[-1]
    (w1, l1), (w2, l2) = net.dense_weights()
    assert h["layer_l_norm"] == [0.0, 0.0]
    assert h["layer_w_norm"] == pytest.approx([float(w1.norm()), float(w2.norm())], rel=1e-9)
    r = settle(net, x, solver=BlockNewton(), stop=stop_rule(1e-8, 50)).r
    r1, r2 = net.split(r)
    expected = [float(v) for v in (r1.abs().mean(), r2.abs().mean())]
    assert h["layer_mean_abs_rate"] == pytest.approx(expected, rel=1e-6)


def _batch(x):
    from dynsim.engine import Batch

    return Batch(x=x, y=None, index=torch.arange(len(x)), epoch=0, number=0)


def test_dense_feedforward_for_large_batches_matches_structured_map_and_follows_updates():
    net = DeepHebbianNet((1, 8, 8), SPECS).double()
    r = torch.tanh(torch.randn(40, net.sizes[0], dtype=torch.float64))
    big = net.feedforward_input(1, r)  # batch 40: the cached dense W_2
    rows = torch.cat([net.feedforward_input(1, r[i : i + 1]) for i in range(40)])  # structured gather
    torch.testing.assert_close(big, rows)
    w2, _ = net.dense_weights()[1]
    torch.testing.assert_close(big, r @ w2.T)
    with torch.no_grad():
        net.layers[1].ff.weight.mul_(3.0)  # an in-place update (as plasticity does) invalidates the cache
    torch.testing.assert_close(net.feedforward_input(1, r), 3.0 * big)


def test_dense_feedback_for_large_batches_matches_structured_transpose():
    net = DeepHebbianNet((1, 8, 8), SPECS).double()
    r2 = torch.tanh(torch.randn(40, net.sizes[1], dtype=torch.float64))
    big = net.feedback_input(0, r2)
    rows = torch.cat([net.feedback_input(0, r2[i : i + 1]) for i in range(40)])
    torch.testing.assert_close(big, rows)
    w2, _ = net.dense_weights()[1]
    torch.testing.assert_close(big, r2 @ w2)


def test_block_solver_options_from_spec():
    from dynsim.solvers import solver_from_spec

    solver = solver_from_spec("block,damp_after=5,picard_start=false")
    assert (solver.damp_after, solver.picard_start) == (5, False)
    with pytest.raises(ConfigError, match="damp_after must be an integer >= 1"):
        solver_from_spec("block,damp_after=0")


def test_damped_sweeps_still_reach_the_fixed_point():
    """From sweep ``damp_after`` on the steps are halved: slower (linear) but the same fixed point."""
    net, x = net_with(gamma=0.0, mult=(1.5, 1.0)), x_batch()
    full = settle(net, x, solver=BlockNewton(), stop=stop_rule(1e-10, 200))
    damped = settle(net, x, solver=BlockNewton(damp_after=1), stop=stop_rule(1e-10, 200))
    assert bool(damped.converged.all())
    torch.testing.assert_close(damped.u, full.u, atol=1e-8, rtol=0)
    assert int(damped.steps.min()) > int(full.steps.max())
