"""Deep structured network, its plasticity, per-layer monitor and streaming input."""

from __future__ import annotations

import math

import pytest
import torch

from dynsim import (
    ConfigError,
    ConstantStep,
    Engine,
    Euler,
    MaxSteps,
    RelativeChange,
    settle,
    stop_rule,
)
from dynsim.layer_monitor import LayerMonitor
from dynsim.plasticity.deep import DeepSimilarityMatchingRule, deep_hebbian_update
from dynsim.streaming import InputStream, SwitchMonitor, SwitchTraceMonitor
from dynsim.systems.deep import DeepHebbianNet, LayerSpec, site_linear_transpose
from dynsim.systems.hebbian import HebbianLayer
from dynsim.systems.structure import receptive_fields

torch.set_num_threads(1)

SPECS = [
    LayerSpec(nps=3, stride=2, radius=3.0),
    LayerSpec(nps=2, stride=1, radius=1.5, lateral_distance=1.0),
]


def small_net(gamma=0.0, activation="tanh", lateral_sign=-1, channels=1, seed=0):
    return DeepHebbianNet(
        (channels, 8, 8),
        SPECS,
        gamma=gamma,
        activation=activation,
        lateral_sign=lateral_sign,
        seed=seed,
    ).double()


def perturb_lateral(net, scale=0.1, seed=1):
    """Make each L_p = I + small symmetric structured perturbation (so L matters in the tests)."""
    gen = torch.Generator().manual_seed(seed)
    for layer in net.layers:
        _, lat = layer.dense_weights()
        a = torch.randn(lat.shape, generator=gen, dtype=lat.dtype)
        mask = (layer.lateral.to_dense(layer.n_sites) != 0) | torch.eye(
            lat.shape[0], dtype=torch.bool
        )
        # write the dense target back through the structure:
        # weight[s, m, k·M + m'] = L[s·M + m, index[s, k]·M + m']
        sym = (a + a.T) / 2 * mask * scale + torch.eye(lat.shape[0], dtype=lat.dtype)
        m = layer.nps
        idx, valid = layer.lateral.index, layer.lateral.mask[:, 0, :].bool()
        for s in range(layer.n_sites):
            for k in range(idx.shape[1]):
                if not valid[s, k * m]:
                    continue
                j = int(idx[s, k])
                layer.lateral.weight[s, :, k * m : (k + 1) * m] = sym[
                    s * m : (s + 1) * m, j * m : (j + 1) * m
                ]


def tight():
    return RelativeChange(1e-11) | MaxSteps(20000)


