"""settle(): closed-form fixed points, per-sample stopping, caps, streaming, divergence."""

import pytest
import torch

from dynsim import (
    Batch,
    ConfigError,
    ConstantStep,
    DynamicsSettler,
    Euler,
    HebbianLayer,
    MaxSteps,
    RelativeChange,
    Status,
    settle,
)
from dynsim.solvers.step_sizes import SEED_SCHEDULE, parse_schedule


def linear_layer(sign=-1, seed=0):
    layer = HebbianLayer((1, 8, 8), nps=3, stride=2, radius=3.0, activation="linear", lateral_sign=sign, seed=seed)
    g = torch.Generator().manual_seed(seed)
    noise = 0.1 * torch.randn(layer.lateral.weight.shape, generator=g)
    noise = noise + noise.transpose(1, 2)  # symmetric lateral blocks, like the learned L
    layer.lateral.weight.add_(noise * layer.lateral.mask)
    return layer


@pytest.mark.parametrize("sign", [-1, 1])
def test_linear_fixed_point_matches_linalg_solve(sign):
    layer = linear_layer(sign)
    x = torch.randn(4, 64)
    res = settle(layer, x, solver=Euler(ConstantStep(0.2)), stop=RelativeChange(1e-6) | MaxSteps(20000))
    w, lat = layer.dense_weights()
    eye = torch.eye(layer.state_size)
    # 0 = −u + W x + s (L − I) u   <=>   (I − s (L − I)) u = W x
    u_star = torch.linalg.solve(eye - sign * (lat - eye), (x @ w.T).T).T
    assert res.converged.all()
    assert torch.allclose(res.u, u_star, atol=1e-5)
    assert (res.residual < 1e-6).all()


def test_step_schedule_seed_values():
    assert SEED_SCHEDULE(0) == pytest.approx(0.2)
    assert SEED_SCHEDULE(200) == pytest.approx(0.1)
    assert SEED_SCHEDULE(10_000) == pytest.approx(0.05)
    assert parse_schedule("constant:0.1")(7) == 0.1
    with pytest.raises(ConfigError):
        parse_schedule("wobbly")


def test_euler_first_step_by_hand():
    layer = linear_layer()
    x = torch.randn(1, 64)
    res = settle(layer, x, solver=Euler(ConstantStep(0.3)), stop=MaxSteps(1))
    # u1 = u0 + dt (−u0 + W x) with u0 = 0 (to float32 rounding: the compiled loop sums W x in its own order)
    assert torch.allclose(res.u, 0.3 * layer.drive(x), rtol=1e-5, atol=1e-6)
    assert res.steps.tolist() == [1] and res.status.tolist() == [Status.MAX_STEPS]


def test_per_sample_stopping_matches_solo_runs():
    layer = HebbianLayer((1, 8, 8), nps=4, stride=2, radius=3.0)
    layer.lateral.weight.add_(0.3 * torch.randn_like(layer.lateral.weight) * layer.lateral.mask)
    easy = torch.zeros(1, 64)  # u = 0 is already the fixed point: 0 steps
    hard = torch.randn(1, 64)
    stop = RelativeChange(1e-5) | MaxSteps(3000)
    both = settle(layer, torch.cat([easy, hard, hard]), solver=Euler(), stop=stop)
    solo = settle(layer, hard, solver=Euler(), stop=stop)
    assert both.steps[0] == 0 and both.steps[1] == solo.steps[0] > 10
    assert torch.allclose(both.u[1], solo.u[0], atol=1e-6)
    assert both.converged.all()


def test_cap_is_honoured_and_reported():
    layer = HebbianLayer((1, 8, 8), nps=4, stride=2, radius=3.0)
    res = settle(layer, torch.randn(3, 64), solver=Euler(), stop=RelativeChange(1e-12) | MaxSteps(7))
    assert res.steps.tolist() == [7, 7, 7]
    assert (res.status == Status.MAX_STEPS).all()
    zero_cap = settle(layer, torch.randn(2, 64), solver=Euler(), stop=MaxSteps(0))
    assert (zero_cap.u == 0).all() and zero_cap.steps.tolist() == [0, 0]


def test_increment_residual_is_dt_times_field():
    layer = HebbianLayer((1, 8, 8), nps=4, stride=2, radius=3.0)
    x = torch.randn(2, 64)
    field = settle(layer, x, solver=Euler(ConstantStep(0.1)), stop=RelativeChange(1e-3, on="field"))
    inc = settle(layer, x, solver=Euler(ConstantStep(0.1)), stop=RelativeChange(1e-3, on="increment"))
    # the increment test is the field test with T/dt: it stops earlier
    looser = settle(layer, x, solver=Euler(ConstantStep(0.1)), stop=RelativeChange(1e-2, on="field"))
    assert (inc.steps < field.steps).all()
    assert (inc.steps - looser.steps).abs().max() <= 1


