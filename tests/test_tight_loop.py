"""The tight NumPy baseline (benchmarks/tight_loop.py) computes what dynsim computes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dynsim import settle
from dynsim.builders import build_layer, epoch_batches, prepare_data
from dynsim.engine import DynamicsSettler, Engine
from dynsim.pipelines.dssm import DSSMConfig
from dynsim.plasticity import SimilarityMatchingRule
from dynsim.solvers import Euler
from dynsim.stopping import MaxSteps, RelativeChange, Status

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from tight_loop import MAX_STEPS, SETTLED, TightLoop  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    cfg = DSSMConfig(data="digits")
    ds, xtr, xte = prepare_data(cfg)
    return cfg, ds, xtr.astype(np.float32), xte.astype(np.float32)


def trained(cfg, ds, xtr, images=150):
    """A digits layer after ``images`` online updates (so that L ≠ I and settling takes many steps)."""
    layer = build_layer(cfg, ds.image_shape)
    engine = Engine(DynamicsSettler(layer, Euler(), RelativeChange(1e-3) | MaxSteps(500)),
                    [SimilarityMatchingRule(layer)], progress=False)
    with torch.no_grad():
        engine.fit(epoch_batches(torch.as_tensor(xtr), images=images, batch_size=1, seed=3), 1)
    return layer


@pytest.mark.parametrize("capped", [False, True])
def test_tight_settle_matches_dynsim_euler(digits, capped):
    cfg, ds, xtr, xte = digits
    layer = trained(cfg, ds, xtr)
    x = xte[:12]
    with torch.no_grad():
        cap = 3000
        if capped:  # a cap between the images' step counts: it fires for some images only
            free = settle(layer, torch.as_tensor(x), solver=Euler(), stop=RelativeChange(1e-4) | MaxSteps(3000))
            cap = int(np.median(free.steps.numpy()))
        res = settle(layer, torch.as_tensor(x), solver=Euler(), stop=RelativeChange(1e-4) | MaxSteps(cap))
    tight = TightLoop.from_layer(layer, cap=cap)
    for i in range(len(x)):  # batch 1
        n, status, residual = tight.settle(x[i])
        assert (n, status) == (int(res.steps[i]), int(res.status[i]))
        np.testing.assert_allclose(tight.rates_site_major(), res.r[i].numpy(), atol=2e-6, rtol=0)
        assert abs(residual - float(res.residual[i])) <= 1e-3 * float(res.residual[i]) + 1e-9
    u, steps, status, residual = tight.settle_batch(x)  # a batch, each image stopping on its own test
    np.testing.assert_array_equal(steps, res.steps.numpy())
    np.testing.assert_array_equal(status, res.status.numpy())
    np.testing.assert_allclose(u, res.u.numpy(), atol=2e-6, rtol=0)
    if capped:
        assert {SETTLED, MAX_STEPS} <= set(status.tolist())
    else:
        assert (status == Status.SETTLED).all() and np.ptp(steps) > 0


def test_tight_online_training_matches_dynsim(digits):
    """Same images, same initial weights, seed Euler, T = 1e-4: same steps per image and the same
    weights after 40 online updates (within float rounding, far inside the settling tolerance)."""
    cfg, ds, xtr, _ = digits
    layer = build_layer(cfg, ds.image_shape)
    tight = TightLoop.from_layer(layer)
    stop = RelativeChange(1e-4) | MaxSteps(3000)
    steps = []

    class Steps(SimilarityMatchingRule):
        def on_settled(self, engine, batch, result):
            steps.extend(result.steps.tolist())
            super().on_settled(engine, batch, result)

    engine = Engine(DynamicsSettler(layer, Euler(), stop), [Steps(layer)], progress=False)
    with torch.no_grad():
        engine.fit(epoch_batches(torch.as_tensor(xtr), images=20, batch_size=1, seed=0), 2)
    hist = tight.train(xtr, epochs=2, images=20, seed=0)
    assert [h["mean_steps"] for h in hist] == pytest.approx([np.mean(steps[:20]), np.mean(steps[20:])])
    w, lat = tight.weights()
    w0 = build_layer(cfg, ds.image_shape).ff.weight.numpy()
    moved = np.linalg.norm(layer.ff.weight.numpy() - w0)
    assert moved > 1e-2 * np.linalg.norm(w0)  # the updates did something
    assert np.linalg.norm(w - layer.ff.weight.numpy()) < 1e-4 * moved
    assert np.linalg.norm(lat - layer.lateral.weight.numpy()) < 1e-5 * np.linalg.norm(lat)
    assert not np.allclose(lat, np.eye(lat.shape[1])[None].repeat(lat.shape[0], 0), atol=1e-3)
