"""The contrastive hinge loss of Tang, Yang & Amit (2022) and its top-layer error.

For embeddings ``z`` (B, D) of a batch and ``z'`` (B, D) of one deformed copy of each
image, with the L1 distance ``d_ij = ‖z_i − z'_j‖₁``::

    L = Σ_i w⁺ [d_ii − (τ − δ)]₊  +  Σ_{i≠j} w⁻ [(τ + δ) − d_ij]₊

Positives are pulled within τ − δ, negatives pushed beyond τ + δ. With all negatives
``w⁺ = w⁻ = 1``; with ``K`` negatives only the pairs (i, (i + k) mod B), k = 0..K−1, are
used (k = 0 is the positive) and the negatives are weighted ``w⁻ = 1/K``.

The error is local and simple: with ``c_ij = dL/dd_ij`` (``+w⁺`` for an active positive,
``−w⁻`` for an active negative, 0 otherwise)::

    dL/dz_i  =  Σ_j c_ij sign(z_i − z'_j)        dL/dz'_j = −Σ_i c_ij sign(z_i − z'_j)

With a gradient block the deformed branch is a constant: ``dL/dz' = 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynsim.errors import ConfigError


@dataclass
class HingeResult:
    """Loss value and the top-layer errors.

    Attributes
    ----------
    loss : scalar tensor, the sum above.
    err : (B, D) dL/dz.
    err_prime : (B, D) dL/dz' (zeros under a gradient block).
    """

    loss: torch.Tensor
    err: torch.Tensor
    err_prime: torch.Tensor


def check_hinge_settings(tau: float, delta: float, negatives: int | None) -> None:
    """Raise :class:`ConfigError` unless ``0 ≤ δ < τ`` and ``negatives`` is None or ≥ 1."""
    if not delta >= 0:
        raise ConfigError(f"delta = {delta} must be >= 0 (the margin around tau)")
    if not tau > delta:
        raise ConfigError(
            f"tau = {tau} must exceed delta = {delta}: positives are pulled within "
            f"tau - delta, which must be > 0 (e.g. tau=6, delta=3)"
        )
    if negatives is not None and (not isinstance(negatives, int) or negatives < 1):
        raise ConfigError(
            f"negatives = {negatives!r} must be an integer >= 1 (pairs (i, i+k), k < K), "
            f"or None for all negatives"
        )


def hinge_loss(
    z: torch.Tensor,
    z_prime: torch.Tensor,
    *,
    tau: float,
    delta: float,
    negatives: int | None = None,
    grad_block: bool = False,
) -> HingeResult:
    """Contrastive hinge loss with the L1 distance; returns the loss and dL/dz, dL/dz'.

    Parameters
    ----------
    z, z_prime : (B, D) embeddings of the images and of their deformed copies.
    tau, delta : thresholds, ``0 <= delta < tau``.
    negatives : ``None`` for all B − 1 negatives per image (weight 1), or K for the pairs
        (i, (i + k) mod B), k = 0..K−1 (weight 1/K for the negatives); ``K <= B``.
    grad_block : treat ``z_prime`` as a constant (its error is zero).

    Examples
    --------
    >>> z = torch.tensor([[0.0], [4.0]]); zp = torch.tensor([[1.0], [4.0]])
    >>> r = hinge_loss(z, zp, tau=3.0, delta=0.5)
    >>> float(r.loss)  # positives: |0-1| - (τ-δ) = 1 - 2.5 < 0; negatives: (τ+δ) - d = 3.5 - 4 < 0, 3.5 - 3 = 0.5
    0.5
    """
    check_hinge_settings(tau, delta, negatives)
    if z.shape != z_prime.shape or z.dim() != 2:
        raise ConfigError(f"z {tuple(z.shape)} and z' {tuple(z_prime.shape)} must both be (B, D)")
    z, z_prime = z.detach(), z_prime.detach()
    n = z.shape[0]
    if negatives is None:
        diff = z[:, None, :] - z_prime[None, :, :]  # (B, B, D): z_i - z'_j
        d = diff.abs().sum(-1)
        eye = torch.eye(n, dtype=torch.bool, device=z.device)
        pos = torch.clamp(d - (tau - delta), min=0)
        neg = torch.clamp((tau + delta) - d, min=0)
        loss = torch.where(eye, pos, neg).sum()
        c = torch.where(eye, (pos > 0).to(z.dtype), -(neg > 0).to(z.dtype))  # dL/dd_ij
        s = torch.sign(diff) * c[:, :, None]
        err, err_prime = s.sum(1), -s.sum(0)
    else:
        if negatives > n:
            raise ConfigError(f"negatives = {negatives} exceeds the batch size {n}; use K <= B")
        shifts = torch.arange(negatives, device=z.device)
        idx = (torch.arange(n, device=z.device)[:, None] + shifts[None, :]) % n  # (B, K)
        diff = z[:, None, :] - z_prime[idx]  # (B, K, D): z_i - z'_{i+k}
        d = diff.abs().sum(-1)
        w = torch.full((negatives,), 1.0 / negatives, dtype=z.dtype, device=z.device)
        w[0] = 1.0
        pos = torch.clamp(d[:, 0] - (tau - delta), min=0)
        neg = torch.clamp((tau + delta) - d[:, 1:], min=0)
        loss = pos.sum() + (neg * w[1:]).sum()
        c = torch.cat([(pos > 0).to(z.dtype)[:, None], -(neg > 0).to(z.dtype)], 1) * w
        s = torch.sign(diff) * c[:, :, None]  # (B, K, D)
        err = s.sum(1)
        err_prime = torch.zeros_like(z_prime).index_add_(
            0, idx.reshape(-1), -s.reshape(-1, z.shape[1])
        )
    if grad_block:
        err_prime = torch.zeros_like(err_prime)
    return HingeResult(loss, err, err_prime)