def test_streaming_carries_state_and_switches_every_k_steps():
    layer = HebbianLayer((1, 8, 8), nps=4, stride=2, radius=3.0)
    settler = DynamicsSettler(layer, Euler(), RelativeChange(1e-9), stream_every=3)
    x1, x2 = torch.randn(1, 64), torch.randn(1, 64)
    b = lambda x, n: Batch(x=x, y=None, index=torch.tensor([n]), epoch=0, number=n)  # noqa: E731
    r1 = settler(b(x1, 0))
    r2 = settler(b(x2, 1))
    assert r1.steps.tolist() == [3] and r2.steps.tolist() == [3]
    expected = settle(layer, x2, solver=Euler(), stop=MaxSteps(3), u0=r1.u)
    assert torch.allclose(r2.u, expected.u)
    fresh = settle(layer, x2, solver=Euler(), stop=MaxSteps(3))
    assert not torch.allclose(r2.u, fresh.u)


def test_divergence_is_detected_per_sample():
    layer = HebbianLayer((1, 8, 8), nps=2, stride=2, radius=3.0, activation="linear", lateral_sign=1)
    layer.lateral.weight.mul_(3.0)  # du/ds = u + Wx: grows without bound
    x = torch.randn(2, 64)
    x[0] = 0  # stays at the fixed point 0
    res = settle(layer, x, solver=Euler(ConstantStep(0.5)), stop=RelativeChange(1e-6) | MaxSteps(10_000))
    assert res.status.tolist() == [Status.SETTLED, Status.DIVERGED]
    assert torch.isfinite(res.u).all()


def test_bad_input_shapes():
    layer = HebbianLayer((1, 8, 8), nps=2, stride=2, radius=3.0)
    with pytest.raises(ConfigError, match=r"\(batch, 64\)"):
        settle(layer, torch.randn(2, 63), solver=Euler(), stop=MaxSteps(3))
    with pytest.raises(ConfigError, match="u0"):
        settle(layer, torch.randn(2, 64), solver=Euler(), stop=MaxSteps(3), u0=torch.zeros(2, 5))
    with pytest.raises(ConfigError, match="threshold"):
        RelativeChange(0.0)
    with pytest.raises(ConfigError, match="threshold"):
        RelativeChange(-1e-4)
    with pytest.raises(ConfigError, match="cap"):
        MaxSteps(-1)


# --- any vector field f(t, u); absolute tolerance; systems as f(t, u) modules ---------------


def test_decay_settles_with_an_absolute_tolerance():
    """du/ds = −u from 1, Euler dt = 0.5: u_n = 0.5^n, ‖F‖ = ‖u‖, so ‖F‖ < atol + T‖u‖ first holds at
    n = ⌈log2((1 − T)/atol)⌉ = 20; with the relative test alone ‖F‖/‖u‖ = 1 until ‖u‖ drops
    under the 1e-12 floor of the norm, at ‖u‖ < 1e-16 (n = 54)."""
    from dynsim import ResidualBelow

    u0 = torch.ones(2, 1, dtype=torch.float64)
    u0[1] = 4.0  # ‖u0‖ = 4: two more halvings
    res = settle(lambda t, u: -u, u0=u0, solver=Euler(ConstantStep(0.5)),
                 stop=ResidualBelow(1e-4, atol=1e-6) | MaxSteps(200))
    assert res.status.tolist() == [Status.SETTLED] * 2
    assert res.steps.tolist() == [20, 22]
    torch.testing.assert_close(res.u[:, 0], torch.tensor([0.5**20, 4 * 0.5**22], dtype=torch.float64))
    assert torch.equal(res.r, res.u)  # a plain vector field reads out its state
    relative_only = settle(lambda t, u: -u, u0=u0, solver=Euler(ConstantStep(0.5)),
                           stop=ResidualBelow(1e-4) | MaxSteps(200))
    assert relative_only.steps.tolist() == [54, 56]


def test_vector_field_gets_the_time():
    """du/ds = 2s: Heun (trapezoid) is exact for a linear-in-time field, u(1) = 1 after 10 steps of 0.1."""
    from dynsim.solvers import Heun

    seen = []

    def f(t, u):
        seen.append(t)
        return 2 * t * torch.ones_like(u)

    res = settle(f, u0=torch.zeros(3, 2, dtype=torch.float64), solver=Heun(ConstantStep(0.1)), stop=MaxSteps(10))
    torch.testing.assert_close(res.u, torch.ones(3, 2, dtype=torch.float64))
    assert seen[:4] == pytest.approx([0.0, 0.1, 0.1, 0.2])


