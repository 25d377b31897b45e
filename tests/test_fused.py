"""The Engine's fused online backend (dynsim/fused.py) computes what the per-input loop computes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from dynsim.builders import build_layer, prepare_data
from dynsim.callbacks import Callback
from dynsim.configs.dssm import DSSMConfig
from dynsim.engine import DynamicsSettler, Engine, EpochDraws
from dynsim.errors import DivergenceError
from dynsim.monitors import SettlingMonitor
from dynsim.pipelines.dssm import run_dssm
from dynsim.plasticity import SimilarityMatchingRule
from dynsim.solvers import Euler, SiteNewton
from dynsim.stopping import MaxSteps, RelativeChange, Status, stop_rule


@pytest.fixture(scope="module")
def digits():
    cfg = DSSMConfig(data="digits")
    ds, xtr, _ = prepare_data(cfg)
    return build_layer(cfg, ds.image_shape), torch.as_tensor(xtr.astype(np.float32))


def train(layer0, x, *, fused, solver=None, stop=None, epochs=2, images=120, callbacks=(), progress=False, **settler):
    """Train a copy of ``layer0`` online; return (layer, monitor, engine)."""
    layer = copy.deepcopy(layer0)
    monitor = SettlingMonitor()
    settler = DynamicsSettler(layer, solver or SiteNewton(), stop or stop_rule(1e-4, 3000), **settler)
    engine = Engine(settler, [SimilarityMatchingRule(layer), monitor, *callbacks], progress=progress, fused=fused)
    with torch.no_grad():
        engine.fit(EpochDraws(x, images=images, batch_size=1, seed=0), epochs)
    return layer, monitor, engine


def assert_same_training(a, b, layer0):
    """Same per-input numbers; weights equal to float rounding, far inside the settling tolerance."""
    (la, ma, ea), (lb, mb, eb) = a, b
    np.testing.assert_array_equal(ma.iterations, mb.iterations)
    np.testing.assert_array_equal(ma.status, mb.status)
    assert [h["n_evals"] for h in ea.history] == [h["n_evals"] for h in eb.history]
    assert ea.images_seen == eb.images_seen and ea.batches_seen == eb.batches_seen
    for name in ("ff", "lateral"):
        wa, wb = getattr(la, name).weight, getattr(lb, name).weight
        moved = float((wb - getattr(layer0, name).weight).norm())
        assert moved > 0
        assert float((wa - wb).norm()) < 1e-4 * moved


@pytest.mark.parametrize("method", ["newton", "euler"])
def test_fused_epochs_equal_the_per_input_loop(digits, method):
    layer0, x = digits
    solver = SiteNewton() if method == "newton" else Euler()
    fused = train(layer0, x, fused=True, solver=solver)
    plain = train(layer0, x, fused=False, solver=solver)
    assert [h["online_backend"] for h in fused[2].history] == ["fused", "fused"]
    assert [h["online_backend"] for h in plain[2].history] == ["per-input", "per-input"]
    assert_same_training(fused, plain, layer0)
    assert fused[1].iterations.size == 240 and (fused[1].status == Status.SETTLED).all()


def test_fused_with_a_cap_that_fires_for_some_inputs(digits):
    layer0, x = digits
    stop = RelativeChange(1e-4) | MaxSteps(60)
    fused = train(layer0, x, fused=True, solver=Euler(), stop=stop)
    plain = train(layer0, x, fused=False, solver=Euler(), stop=stop)
    assert {int(Status.SETTLED), int(Status.MAX_STEPS)} <= set(fused[1].status.tolist())
    assert_same_training(fused, plain, layer0)


def test_progress_bar_chunks_give_the_same_weights(digits):
    """With a bar the epoch runs in chunks of 256 (W copied out and back between them): bit-identical."""
    layer0, x = digits
    one = train(layer0, x, fused=True, epochs=1, images=600)
    chunked = train(layer0, x, fused=True, epochs=1, images=600, progress=True)
    assert torch.equal(one[0].ff.weight, chunked[0].ff.weight)
    assert torch.equal(one[0].lateral.weight, chunked[0].lateral.weight)
    np.testing.assert_array_equal(one[1].iterations, chunked[1].iterations)


class CountInputs(Callback):
    def __init__(self):
        self.seen = []

    def on_settled(self, engine, batch, result):
        self.seen.extend(batch.index.tolist())


def test_a_callback_without_fused_form_keeps_every_input(digits):
    layer0, x = digits
    counter = CountInputs()
    _, _, engine = train(layer0, x, fused=True, epochs=1, images=50, callbacks=[counter])
    assert engine.history[0]["online_backend"] == "per-input"
    assert counter.seen == EpochDraws(x, images=50, batch_size=1, seed=0).order(0).tolist()


def test_a_subclass_that_overrides_the_rule_hook_keeps_the_per_input_path(digits):
    layer0, x = digits
    seen = []

    class Rule(SimilarityMatchingRule):
        def on_settled(self, engine, batch, result):
            seen.append(int(batch.index[0]))
            super().on_settled(engine, batch, result)

    layer = copy.deepcopy(layer0)
    engine = Engine(DynamicsSettler(layer, SiteNewton(), stop_rule(1e-4, 3000)), [Rule(layer)], progress=False)
    engine.fit(EpochDraws(x, images=30, batch_size=1, seed=0), 1)
    assert engine.history[0]["online_backend"] == "per-input" and len(seen) == 30

    monitor = SettlingMonitor()
    monitor.on_batch_end = lambda engine, batch, result: seen.append(-1)  # a hook set on the instance
    engine = Engine(DynamicsSettler(layer, SiteNewton(), stop_rule(1e-4, 3000)), [monitor], progress=False)
    engine.fit(EpochDraws(x, images=10, batch_size=1, seed=0), 1)
    assert engine.history[0]["online_backend"] == "per-input" and seen[-10:] == [-1] * 10


def test_batches_without_draws_or_batch_size_above_one_keep_the_per_input_path(digits):
    layer0, x = digits
    layer = copy.deepcopy(layer0)
    engine = Engine(DynamicsSettler(layer, SiteNewton(), stop_rule(1e-4, 3000)), [SimilarityMatchingRule(layer)],
                    progress=False)
    engine.fit(EpochDraws(x, images=20, batch_size=4, seed=0), 1)
    draws = EpochDraws(x, images=20, batch_size=1, seed=0)
    engine.fit(lambda epoch: draws(epoch), 2, start_epoch=1)  # a plain callable: no order()
    assert [h["online_backend"] for h in engine.history] == ["per-input", "per-input"]


def poisoned(x, position, epoch=0, images=40):
    """Data whose input drawn at ``position`` of ``epoch`` is scaled far past the divergence bound."""
    x = x.clone()
    order = EpochDraws(x, images=images, batch_size=1, seed=0).order(epoch)
    assert int(order[position]) not in order[:position].tolist()
    x[int(order[position])] *= 1e12
    return x


def test_divergence_raises_the_per_input_error_after_learning_the_inputs_before(digits):
    layer0, x = digits
    bad = poisoned(x, 7)
    errors, runs = [], []
    for fused in (True, False):
        with pytest.raises(DivergenceError) as info:
            runs.append(train(layer0, bad, fused=fused, epochs=1, images=40))
        errors.append(str(info.value))
    assert errors[0] == errors[1]
    assert "(epoch 0, batch 7)" in errors[0]


@pytest.mark.parametrize("fused", [True, False])
def test_divergence_skip_leaves_that_input_out(digits, fused):
    layer0, x = digits
    bad = poisoned(x, 7)
    layer, monitor, engine = train(layer0, bad, fused=fused, epochs=1, images=40, on_divergence="skip")
    assert monitor.status.tolist().count(int(Status.DIVERGED)) == 1 and monitor.status[7] == Status.DIVERGED
    assert engine.images_seen == 40
    ref = train(layer0, x, fused=False, epochs=1, images=7)[0]  # the 7 inputs before it, learned alike
    assert torch.isfinite(layer.ff.weight).all() and not torch.equal(layer.ff.weight, ref.ff.weight)


def test_skip_gives_the_same_numbers_on_both_paths(digits):
    layer0, x = digits
    bad = poisoned(x, 7)
    fused = train(layer0, bad, fused=True, epochs=1, images=40, on_divergence="skip")
    plain = train(layer0, bad, fused=False, epochs=1, images=40, on_divergence="skip")
    assert_same_training(fused, plain, layer0)


def test_streaming_carry_u_runs_fused_and_carries_the_state(digits):
    layer0, x = digits
    kw = dict(solver=Euler(), stop=RelativeChange(1e-4) | MaxSteps(3000), stream_every=10, epochs=2, images=60)
    fused = train(layer0, x, fused=True, **kw)
    plain = train(layer0, x, fused=False, **kw)
    assert [h["online_backend"] for h in fused[2].history] == ["fused", "fused"]
    assert fused[1].iterations.max() == 10  # the dwell caps each input
    assert_same_training(fused, plain, layer0)
    np.testing.assert_allclose(fused[2].settler.state.numpy(), plain[2].settler.state.numpy(), atol=1e-4)


def test_run_dssm_trains_on_the_fused_backend():
    result = run_dssm(DSSMConfig(data="digits", epochs=2, images_per_epoch=100, eval_every=0, checkpoint_every=0,
                                 progress=False, readout="ridge"))
    assert [h["online_backend"] for h in result["history"]] == ["fused", "fused"]
    assert len(result["iterations_per_input"]) == 200
    assert result["final"]["fraction_converged"] == 1.0
