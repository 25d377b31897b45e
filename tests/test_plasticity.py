"""Similarity-matching plasticity against a dense hand computation, and the engine's hooks."""

import pytest
import torch

from dynsim import Batch, Callback, DynamicsSettler, Engine, Euler, HebbianLayer, MaxSteps, RelativeChange
from dynsim.errors import ConfigError
from dynsim.plasticity import SEED_RATE, DecayingRate, SimilarityMatchingRule, hebbian_update


def test_seed_learning_rate_schedule():
    assert SEED_RATE(0) == pytest.approx(5e-3)
    assert SEED_RATE(2) == pytest.approx(2.5e-3)
    assert SEED_RATE(200) == pytest.approx(1e-4)  # floor
    with pytest.raises(ConfigError):
        DecayingRate(eta0=float("nan"))


@pytest.mark.parametrize("batch_rule,b", [("sum", 1), ("sum", 3), ("mean", 3)])
def test_update_equals_dense_formula(batch_rule, b):
    layer = HebbianLayer((1, 8, 8), nps=3, stride=2, radius=3.0, lateral_distance=1.0)
    w0, l0 = layer.dense_weights()
    mask_w = (w0 != 0).float()
    # structural mask of L: every stored entry (to_dense of the mask itself)
    layer.lateral.weight.copy_(layer.lateral.mask.expand_as(layer.lateral.weight).clone())
    mask_l = layer.lateral.to_dense(layer.n_sites).ne(0).float()
    layer.reset_parameters(0)
    x, r = torch.randn(b, 64), torch.tanh(torch.randn(b, layer.state_size))
    eta = 0.01
    hebbian_update(layer, x, r, eta, batch_rule=batch_rule)
    w1, l1 = layer.dense_weights()
    c = b if batch_rule == "sum" else 1
    w_expected = w0 + eta * c * (r.T @ x / b - w0) * mask_w
    l_expected = l0 + 0.5 * eta * c * (r.T @ r / b - l0) * mask_l
    assert torch.allclose(w1, w_expected, atol=1e-6)
    assert torch.allclose(l1, l_expected, atol=1e-6)
    assert (w1[mask_w == 0] == 0).all() and (l1[mask_l == 0] == 0).all()  # no weight outside the structure


def test_hooks_are_called_in_order_and_rule_updates_weights():
    layer = HebbianLayer((1, 8, 8), nps=2, stride=2, radius=3.0)
    events = []

    class Recorder(Callback):
        def on_fit_start(self, engine):
            events.append("fit_start")

        def on_epoch_start(self, engine, epoch):
            events.append(f"epoch_start{epoch}")

        def on_input(self, engine, batch):
            events.append("input")

        def on_settled(self, engine, batch, result):
            events.append("settled")

        def on_batch_end(self, engine, batch, result):
            events.append("batch_end")

        def on_epoch_end(self, engine, epoch):
            events.append(f"epoch_end{epoch}")
            engine.log(custom=epoch * 10)

        def on_fit_end(self, engine):
            events.append("fit_end")

    w_before = layer.ff.weight.clone()
    settler = DynamicsSettler(layer, Euler(), RelativeChange(1e-3) | MaxSteps(100))
    rule = SimilarityMatchingRule(layer)
    xs = torch.randn(4, 64)

    def batches(epoch):
        for i in range(2):
            yield Batch(x=xs[2 * i : 2 * i + 2], y=None, index=torch.arange(2), epoch=epoch, number=i)

    engine = Engine(settler, [rule, Recorder()], progress=False).fit(batches, 2)
    per_batch = ["input", "settled", "batch_end"]
    assert events == ["fit_start", "epoch_start0", *per_batch * 2, "epoch_end0",
                      "epoch_start1", *per_batch * 2, "epoch_end1", "fit_end"]
    assert engine.images_seen == 8 and engine.batches_seen == 4
    assert [h["custom"] for h in engine.history] == [0, 10]
    assert [h["learning_rate"] for h in engine.history] == [pytest.approx(5e-3), pytest.approx(5e-3 / 1.5)]
    assert not torch.equal(layer.ff.weight, w_before)


def test_should_stop_ends_training_early():
    layer = HebbianLayer((1, 8, 8), nps=2, stride=2, radius=3.0)

    class StopAfterOne(Callback):
        def on_batch_end(self, engine, batch, result):
            engine.should_stop = True

    xs = torch.randn(1, 64)
    batches = lambda e: (Batch(x=xs, y=None, index=torch.tensor([0]), epoch=e, number=i) for i in range(5))  # noqa: E731
    engine = Engine(DynamicsSettler(layer, Euler(), MaxSteps(2)), [StopAfterOne()], progress=False).fit(batches, 3)
    assert engine.batches_seen == 1 and len(engine.history) == 1
