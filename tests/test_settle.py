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
from dynsim.solvers.schedules import SEED_SCHEDULE, parse_schedule


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
