"""Conformance tests run over every registered solver, plus convergence orders."""

from __future__ import annotations

import math

import pytest
import torch

from dynsim import HebbianLayer, MaxSteps, RelativeChange, Status, compiled, settle
from dynsim.errors import ConfigError
from dynsim.solvers import SOLVERS, ConstantStep, FixedStepSolver, make_solver

torch.set_num_threads(1)

# options per registered solver for tight (float64) tolerances; a new solver must add a line
TIGHT = {
    "euler": {"schedule": ConstantStep(0.2)},
    "heun": {"schedule": ConstantStep(0.2)},
    "rk4": {"schedule": ConstantStep(0.2)},
    "dopri5": {"rtol": 1e-10, "atol": 1e-12},
    "anderson": {"beta": 0.5},
    "newton": {},
    "block": {},
    "torchdiffeq": {"rtol": 1e-10, "atol": 1e-12},
    "torchode": {"rtol": 1e-10, "atol": 1e-12},
}


def coupled_layer(activation: str, seed: int = 0) -> HebbianLayer:
    """An 8x8 layer in float64 with a non-trivial symmetric lateral matrix L = I + A."""
    layer = HebbianLayer(
        (1, 8, 8), nps=3, stride=2, radius=3.0, activation=activation, seed=seed
    ).double()
    gen = torch.Generator().manual_seed(seed + 1)
    w = layer.lateral.weight
    a = 0.25 * torch.randn(w.shape, generator=gen, dtype=w.dtype)
    a = 0.5 * (a + a.transpose(1, 2))
    with torch.no_grad():
        w += a
    return layer


