"""A plain batch-1 DSSM loop with dense matrices: the baseline of every speed claim.

This is DESIGN §2 written the way the authors' code runs: dense ``W`` (N × D) and ``L``
(N × N), one image at a time, forward Euler with the seed's schedule
``dt_n = max(0.2/(1+0.005 n), 0.05)``, stopping when the vector-field residual
``‖du/ds‖/‖u‖ < T`` (checked at the current state before each step, the same test as
``dynsim.RelativeChange(T, on="field")``) or at the cap, then the online update

    ΔW = η (r xᵀ − W) ⊙ mask_W,     ΔL = (η/2)(r rᵀ − L) ⊙ mask_L,     η_e = max(5e-3/(1+0.5e), 1e-4).

It takes its initial weights from ``HebbianLayer.dense_weights()`` and draws images with
the same generator as ``dynsim.builders.epoch_batches``, so runs are comparable
image by image. Neuron order is dynsim's site-major order (a permutation of the
authors' order; it changes nothing in the dynamics).
"""

from __future__ import annotations

import time

import numpy as np
import torch

SETTLED, MAX_STEPS = 1, 2


def seed_dt(n: int) -> float:
    return max(0.2 / (1.0 + 0.005 * n), 0.05)


def seed_eta(epoch: int) -> float:
    return max(5e-3 / (1.0 + 0.5 * epoch), 1e-4)


@torch.no_grad()
def reference_settle(W, L, x, *, tol=1e-4, cap=3000, lateral_sign=-1):
    """Settle one image ``x`` (D,); returns ``(u, steps, status, residual)``."""
    d = W @ x
    u = torch.zeros_like(d)
    eye_r = None
    for n in range(cap + 1):
        r = torch.tanh(u)
        eye_r = L @ r - r  # (L − I) r
        f = d - u + lateral_sign * eye_r
        res = float(torch.linalg.vector_norm(f)) / max(float(torch.linalg.vector_norm(u)), 1e-12)
        if res < tol:
            return u, n, SETTLED, res
        if n == cap:
            return u, n, MAX_STEPS, res
        u = u + seed_dt(n) * f
    raise AssertionError("unreachable")


@torch.no_grad()
def reference_train(W, L, mask_w, mask_l, x_train, *, epochs, images, seed=0, start_epoch=0,
                    tol=1e-4, cap=3000, lateral_sign=-1):
    """Online training in place on dense ``W``, ``L``; returns per-epoch (seconds, mean steps)."""
    history = []
    for epoch in range(start_epoch, epochs):
        eta = seed_eta(epoch)
        order = np.random.default_rng([seed, epoch]).integers(0, x_train.shape[0], size=images)
        t0, steps = time.perf_counter(), []
        for i in order:
            x = x_train[int(i)]
            u, n, _, _ = reference_settle(W, L, x, tol=tol, cap=cap, lateral_sign=lateral_sign)
            r = torch.tanh(u)
            W += eta * (torch.outer(r, x) - W) * mask_w
            L += 0.5 * eta * (torch.outer(r, r) - L) * mask_l
            steps.append(n)
        history.append({"epoch": epoch, "seconds": time.perf_counter() - t0, "mean_steps": float(np.mean(steps))})
    return history


def dense_masks(layer):
    """0/1 dense masks of the stored connections of a ``HebbianLayer``."""
    import copy

    probe = copy.deepcopy(layer)
    probe.ff.weight.copy_(probe.ff.mask.expand_as(probe.ff.weight))
    probe.lateral.weight.copy_(probe.lateral.mask.expand_as(probe.lateral.weight))
    mw, ml = probe.dense_weights()
    return (mw != 0).to(mw.dtype), (ml != 0).to(ml.dtype)


@torch.no_grad()
def load_dense(layer, W, L):
    """Copy dense ``W``, ``L`` (site-major rows, as :func:`reference_train` keeps them) into a
    single-channel ``HebbianLayer`` with lateral distance 0, so that the reference's weights
    can be read out with dynsim's evaluation (same settle test, same readout)."""
    if layer.input_shape[0] != 1 or not layer.lateral.is_identity_gather:
        raise ValueError("load_dense handles one input channel and lateral distance 0")
    s, m, k = layer.ff.weight.shape
    rows = (torch.arange(s)[:, None] * m + torch.arange(m)[None, :])  # (S, M)
    cols = layer.ff.index.clamp_max(W.shape[1] - 1)  # (S, K); padding masked below
    layer.ff.weight.copy_(W[rows[:, :, None], cols[:, None, :]] * layer.ff.mask)
    layer.lateral.weight.copy_(L[rows[:, :, None], rows[:, None, :]])
    return layer


if __name__ == "__main__":  # tiny demo: one epoch of 100 digits
    from dynsim.builders import build_layer, prepare_data
    from dynsim.pipelines.dssm import DSSMConfig

    cfg = DSSMConfig(data="digits")
    ds, xtr, _ = prepare_data(cfg)
    layer = build_layer(cfg, ds.image_shape)
    W, L = layer.dense_weights()
    mw, ml = dense_masks(layer)
    print(reference_train(W, L, mw, ml, torch.as_tensor(xtr), epochs=1, images=100))
