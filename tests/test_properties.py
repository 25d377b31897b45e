"""Property-based tests: random shapes, thresholds, caps, step sizes and data thrown at the
public entry points (``settle``, ``DSSMConfig.validate``, the CLI parser). Each either works
or raises :class:`DynsimError` (or argparse's usage exit) -- never a crash from inside torch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from dynsim import ConstantStep, DynsimError, Euler, HebbianLayer, MaxSteps, RelativeChange, Status, settle
from dynsim.pipelines.dssm import DSSMConfig
from dynsim.stopping import stop_rule

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LAYER = HebbianLayer((1, 4, 4), nps=2, stride=2, radius=2.0)

floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10**6))
maybe_numbers = st.one_of(st.none(), numbers, st.text(max_size=3), st.booleans())


@st.composite
def inputs(draw):
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.lists(st.integers(0, 20), min_size=ndim, max_size=ndim)))
    if ndim == 2 and draw(st.booleans()):
        shape = (shape[0], 16)  # often the right width
    dtype = draw(st.sampled_from([np.float32, np.float64, np.int64, np.uint8, np.bool_, np.complex64]))
    n = int(np.prod(shape)) if shape else 1
    values = draw(st.lists(floats, min_size=n, max_size=n))
    with np.errstate(invalid="ignore", over="ignore"):
        arr = np.asarray(values, dtype=np.float64).reshape(shape)
        if dtype in (np.int64, np.uint8, np.bool_):
            arr = np.nan_to_num(arr, nan=0, posinf=1, neginf=-1).clip(-100, 100)
        arr = arr.astype(dtype)
    arr = np.asarray(arr)
    return torch.from_numpy(arr) if draw(st.booleans()) else arr


@SETTINGS
@given(x=inputs(), threshold=maybe_numbers, cap=maybe_numbers, dt=numbers, bound=numbers)
@example(x=np.zeros((0, 16), np.float32), threshold=1e-4, cap=10, dt=0.1, bound=1e6)  # empty batch
@example(x=np.zeros((0, 5), np.float32), threshold=1e-4, cap=10, dt=0.1, bound=1e6)
@example(x=np.array([["a"] * 16]), threshold=1e-4, cap=10, dt=0.1, bound=1e6)
@example(x=torch.ones(2, 16, dtype=torch.float64), threshold=1e-4, cap=10, dt=0.1, bound=1e6)
def test_settle_works_or_raises_dynsim_error(x, threshold, cap, dt, bound):
    try:
        stop = stop_rule(threshold, cap)
        if stop.max_steps is None or stop.max_steps > 300:
            stop = stop | MaxSteps(300)  # keep each example short
        solver = Euler(ConstantStep(dt))
        res = settle(LAYER, x, solver=solver, stop=stop, max_state_norm=bound)
    except DynsimError:
        return
    b = res.u.shape[0]
    assert res.u.shape == (b, LAYER.state_size) and res.steps.shape == res.status.shape == (b,)
    assert torch.isfinite(res.u).all()  # diverged samples keep their last finite state
    assert set(res.status.tolist()) <= {int(s) for s in Status}


SPECS = ["euler", "heun", "rk4", "dopri5", "dopri5,rtol=1e-3,atol=1e-6", "dopri5,rtol=abc", "anderson",
         "anderson,beta=2", "anderson,m=0", "heun,foo=1", "rk4,", ",", "torchdiffeq,rtol=1e-3", "nope"]


@SETTINGS
@given(spec=st.one_of(st.sampled_from(SPECS), st.text(max_size=8)), dt=numbers, cap=st.integers(-2, 80),
       scale=st.floats(-1e6, 1e6))
def test_every_solver_spec_works_or_raises_dynsim_error(spec, dt, cap, scale):
    from dynsim.solvers import solver_from_spec

    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0)) * scale
    try:
        solver = solver_from_spec(spec, schedule=f"constant:{dt}")
        res = settle(LAYER, x, solver=solver, stop=RelativeChange(1e-4) | MaxSteps(cap))
    except DynsimError:
        return
    assert torch.isfinite(res.u).all() and res.steps.shape == (3,)


@SETTINGS
@given(data=st.lists(st.floats(-1e3, 1e3, width=32), min_size=48, max_size=48),
       bad_row=st.integers(0, 2), bad=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_non_finite_input_names_the_sample(data, bad_row, bad):
    x = torch.tensor(data).reshape(3, 16)
    x[bad_row, 5] = bad
    with pytest.raises(DynsimError, match=rf"x\[{bad_row}\] contains"):
        settle(LAYER, x, solver=Euler(), stop=MaxSteps(5))


@SETTINGS
@given(dt=st.floats(1e-3, 50), scale=st.floats(0.1, 1e4), gain=st.floats(-50, 50))
def test_dynamics_either_settle_stop_or_diverge_marked(dt, scale, gain):
    layer = HebbianLayer((1, 4, 4), nps=2, stride=2, radius=2.0, activation="linear")
    layer.lateral.weight.mul_(gain)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0)) * scale
    res = settle(layer, x, solver=Euler(ConstantStep(dt)), stop=RelativeChange(1e-4) | MaxSteps(200))
    assert torch.isfinite(res.u).all()
    assert ((res.status == Status.DIVERGED) | (res.status == Status.SETTLED) | (res.status == Status.MAX_STEPS)).all()


per_layer = st.one_of(maybe_numbers, st.lists(maybe_numbers, max_size=3))  # deep: one value per layer
CONFIG_VALUES = {
    "nps": per_layer, "stride": per_layer, "radius": per_layer, "lateral_distance": per_layer,
    "layers": maybe_numbers,
    "lateral_sign": maybe_numbers, "tau": maybe_numbers, "threshold": maybe_numbers, "max_steps": maybe_numbers,
    "stream_every": maybe_numbers, "epochs": maybe_numbers, "images_per_epoch": maybe_numbers,
    "batch_size": maybe_numbers, "eta0": maybe_numbers, "eta_decay": maybe_numbers, "eta_min": maybe_numbers,
    "eval_every": maybe_numbers, "eval_batch_size": maybe_numbers, "eval_train_size": maybe_numbers,
    "seed": maybe_numbers, "threads": maybe_numbers, "checkpoint_every": maybe_numbers,
    "schedule": st.one_of(st.sampled_from(["seed", "constant:0.1", "constant:-1", "constant:nan",
                                           "decaying:0.2,0.005,0.05", "decaying:1", "x:y"]), st.text(max_size=8)),
    "solver": st.one_of(st.just("euler"), st.text(max_size=6), st.integers()),
    "activation": st.one_of(st.sampled_from(["tanh", "linear", "relu"]), st.text(max_size=5), st.none()),
    "device": st.one_of(st.sampled_from(["cpu", "cuda", "cuda:7", "tpu", "meta", ""]), st.text(max_size=5)),
    "residual": st.sampled_from(["field", "increment", "both"]),
    "batch_rule": st.sampled_from(["sum", "mean", "max"]),
    "readout": st.sampled_from(["svc", "ridge", "knn"]),
    "on_divergence": st.sampled_from(["raise", "skip", "ignore"]),
    "data": st.sampled_from(["digits", "mnist", "imagenet"]),
    "out": st.one_of(st.none(), st.just(""), st.just("/"), st.just("runs/x.json"), st.integers()),
}


@SETTINGS
@given(st.fixed_dictionaries({}, optional=CONFIG_VALUES))
def test_config_validate_works_or_raises_config_error(values):
    try:
        DSSMConfig(**values).validate()
    except DynsimError:
        pass


PLAUSIBLE = {
    "nps": st.integers(1, 6), "stride": st.one_of(st.none(), st.integers(1, 12)),
    "radius": st.one_of(st.none(), st.floats(1e-3, 30)), "lateral_distance": st.floats(0, 12),
    "lateral_sign": st.sampled_from([-1, 1]), "tau": st.floats(1e-3, 100),
    "threshold": st.one_of(st.none(), st.floats(1e-12, 10)), "max_steps": st.integers(0, 60),
    "activation": st.sampled_from(["tanh", "linear", "relu"]),
    "schedule": st.sampled_from(["seed", "constant:0.1", "constant:5", "decaying:2,0.1,0.001"]),
}


@SETTINGS
@given(st.fixed_dictionaries({}, optional=PLAUSIBLE))
def test_valid_config_builds_a_layer_that_settles(values):
    """Whatever validate() accepts must build a network and settle a digit without crashing."""
    from dynsim.builders import build_layer
    from dynsim.solvers import solver_from_spec

    values = {k: v for k, v in values.items() if k not in ("data", "device")}
    try:
        cfg = DSSMConfig(**values).validate()
    except DynsimError:
        assume(False)
    try:
        layer = build_layer(cfg, (1, 8, 8))
    except DynsimError:
        return  # geometry refused with our error type
    solver = solver_from_spec(cfg.resolved_solver(), schedule=cfg.schedule)
    stop = stop_rule(cfg.threshold, min(cfg.max_steps or 50, 50))
    res = settle(layer, torch.randn(2, 64), solver=solver, stop=stop)
    assert res.u.shape == (2, layer.state_size)


FLAGS = ["--nps", "--stride", "--radius", "--lateral-distance", "--lateral-sign", "--threshold", "--max-steps",
         "--stream-every", "--epochs", "--images-per-epoch", "--batch-size", "--eta0", "--eta-decay", "--eta-min",
         "--eval-every", "--eval-train-size", "--eval-test-size", "--eval-batch-size", "--seed", "--threads",
         "--schedule", "--solver", "--activation", "--device", "--residual", "--batch-rule", "--readout",
         "--on-divergence", "--checkpoint-every", "--data"]
token = st.one_of(st.sampled_from(["0", "-1", "1", "2", "1e-4", "nan", "inf", "none", "-inf", "3.5", "tanh",
                                   "cuda", "constant:0", "", "1e309", "99999999999999999999"]),
                  st.text(max_size=4))


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(FLAGS), token), max_size=4))
def test_cli_parser_and_validation(pairs):
    """The parser either exits with argparse's usage error (status 2) or yields a config that
    validates or raises our error: ``main`` would print 'dynsim: error: ...' and exit 2."""
    from dynsim.cli import build_parser
    from dynsim.cli.common import SettingRefused
    from dynsim.cli.dssm import config_from_args

    argv = ["run", "dssm", "--out", "x.json"]
    for flag, value in pairs:
        argv.append(f"{flag}={value}")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        assert exc.code == 2
        return
    except SettingRefused as exc:  # a value its setting's description refuses: main prints it, exit 2
        assert isinstance(exc.error, DynsimError) and "\n" not in str(exc)
        return
    try:
        config_from_args(args).validate()
    except DynsimError:
        pass


def test_input_takes_the_systems_dtype():
    layer = HebbianLayer((1, 4, 4), nps=2, stride=2, radius=2.0).double()
    for x in (torch.randn(2, 16), np.ones((2, 16), dtype=np.int64), torch.randn(2, 16, dtype=torch.float64)):
        assert settle(layer, x, solver=Euler(), stop=MaxSteps(3)).u.dtype == torch.float64
    assert settle(LAYER, torch.randn(2, 16, dtype=torch.float64), solver=Euler(), stop=MaxSteps(3)).u.dtype \
        == torch.float32


@pytest.mark.parametrize("spec", ["euler", "heun", "rk4"])
def test_a_step_at_the_float32_maximum_is_a_result_not_a_torch_error(spec):
    """Found by the property test above: ``torch.add(..., alpha=h)`` refuses an ``h`` at the edge of
    float32's range; the step then overflows like any other (finite state kept, a status given)."""
    from dynsim.solvers import solver_from_spec

    solver = solver_from_spec(spec, schedule="constant:3.402823466385289e+38")
    for x in (torch.zeros(3, 16), torch.ones(3, 16)):
        res = settle(LAYER, x, solver=solver, stop=RelativeChange(1e-4) | MaxSteps(1))
        assert torch.isfinite(res.u).all() and set(res.status.tolist()) <= {int(s) for s in Status}