def inputs(b: int = 5, seed: int = 3) -> torch.Tensor:
    return torch.randn(b, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_every_solver_has_tight_options():
    assert set(SOLVERS) == set(TIGHT)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_linear_fixed_point_matches_linalg_solve(name):
    layer = coupled_layer("linear")
    x = inputs()
    wd, ld = layer.dense_weights()
    n = ld.shape[0]
    # u = W x + s (L − I) u   =>   (I − s (L − I)) u = W x
    lhs = torch.eye(n, dtype=ld.dtype) - layer.lateral_sign * (ld - torch.eye(n, dtype=ld.dtype))
    expected = torch.linalg.solve(lhs, (x @ wd.T).T).T
    res = settle(
        layer,
        x,
        solver=make_solver(name, **TIGHT[name]),
        stop=RelativeChange(1e-9) | MaxSteps(3000),
    )
    assert bool(res.converged.all()), res.status
    assert float(res.residual.max()) < 1e-9
    rel = torch.linalg.vector_norm(res.u - expected, dim=1) / torch.linalg.vector_norm(
        expected, dim=1
    )
    assert float(rel.max()) < 1e-7


@pytest.fixture(scope="module")
def tanh_reference():
    layer = coupled_layer("tanh")
    x = inputs()
    ref = settle(
        layer,
        x,
        solver=make_solver("euler", schedule=ConstantStep(0.1)),
        stop=RelativeChange(1e-13) | MaxSteps(20000),
    )
    assert bool(ref.converged.all())
    return layer, x, ref.u


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_tanh_fixed_point_matches_reference(name, tanh_reference):
    layer, x, u_ref = tanh_reference
    res = settle(
        layer,
        x,
        solver=make_solver(name, **TIGHT[name]),
        stop=RelativeChange(1e-9) | MaxSteps(3000),
    )
    assert bool(res.converged.all()), res.status
    rel = torch.linalg.vector_norm(res.u - u_ref, dim=1) / torch.linalg.vector_norm(u_ref, dim=1)
    assert float(rel.max()) < 1e-7


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_per_sample_stopping(name):
    """A sample that starts at its fixed point stops at once; the others run on."""
    layer = coupled_layer("tanh")
    x = inputs(4)
    ref = settle(
        layer,
        x,
        solver=make_solver("euler", schedule=ConstantStep(0.2)),
        stop=RelativeChange(1e-11) | MaxSteps(5000),
    )
    u0 = torch.zeros_like(ref.u)
    u0[1] = ref.u[1]
    res = settle(
        layer,
        x,
        solver=make_solver(name, **TIGHT[name]),
        u0=u0,
        stop=RelativeChange(1e-8) | MaxSteps(3000),
    )
    assert res.status.tolist() == [Status.SETTLED] * 4
    assert int(res.steps[1]) == 0
    assert bool((res.steps[[0, 2, 3]] > 0).all())
    torch.testing.assert_close(res.u[1], ref.u[1])


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("cap", [0, 1, 3])
def test_cap_is_honoured_without_raising(name, cap):
    layer = coupled_layer("tanh")
    x = inputs(3)
    res = settle(
        layer,
        x,
        solver=make_solver(name, **TIGHT[name]),
        stop=RelativeChange(1e-12) | MaxSteps(cap),
    )
    assert res.steps.tolist() == [cap] * 3
    assert res.status.tolist() == [Status.MAX_STEPS] * 3
    assert torch.isfinite(res.residual).all()


def test_diverging_sample_reports_status():
    layer = coupled_layer("linear")
    x = inputs(2)
    res = settle(
        layer, x, solver=make_solver("euler", schedule=ConstantStep(5.0)), stop=MaxSteps(500)
    )
    assert res.status.tolist() == [Status.DIVERGED] * 2


class _Linear:
    """du/ds = A u + b with a known solution."""

    def __init__(self, d=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        m = torch.randn(d, d, generator=g, dtype=torch.float64)
        self.a = -torch.eye(d, dtype=torch.float64) + 0.3 * (m - m.T)
        self.b = torch.randn(d, generator=g, dtype=torch.float64)

    def __call__(self, u):
        return u @ self.a.T + self.b

    def exact(self, u0, t):
        ustar = -torch.linalg.solve(self.a, self.b)
        return ustar + (u0 - ustar) @ torch.linalg.matrix_exp(self.a * t).T


@pytest.mark.parametrize("name,order", [("euler", 1), ("heun", 2), ("rk4", 4)])
def test_convergence_order(name, order):
    ode = _Linear()
    u0 = torch.ones(2, 4, dtype=torch.float64)
    errors = []
    for steps in (20, 40, 80):
        solver = make_solver(name, schedule=ConstantStep(1.0 / steps))
        assert isinstance(solver, FixedStepSolver)
        u, state = u0, solver.init(ode, u0)
        for n in range(steps):
            u, _, state = solver.step(ode, u, state, n)
        errors.append(float((u - ode.exact(u0, 1.0)).abs().max()))
    slopes = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(s - order) < 0.2 for s in slopes), slopes


def test_dopri5_error_control_is_per_sample():
    """A stiff sample gets a small step; an easy one keeps a large step and is not held back."""
    scale = torch.tensor([[1.0], [50.0]], dtype=torch.float64)

    def field(u):
        return -scale * u

    solver = make_solver("dopri5", rtol=1e-6, atol=1e-9, dt0=0.5)
    u = torch.ones(2, 3, dtype=torch.float64)
    state = solver.init(field, u)
    for n in range(5):
        u, _, state = solver.step(field, u, state, n)
    assert float(state["dt"][1]) < float(state["dt"][0]) / 5


def test_bad_options_name_the_value():
    with pytest.raises(ConfigError, match="rtol"):
        make_solver("dopri5", rtol=-1.0, atol=1e-6)
    with pytest.raises(ConfigError, match="beta"):
        make_solver("anderson", beta=0.0)
    with pytest.raises(ConfigError, match="unknown solver"):
        make_solver("nope")


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_n_evals_counts_every_field_evaluation(name):
    """SettleResult.n_evals equals the rows actually evaluated (with the field residual, settle
    reuses the last step's evaluation as the returned state's residual: no extra check)."""
    layer = coupled_layer("tanh")
    x = inputs(4)
    rows = []
    original = layer.field

    def counting_field(u, drive):
        rows.append(u.shape[0])
        return original(u, drive)

    layer.field = counting_field
    original_newton = layer.newton_step

    def counting_newton(u, drive):  # newton evaluates F(u) (and its Jacobian) inside newton_step
        rows.append(u.shape[0])
        return original_newton(u, drive)

    layer.newton_step = counting_newton
    with compiled.disabled():  # count the torch path's calls (the compiled loop: tests/test_compiled.py)
        res = settle(
            layer, x, solver=make_solver(name, **TIGHT[name]), stop=RelativeChange(1e-6) | MaxSteps(50)
        )
    assert res.n_evals == sum(rows)
