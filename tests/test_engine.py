"""The event loop's dispatch and the settling monitor's arrays (values, not "it ran")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynsim.callbacks import Callback
from dynsim.engine import Batch, Engine, _any_diverged
from dynsim.monitors import SettlingMonitor
from dynsim.settle import SettleResult
from dynsim.stopping import Status


def fake_batches(sizes_per_epoch):
    def batches(epoch):
        for number, b in enumerate(sizes_per_epoch):
            yield Batch(x=torch.zeros(b, 3), y=None, index=torch.arange(b), epoch=epoch, number=number)

    return batches


def fake_settler(steps_of):
    """A settler whose result has steps ``steps_of(batch)`` and status DIVERGED where steps < 0."""

    def settle(batch, on_step):
        s = torch.as_tensor(steps_of(batch), dtype=torch.long)
        st = torch.where(s < 0, int(Status.DIVERGED), int(Status.SETTLED)).to(torch.int8)
        z = torch.zeros(batch.size, 2)
        return SettleResult(u=z, r=z, steps=s.clamp_min(0), status=st, residual=torch.zeros(batch.size),
                            n_evals=int(s.clamp_min(0).sum()) + batch.size)

    return settle


def test_engine_calls_overridden_hooks_in_order_and_skips_the_rest():
    events = []

    class Rec(Callback):
        def __init__(self, name):
            self.name = name

        def on_input(self, engine, batch):
            events.append((self.name, "input", batch.epoch, batch.number))

        def on_settled(self, engine, batch, result):
            events.append((self.name, "settled", batch.epoch, batch.number))

    class EndOnly(Callback):
        def on_batch_end(self, engine, batch, result):
            events.append(("end", "batch_end", batch.epoch, batch.number))

    plain = Callback()  # overrides nothing: never dispatched per batch
    plain.on_batch_end = lambda engine, batch, result: events.append(("inst", "batch_end", batch.epoch, batch.number))
    engine = Engine(fake_settler(lambda b: [1] * b.size), [Rec("a"), EndOnly(), Rec("b"), plain], progress=False)
    engine.fit(fake_batches([2, 1]), 2)
    expected = []
    for e in range(2):
        for n in range(2):
            expected += [("a", "input", e, n), ("b", "input", e, n), ("a", "settled", e, n), ("b", "settled", e, n),
                         ("end", "batch_end", e, n), ("inst", "batch_end", e, n)]
    assert events == expected
    assert engine.images_seen == 6 and engine.batches_seen == 4


def test_settling_monitor_arrays_and_epoch_log():
    mon = SettlingMonitor(capacity=2)  # grows several times
    steps = {0: [[3], [5, 7], [2]], 1: [[4, 4, 9], [6]]}

    def steps_of(batch):
        return steps[batch.epoch][batch.number]

    def batches(epoch):
        for number, s in enumerate(steps[epoch]):
            yield Batch(x=torch.zeros(len(s), 3), y=None, index=torch.arange(len(s)), epoch=epoch, number=number)

    engine = Engine(fake_settler(steps_of), [mon], progress=False)
    engine.fit(batches, 2)
    assert mon.iterations.dtype == np.int64 and mon.iterations.tolist() == [3, 5, 7, 2, 4, 4, 9, 6]
    assert mon.status.tolist() == [1] * 8
    h0, h1 = engine.history
    assert (h0["mean_iterations"], h0["max_iterations"], h0["n_evals"]) == (pytest.approx(17 / 4), 7, 17 + 4)
    assert (h1["mean_iterations"], h1["max_iterations"], h1["fraction_converged"]) == (pytest.approx(23 / 4), 9, 1.0)
    again = SettlingMonitor()
    again.load_state_dict(mon.state_dict())
    assert again.iterations.tolist() == mon.iterations.tolist() and again.status.tolist() == mon.status.tolist()


def test_settling_monitor_counts_diverged():
    mon = SettlingMonitor()
    engine = Engine(fake_settler(lambda b: [2, -1, 3]), [mon], progress=False)
    engine.fit(fake_batches([3]), 1)
    assert mon.status.tolist() == [Status.SETTLED, Status.DIVERGED, Status.SETTLED]
    assert engine.history[0]["diverged"] == 1 and engine.history[0]["fraction_converged"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("b", [1, 64, 65, 1000])
def test_any_diverged_small_and_large_batches(b):
    status = torch.full((b,), int(Status.SETTLED), dtype=torch.int8)
    assert not _any_diverged(status)
    status[-1] = int(Status.MAX_STEPS)
    assert not _any_diverged(status)
    status[b // 2] = int(Status.DIVERGED)
    assert _any_diverged(status)
