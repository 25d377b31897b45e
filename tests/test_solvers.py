"""Conformance tests run over every registered solver, plus convergence orders."""

from __future__ import annotations

import math

import pytest
import torch

from dynsim import HebbianLayer, MaxSteps, Status, backend, compiled, settle
from dynsim import ResidualBelow as RelativeChange
from dynsim.errors import ConfigError
from dynsim.solvers import SOLVERS, ConstantStep, EmbeddedRK, ExplicitRK, FixedStepSolver, StepResult, make_solver

torch.set_num_threads(1)

# options for tight (float64) tolerances: by kind for the Runge–Kutta families (a new tableau
# needs nothing here), by name for the others (a new solver of another kind must add a line)
TIGHT_BY_NAME = {
    "anderson": {"beta": 0.5},
    "newton": {},
    "newton-cg": {},
    "block": {},
    "torchdiffeq": {"rtol": 1e-10, "atol": 1e-12},
    "torchode": {"rtol": 1e-10, "atol": 1e-12},
}


def tight(name: str) -> dict:
    cls = SOLVERS[name]
    if issubclass(cls, FixedStepSolver):
        return {"schedule": ConstantStep(0.2)}
    if issubclass(cls, EmbeddedRK):
        return {"rtol": 1e-10, "atol": 1e-12}
    return TIGHT_BY_NAME[name]


class _Tight(dict):
    def __missing__(self, name):
        return tight(name)


TIGHT = _Tight()
CAP = 10_000  # step cap of the conformance runs: room for a third-order adaptive pair at rtol 1e-10 (~4000 steps)


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
    for name in SOLVERS:
        assert isinstance(tight(name), dict), name


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
        stop=RelativeChange(1e-9) | MaxSteps(CAP),
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
        stop=RelativeChange(1e-9) | MaxSteps(CAP),
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
        stop=RelativeChange(1e-8) | MaxSteps(CAP),
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


class _TimeLinear:
    """du/ds = A u + b + cos(s)·v: time-dependent, with the exact solution of the linear
    autonomous system for z = (u, cos s, sin s, 1)."""

    def __init__(self, d=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        m = torch.randn(d, d, generator=g, dtype=torch.float64)
        self.a = -torch.eye(d, dtype=torch.float64) + 0.3 * (m - m.T)
        self.b = torch.randn(d, generator=g, dtype=torch.float64)
        self.v = torch.randn(d, generator=g, dtype=torch.float64)

    def __call__(self, u, t):
        return u @ self.a.T + self.b + math.cos(t) * self.v

    def exact(self, u0, t):
        d = self.a.shape[0]
        m = torch.zeros(d + 3, d + 3, dtype=torch.float64)
        m[:d, :d], m[:d, d], m[:d, d + 2] = self.a, self.v, self.b
        m[d, d + 1], m[d + 1, d] = -1.0, 1.0  # (cos)' = −sin, (sin)' = cos
        z0 = torch.cat([u0, torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64).expand(len(u0), 3)], dim=1)
        return (z0 @ torch.linalg.matrix_exp(m * t).T)[:, :d]


def _rk_orders():
    """(name, tableau weights, order) for every registered RK tableau: b, and b_low if embedded."""
    out = []
    for name, cls in sorted(SOLVERS.items()):
        tab = getattr(cls, "tableau", None)
        if tab is None:
            continue
        out.append((name, "b", tab.order))
        if tab.b_low is not None:
            out.append((name, "b_low", tab.low_order))
    return out