def test_gamma_zero_equals_two_stacked_layers():
    net = small_net(gamma=0.0)
    x = torch.randn(4, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    solver = Euler(ConstantStep(0.2))
    deep = settle(net, x, solver=solver, stop=tight())
    assert bool(deep.converged.all())
    r1_deep, r2_deep = net.split(deep.r)

    first = settle(net.layers[0], x, solver=solver, stop=tight())
    # the second layer as a stand-alone HebbianLayer reads channel-major images: reorder sites
    second_layer = net.layers[1]
    b, s, m = x.shape[0], net.layers[0].n_sites, net.layers[0].nps
    img = first.r.reshape(b, s, m).transpose(1, 2).reshape(b, -1)
    second = settle(second_layer, img, solver=solver, stop=tight())
    torch.testing.assert_close(r1_deep, first.r, atol=1e-5, rtol=0)
    torch.testing.assert_close(r2_deep, second.r, atol=1e-5, rtol=0)


def block_system(net, x):
    """Dense ``A``, ``b`` with the linear-activation field ``du/ds = −A u + b``."""
    weights = net.dense_weights()
    n = net.state_size
    a = torch.zeros(n, n, dtype=torch.float64)
    sl = net.layer_slices()
    s = net.lateral_sign
    for p, (w, lat) in enumerate(weights):
        eye = torch.eye(lat.shape[0], dtype=torch.float64)
        a[sl[p], sl[p]] = eye - s * (lat - eye)
        if p > 0:
            a[sl[p], sl[p - 1]] = -w
        if p + 1 < len(weights):
            a[sl[p], sl[p + 1]] = -net.gamma * weights[p + 1][0].T
    b = torch.zeros(x.shape[0], n, dtype=torch.float64)
    b[:, sl[0]] = x @ weights[0][0].T
    return a, b


@pytest.mark.parametrize("lateral_sign", [-1, 1])
def test_linear_field_and_fixed_point_match_block_system(lateral_sign):
    net = small_net(gamma=0.3, activation="linear", lateral_sign=lateral_sign)
    perturb_lateral(net)
    net.layers[1].ff.weight.mul_(0.5)  # keep the linear dynamics stable (checked below)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 64, dtype=torch.float64, generator=gen)
    a, b = block_system(net, x)
    u = torch.randn(3, net.state_size, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(net.field(u, net.drive(x)), b - u @ a.T)

    assert float(torch.linalg.eigvals(a).real.min()) > 0.1  # a stable fixed point exists
    expected = torch.linalg.solve(a, b.T).T
    res = settle(net, x, solver=Euler(ConstantStep(0.2)), stop=tight())
    assert bool(res.converged.all())
    torch.testing.assert_close(res.u, expected, atol=1e-7, rtol=1e-7)


def test_transpose_map_equals_dense_transpose():
    net = small_net(gamma=0.5)
    upper, lower = net.layers[1], net.layers[0]
    y = torch.randn(5, upper.state_size, dtype=torch.float64)
    dense = upper.ff.to_dense(lower.n_sites)
    got = site_linear_transpose(upper.ff, upper.sites(y), lower.n_sites).reshape(5, -1)
    torch.testing.assert_close(got, y @ dense)
    # and on a multi-channel first layer (pixel groups of 3 channels)
    layer = HebbianLayer((3, 8, 8), nps=2, stride=2, radius=3.0).double()
    y = torch.randn(2, layer.state_size, dtype=torch.float64)
    got = site_linear_transpose(layer.ff, layer.sites(y), 64).reshape(2, -1)
    torch.testing.assert_close(got, y @ layer.ff.to_dense(64))


def _disc_count(h, w, stride, radius):
    total = 0
    for i in range(h // stride):
        for j in range(w // stride):
            cr, cc = stride * i + stride / 2, stride * j + stride / 2
            total += sum(
                (k + 0.5 - cr) ** 2 + (l + 0.5 - cc) ** 2 <= radius**2 + 1e-9
                for k in range(h)
                for l in range(w)
            )
    return total


def test_structure_counts_multichannel_input():
    specs = [
        LayerSpec(nps=4, stride=2, radius=4.0),
        LayerSpec(nps=8, stride=2, radius=2.0, lateral_distance=1.0),
    ]
    net = DeepHebbianNet((3, 32, 32), specs, gamma=0.1)
    l1, l2 = net.layers
    assert l1.grid == (16, 16) and l2.grid == (8, 8)
    assert l2.input_shape == (4, 16, 16)
    assert net.state_size == 16 * 16 * 4 + 8 * 8 * 8
    assert l1.ff.nnz == 4 * 3 * _disc_count(32, 32, 2, 4.0)
    assert l2.ff.nnz == 8 * 4 * _disc_count(16, 16, 2, 2.0)
    assert l1.lateral.nnz == 256 * 4 * 4
    # lateral distance 1 on an 8x8 grid: each site + its 4-neighbours (fewer at borders)
    neighbours = sum(1 + (i > 0) + (i < 7) + (j > 0) + (j < 7) for i in range(8) for j in range(8))
    assert l2.lateral.nnz == neighbours * 8 * 8
    assert net.describe()[0]["ff_nonzeros"] == l1.ff.nnz
    # the dense view has the right shapes and the same non-zero count
    w1, _ = net.dense_weights()[0]
    assert w1.shape == (1024, 3 * 32 * 32)
    index, valid = receptive_fields(32, 32, stride=2, radius=4.0)
    assert int((w1 != 0).sum()) == 4 * 3 * int(valid.sum())


@pytest.mark.parametrize("lateral_rule", ["code", "scaled"])
def test_deep_update_matches_dense_rule(lateral_rule):
    net = small_net(gamma=0.25)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 64, dtype=torch.float64, generator=gen)
    r = torch.tanh(torch.randn(2, net.state_size, dtype=torch.float64, generator=gen))
    before = [(w.clone(), lat.clone()) for w, lat in net.dense_weights()]
    eta = 0.01
    deep_hebbian_update(net, x, r, eta, batch_rule="mean", lateral_rule=lateral_rule)
    after = net.dense_weights()
    pre = [x, *net.split(r)[:-1]]
    for p, ((w0, l0), (w1, l1), rp, xp) in enumerate(
        zip(before, after, net.split(r), pre, strict=True)
    ):
        kappa = 1 / 1.25 if p == 0 else 1.0  # hidden-layer lateral updates only
        mw, ml = (w0 != 0), (l0 != 0) | (l1 != 0)
        torch.testing.assert_close(w1, w0 + eta * (rp.T @ xp / 2 - w0) * mw)
        if lateral_rule == "scaled":
            expected = l0 + 0.5 * eta * kappa * (rp.T @ rp / 2 - l0) * ml
        else:  # the authors' code: 1/(1+γ) on the decay term only
            expected = l0 + 0.5 * eta * (rp.T @ rp / 2 - kappa * l0) * ml
        torch.testing.assert_close(l1, expected)
    assert net.lateral_scale(0) == pytest.approx(0.8) and net.lateral_scale(1) == 1.0


def test_bad_configs_name_the_value():
    with pytest.raises(ConfigError, match="gamma"):
        DeepHebbianNet((1, 8, 8), SPECS, gamma=-1)
    with pytest.raises(ConfigError, match="layer 2"):
        DeepHebbianNet((1, 8, 8), [LayerSpec(2, 2, 3.0), LayerSpec(2, 8, 2.0)])
    with pytest.raises(ConfigError, match="dwell"):
        InputStream(torch.zeros(3, 4), dwell=0, inputs_per_epoch=3)


def test_stream_carries_state_exactly_like_piecewise_euler():
    layer = HebbianLayer((1, 8, 8), nps=2, stride=2, radius=3.0).double()
    x = torch.randn(10, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    stream = InputStream(x, dwell=3, inputs_per_epoch=6, order="sequential")
    settler = stream.settler(layer, Euler(ConstantStep(0.1)), MaxSteps(100))
    monitor = SwitchMonitor(settler)
    Engine(settler, [monitor], progress=False).fit(stream, epochs=1)
    u = torch.zeros(1, layer.state_size, dtype=torch.float64)
    for i in range(6):
        d = layer.drive(x[i : i + 1])
        for _ in range(3):
            u = u + 0.1 * layer.field(u, d)
    torch.testing.assert_close(settler.state, u)
    assert monitor.steps == [3] * 6 and not any(monitor.settled)
    assert math.isnan(monitor.switch_residual[0]) and all(
        v > 0 for v in monitor.switch_residual[1:]
    )


@pytest.mark.parametrize("deep", [False, True])
def test_switch_monitor_records_settling_after_switch(deep):
    system = (
        small_net(gamma=0.2)
        if deep
        else HebbianLayer((1, 8, 8), nps=2, stride=2, radius=3.0).double()
    )
    x = torch.randn(20, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    stream = InputStream(x, dwell=400, inputs_per_epoch=8, n_streams=2, seed=1)
    settler = stream.settler(system, Euler(), stop_rule(1e-4, None))
    monitor = SwitchTraceMonitor(settler, keep=2)
    engine = Engine(settler, [monitor], progress=False).fit(stream, epochs=2)
    assert len(monitor.steps) == len(monitor.switch_residual) == 16
    assert all(monitor.settled) and all(r < 1e-4 for r in monitor.final_residual)
    assert len(monitor.traces) == 2 and len(monitor.traces[1]) >= 1
    log = engine.history[1]
    assert log["stream_dwell"] == 400 and log["fraction_settled_in_dwell"] == 1.0
    assert 0 < log["steps_after_switch_mean"] <= 400


def test_layer_monitor_and_deep_training_step():
    net = small_net(gamma=0.2).float()
    x = torch.randn(30, 64, generator=torch.Generator().manual_seed(6))
    stream = InputStream(x, dwell=2000, inputs_per_epoch=4)
    settler = stream.settler(net, Euler(), stop_rule(1e-4, 2000))
    settler.reset()
    layers = LayerMonitor(net, tol=1e-4)
    w_before = net.layers[1].ff.weight.clone()
    engine = Engine(settler, [layers, DeepSimilarityMatchingRule(net)], progress=False).fit(
        stream, epochs=1
    )
    assert not torch.equal(w_before, net.layers[1].ff.weight)
    log = engine.history[0]
    assert len(log["layer_mean_iterations"]) == 2 and len(log["layer_mean_residual"]) == 2
    assert all(r < 1e-3 for r in log["layer_mean_residual"])
    assert all(0 < s <= 2000 for steps in layers.layer_steps for s in steps)


@pytest.mark.slow
def test_cli_runs_two_layers_and_reports_each_layer(tmp_path, capsys):
    import json

    from dynsim.cli import main

    out = tmp_path / "deep.json"
    argv = (
        "run dssm --data digits --layers 2 --nps 4,2 --stride 2,1 --radius 3,1.5 --gamma 0.1 "
        "--max-steps 20 --epochs 1 --images-per-epoch 40 --eval-train-size 100 --eval-test-size 50 "
        "--stream-every 5 "
        f"--no-progress --out {out}"
    ).split()
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert len(result["final"]["layer_test_accuracy"]) == 2
    assert result["final"]["test_accuracy"] == result["final"]["layer_test_accuracy"][1]
    assert [layer["nps"] for layer in result["system"]["layers"]] == [4, 2]
    epoch = result["history"][0]
    assert len(epoch["layer_mean_iterations"]) == 2 and epoch["stream_dwell"] == 5
    assert main(argv[:-2] + ["--nps", "4,4,4", "--out", str(out)]) == 2
    assert "--nps has 3 values for 2 layer(s)" in capsys.readouterr().err


def test_one_explicit_step_from_rest_leaves_upper_layers_silent():
    """Why a 2-layer net read out after 1 step from rest is at chance (docs/deep.md study)."""
    net = small_net(gamma=0.5)
    x = torch.randn(3, 64, dtype=torch.float64)
    res = settle(net, x, solver=Euler(), stop=MaxSteps(1))
    r1, r2 = net.split(res.r)
    assert bool((r1 != 0).any()) and bool((r2 == 0).all())
    r1, r2 = net.split(settle(net, x, solver=Euler(), stop=MaxSteps(2)).r)
    assert bool((r2 != 0).any())


def test_stream_carry_r_is_one_euler_step_from_rest_with_carried_rates():
    """--stream-carry r (the report's code): u restarts at 0, the first step's lateral input uses
    the previous input's rates: u₁ = dt₀ (W x₂ − (L − I) tanh(u_prev)), computed here densely."""
    from dynsim.engine import Batch, DynamicsSettler
    from dynsim.solvers import Euler
    from dynsim.stopping import MaxSteps

    torch.manual_seed(0)
    layer = HebbianLayer((1, 8, 8), nps=2, stride=2, radius=3.0, tau=2.0)
    with torch.no_grad():
        layer.lateral.weight.add_(0.05 * torch.randn_like(layer.lateral.weight) * layer.lateral.mask)
    x = torch.randn(2, 64)
    for k in (1, 3):
        settler = DynamicsSettler(layer, Euler(), MaxSteps(k), stream_every=k, carry="r")
        first = settler(Batch(x=x[:1], y=None, index=torch.tensor([0]), epoch=0, number=0))
        second = settler(Batch(x=x[1:], y=None, index=torch.tensor([1]), epoch=0, number=1))
        w, lat = layer.dense_weights()
        dt0 = Euler().schedule(0)
        u1 = dt0 * (x[1:] @ w.T - torch.tanh(first.u) @ (lat - torch.eye(lat.shape[0])).T) / 2.0
        expected = u1
        for n in range(k - 1):  # then plain Euler steps (the schedule restarts at dt₀)
            f = (-expected + x[1:] @ w.T - torch.tanh(expected) @ (lat - torch.eye(lat.shape[0])).T) / 2.0
            expected = expected + Euler().schedule(n) * f
        torch.testing.assert_close(second.u, expected, atol=1e-5, rtol=1e-5)
        assert int(second.steps[0]) == k


def test_stream_carry_r_needs_fixed_step_solver():
    from dynsim.engine import DynamicsSettler
    from dynsim.errors import ConfigError
    from dynsim.solvers import SiteNewton
    from dynsim.stopping import MaxSteps

    layer = HebbianLayer((1, 8, 8), nps=2, stride=2, radius=3.0)
    with pytest.raises(ConfigError, match="fixed-step"):
        DynamicsSettler(layer, SiteNewton(), MaxSteps(3), stream_every=3, carry="r")