def test_module_field_runs_without_grad_unless_asked():
    """du/ds = −a u with a learnable a: Euler gives u_n = (1 − dt a)^n u0 and du_n/da = −n dt (1 − dt a)^(n−1) u0."""

    class Decay(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

        def forward(self, t, u):
            return -self.a * u

    f, u0, dt, n = Decay(), torch.ones(1, 1, dtype=torch.float64), 0.1, 5
    kwargs = {"u0": u0, "solver": Euler(ConstantStep(dt)), "stop": MaxSteps(n)}
    assert not settle(f, **kwargs).u.requires_grad
    res = settle(f, grad=True, **kwargs)
    torch.testing.assert_close(res.u, (1 - dt * 2.0) ** n * u0)
    res.u.sum().backward()
    assert float(f.a.grad) == pytest.approx(-n * dt * (1 - dt * 2.0) ** (n - 1))


def test_vector_field_bad_calls_name_the_problem():
    with pytest.raises(ConfigError, match="u0"):
        settle(lambda t, u: -u, solver=Euler(), stop=MaxSteps(3))
    with pytest.raises(ConfigError, match="no input x"):
        settle(lambda t, u: -u, torch.ones(1, 2), u0=torch.ones(1, 2), solver=Euler(), stop=MaxSteps(3))
    with pytest.raises(ConfigError, match="hold"):
        linear_layer()(0.0, torch.zeros(1, 48))


def test_layer_is_an_odeint_module():
    """torchdiffeq.odeint(layer.hold(x), u0, t) follows the linear layer's exact solution
    u(t) = u* + exp(−M t)(u0 − u*), M = I − s(L − I), u* = M⁻¹ W x, and tends to settle's fixed point."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    layer = linear_layer().double()
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    wd, ld = layer.dense_weights()
    eye = torch.eye(ld.shape[0], dtype=ld.dtype)
    m = eye - layer.lateral_sign * (ld - eye)
    ustar = torch.linalg.solve(m, (x @ wd.T).T).T
    u0 = torch.zeros_like(ustar)
    t = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)
    path = torchdiffeq.odeint(layer.hold(x), u0, t, rtol=1e-10, atol=1e-12)
    for i, ti in enumerate(t.tolist()):
        exact = ustar + (u0 - ustar) @ torch.linalg.matrix_exp(-m * ti).T
        torch.testing.assert_close(path[i], exact, rtol=1e-7, atol=1e-9)
    res = settle(layer, x, solver=Euler(ConstantStep(0.2)), stop=RelativeChange(1e-10) | MaxSteps(5000))
    far = torchdiffeq.odeint(layer, u0, torch.tensor([0.0, 60.0], dtype=torch.float64), rtol=1e-10, atol=1e-12)[-1]
    torch.testing.assert_close(far, res.u, rtol=1e-7, atol=1e-9)


def test_deep_network_is_an_odeint_module():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    from dynsim.systems.deep import DeepHebbianNet, LayerSpec

    net = DeepHebbianNet((1, 8, 8), [LayerSpec(2, 2, 3.0), LayerSpec(2, 1, 1.5)], gamma=0.2).double()
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    res = settle(net, x, solver=Euler(ConstantStep(0.2)), stop=RelativeChange(1e-10) | MaxSteps(20000))
    assert bool(res.converged.all())
    u0 = torch.zeros_like(res.u)
    far = torchdiffeq.odeint(net.hold(x), u0, torch.tensor([0.0, 80.0], dtype=torch.float64), rtol=1e-10,
                             atol=1e-12)[-1]
    torch.testing.assert_close(far, res.u, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(net(0.0, res.u), net.field(res.u, net.drive(x)))


def test_renamed_things_keep_their_old_names():
    """Deprecated aliases of renamed public names and modules point at the new objects."""
    import dynsim.plasticity.schedules as old_rates
    import dynsim.solvers.schedules as old_steps
    import dynsim.ssl.schedules as old_plans
    import dynsim.ssl.settler as old_settler
    from dynsim import ResidualBelow
    from dynsim.plasticity.learning_rates import DecayingRate
    from dynsim.ssl.signals import ContrastiveSignals
    from dynsim.ssl.stage_plans import StagePlanner

    assert RelativeChange is ResidualBelow
    assert old_steps.SEED_SCHEDULE is SEED_SCHEDULE and old_rates.DecayingRate is DecayingRate
    assert old_settler.ContrastiveSettler is ContrastiveSignals and old_plans.Schedule is StagePlanner
