"""Linear probe: a linear classifier trained on frozen features.

The features are standardised with the training mean and standard deviation (an affine
map, so the classifier stays linear in the representation), then one linear layer
``logits = f W + b`` (zero start) is trained with cross-entropy and Adam on mini-batches;
``seed`` fixes the batch order.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dynsim.errors import ConfigError, DataError


def _as_tensor(a, dtype) -> torch.Tensor:
    return (
        a.to(dtype) if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a), dtype=dtype)
    )


def fit_linear_probe(
    f_train: torch.Tensor | np.ndarray,
    y_train: torch.Tensor | np.ndarray,
    f_test: torch.Tensor | np.ndarray,
    y_test: torch.Tensor | np.ndarray,
    *,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int,
    seed: int,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict:
    """Train a linear classifier on frozen features and report accuracy.

    Parameters
    ----------
    f_train, f_test : (N, D) and (M, D) features.
    y_train, y_test : (N,) and (M,) integer labels in ``0..C−1``.
    epochs : passes over the training features.
    lr : Adam learning rate.
    batch_size : mini-batch size.
    seed : seeds the weights and the batch order.
    device : where to train.

    Returns
    -------
    dict with ``test_accuracy``, ``train_accuracy`` (fractions in [0, 1]), ``epochs``,
    ``n_features``, ``seconds``.

    Examples
    --------
    >>> f = torch.tensor([[0.0], [1.0], [2.0], [3.0]]); y = torch.tensor([0, 0, 1, 1])
    >>> fit_linear_probe(f, y, f, y, epochs=300, lr=0.1, batch_size=4, seed=0)["test_accuracy"]
    1.0
    """
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ConfigError(
            f"probe epochs = {epochs}, batch_size = {batch_size}, lr = {lr}: "
            f"all must be positive (e.g. epochs=20, batch_size=256, lr=1e-3)"
        )
    t0 = time.perf_counter()
    device = torch.device(device)
    xtr = _as_tensor(f_train, torch.float32).to(device).flatten(1)
    xte = _as_tensor(f_test, torch.float32).to(device).flatten(1)
    ytr = _as_tensor(y_train, torch.long).to(device)
    yte = _as_tensor(y_test, torch.long).to(device)
    if len(xtr) != len(ytr) or len(xte) != len(yte) or xtr.shape[1] != xte.shape[1]:
        raise DataError(
            f"feature/label shapes disagree: train {tuple(xtr.shape)} / {tuple(ytr.shape)}, "
            f"test {tuple(xte.shape)} / {tuple(yte.shape)}"
        )
    if not (torch.isfinite(xtr).all() and torch.isfinite(xte).all()):
        raise DataError("features contain NaN or Inf; the encoder diverged (lower the lr)")
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    n_classes = int(max(ytr.max(), yte.max())) + 1
    gen = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(xtr.shape[1], n_classes).to(device)
    with torch.no_grad():  # zero start: the fit does not depend on an init draw
        layer.weight.zero_()
        layer.bias.zero_()
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    for _ in tqdm(range(epochs), desc="probe", disable=not progress, leave=False):
        for idx in torch.randperm(len(xtr), generator=gen).to(device).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(layer(xtr[idx]), ytr[idx]).backward()
            opt.step()
    with torch.no_grad():
        acc_train = (layer(xtr).argmax(1) == ytr).float().mean().item()
        acc_test = (layer(xte).argmax(1) == yte).float().mean().item()
    return {
        "test_accuracy": acc_test,
        "train_accuracy": acc_train,
        "epochs": epochs,
        "n_features": int(xtr.shape[1]),
        "seconds": time.perf_counter() - t0,
    }