@pytest.mark.parametrize("name,weights,order", _rk_orders())
def test_convergence_order(name, weights, order):
    """Every Runge–Kutta tableau (and its embedded pair) reaches its order on a time-dependent linear ODE."""
    tab = SOLVERS[name].tableau
    if weights == "b_low":
        from dataclasses import replace

        tab = replace(tab, b=tab.b_low, order=tab.low_order, b_low=None, low_order=None)
    cls = type("FixedStep", (ExplicitRK,), {"name": "fixed", "tableau": tab})
    ode = _TimeLinear()
    u0 = torch.ones(2, 4, dtype=torch.float64)
    errors = []
    base = 10 if order >= 4 else 20
    for steps in (base, 2 * base, 4 * base):
        solver = cls(ConstantStep(1.0 / steps))
        u, state = u0, solver.init(ode, u0)
        for n in range(steps):
            u, _, state, evals = solver.step(ode, u, state, n)
        assert state == pytest.approx(1.0)  # the solver's time
        errors.append(float((u - ode.exact(u0, 1.0)).abs().max()))
    slopes = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(s - order) < 0.25 for s in slopes), slopes


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_step_returns_its_evaluations_and_leaves_the_solver_alone(name):
    """step returns StepResult with the exact number of field calls; the solver object is unchanged."""
    layer = coupled_layer("tanh")
    x = inputs(3)
    solver = make_solver(name, **TIGHT[name])
    before = {k: repr(v) for k, v in vars(solver).items()}
    from dynsim.settle import BoundField

    field = BoundField(layer, layer.drive(x))
    calls = []
    original = layer.field

    def counting_field(u, drive):
        calls.append(1)
        return original(u, drive)

    layer.field = counting_field
    u = torch.zeros(3, layer.state_size, dtype=torch.float64)
    state = solver.init(field, u)
    for n in range(3):
        calls.clear()
        out = solver.step(field, u, state, n)
        assert isinstance(out, StepResult)
        newton_type = name in ("newton", "newton-cg", "block")  # a Newton step counts as one evaluation
        expected = len(calls) if not newton_type or (n == 0 and solver.picard_start) else 1
        assert out.evals == expected, (n, out.evals, len(calls))
        u, state = out.u, out.state
    assert {k: repr(v) for k, v in vars(solver).items()} == before


def test_dopri5_error_control_is_per_sample():
    """A stiff sample gets a small step; an easy one keeps a large step and is not held back."""
    scale = torch.tensor([[1.0], [50.0]], dtype=torch.float64)

    def field(u):
        return -scale * u

    solver = make_solver("dopri5", rtol=1e-6, atol=1e-9, dt0=0.5)
    u = torch.ones(2, 3, dtype=torch.float64)
    state = solver.init(field, u)
    for n in range(5):
        u, _, state, _ = solver.step(lambda v, t: field(v), u, state, n)
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
    original_blocks = layer.jacobian_blocks

    def counting_blocks(u, drive):  # newton evaluates F(u) (and its Jacobian) in jacobian_blocks
        rows.append(u.shape[0])
        return original_blocks(u, drive)

    layer.jacobian_blocks = counting_blocks
    original_factors = layer.jacobian_factors

    def counting_factors(u, drive):  # newton-cg evaluates F(u) in jacobian_factors
        rows.append(u.shape[0])
        return original_factors(u, drive)

    layer.jacobian_factors = counting_factors
    with compiled.disabled():  # count the torch path's calls (the compiled loop: tests/test_compiled.py)
        res = settle(
            layer, x, solver=make_solver(name, **TIGHT[name]), stop=RelativeChange(1e-6) | MaxSteps(50)
        )
    assert res.n_evals == sum(rows)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_backends_agree(name, activation):
    """settle gives the same steps, statuses, evaluation counts and states with and without the
    compiled backend, for every solver (those without a compiled loop run the torch path twice)."""
    layer = coupled_layer(activation)
    x = inputs(4)
    u0 = torch.zeros(4, layer.state_size, dtype=torch.float64)
    u0[2] = 0.3
    for stop in (RelativeChange(1e-8) | MaxSteps(400), MaxSteps(5) | RelativeChange(1e-3),
                 RelativeChange(1e-8, atol=1e-3) | MaxSteps(400)):
        kwargs = {"solver": make_solver(name, **TIGHT[name]), "stop": stop, "u0": u0}
        fast = settle(layer, x, **kwargs)
        kernel = backend.compiled_settle(layer, x, u0, kwargs["solver"], stop.limits(), 1e6)
        # the compiled loop ran where it exists (newton-cg: dynsim.compiled_cg)
        assert (kernel is not None) == (name in ("euler", "newton", "newton-cg"))
        with compiled.disabled():
            ref = settle(layer, x, **kwargs)
        assert fast.steps.tolist() == ref.steps.tolist(), stop
        assert fast.status.tolist() == ref.status.tolist(), stop
        assert fast.n_evals == ref.n_evals, stop
        torch.testing.assert_close(fast.u, ref.u, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(fast.residual, ref.residual, rtol=1e-6, atol=1e-12)
