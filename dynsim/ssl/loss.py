"""The contrastive hinge loss of Tang, Yang & Amit (2022) and its top-layer error.

For embeddings ``z`` (B, D) of a batch and ``z'`` (B, D) of one deformed copy of each
image, with the L1 distance ``d_ij = ‖z_i − z'_j‖₁``::

    L = Σ_i w⁺ [d_ii − (τ − δ)]₊  +  Σ_{i≠j} w⁻ [(τ + δ) − d_ij]₊

Positives are pulled within τ − δ, negatives pushed beyond τ + δ. With all negatives
``w⁺ = w⁻ = 1``; with ``K`` negatives only the offset diagonals k = 0..K−1 of the B x B pair
matrix are used — the pairs (i, i + k) with i + k < B, so diagonal k has B − k pairs (k = 0 is
the positive) — and the negatives are weighted ``w⁻ = 1/K``. That is the authors' code
(``get_embedd_loss_new`` with ``future = K`` in Tang, Yang & Amit's ``losses.py``:
``torch.diagonal(OUT, k)``, no wrap-around); ``wrap=True`` is the earlier dynsim variant with
the pairs (i, (i + k) mod B), B pairs per diagonal.

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
    wrap: bool = False,
) -> HingeResult:
    """Contrastive hinge loss with the L1 distance; returns the loss and dL/dz, dL/dz'.

    Parameters
    ----------
    z, z_prime : (B, D) embeddings of the images and of their deformed copies.
    tau, delta : thresholds, ``0 <= delta < tau``.
    negatives : ``None`` for all B − 1 negatives per image (weight 1), or K for the offset
        diagonals k = 0..K−1, pairs (i, i + k) with i + k < B (weight 1/K for the
        negatives); ``K <= B``.
    grad_block : treat ``z_prime`` as a constant (its error is zero).
    wrap : with K negatives, the pairs (i, (i + k) mod B) instead (B pairs per diagonal).

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
        d = torch.cdist(z, z_prime, p=1)  # (B, B), without a second pass over diff
        eye = torch.eye(n, dtype=torch.bool, device=z.device)
        pos = torch.clamp(d - (tau - delta), min=0)
        neg = torch.clamp((tau + delta) - d, min=0)
        loss = torch.where(eye, pos, neg).sum()
        c = torch.where(eye, (pos > 0).to(z.dtype), -(neg > 0).to(z.dtype))  # dL/dd_ij
        s = diff.sign_()  # in place: the (B, B, D) tensor is the one large allocation
        err = torch.bmm(c[:, None, :], s).squeeze(1)  # Σ_j c_ij sign(z_i − z'_j)
        err_prime = -torch.einsum("ij,ijd->jd", c, s)
    else:
        if negatives > n:
            raise ConfigError(f"negatives = {negatives} exceeds the batch size {n}; use K <= B")
        ii, jj, k = offset_pairs(n, negatives, wrap=wrap, device=z.device)
        diff = z[ii] - z_prime[jj]  # (P, D): z_i - z'_{i+k}
        d = diff.abs().sum(-1)
        w = torch.where(k == 0, 1.0, 1.0 / negatives).to(z.dtype)
        pos = torch.clamp(d - (tau - delta), min=0)
        neg = torch.clamp((tau + delta) - d, min=0)
        is_pos = k == 0
        loss = (torch.where(is_pos, pos, neg) * w).sum()
        c = torch.where(is_pos, (pos > 0).to(z.dtype), -(neg > 0).to(z.dtype)) * w
        s = torch.sign(diff) * c[:, None]  # (P, D)
        err = torch.zeros_like(z).index_add_(0, ii, s)
        err_prime = torch.zeros_like(z_prime).index_add_(0, jj, -s)
    if grad_block:
        err_prime = torch.zeros_like(err_prime)
    return HingeResult(loss, err, err_prime)


def offset_pairs(
    n: int, negatives: int, *, wrap: bool = False, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pairs of the K offset diagonals: indices ``i``, ``j = i + k`` and the offset ``k``.

    Without wrap-around (the authors') diagonal k holds the B − k pairs (i, i + k),
    i = 0..B−k−1; with ``wrap`` it holds the B pairs (i, (i + k) mod B).

    >>> [t.tolist() for t in offset_pairs(3, 2)]
    [[0, 1, 2, 0, 1], [0, 1, 2, 1, 2], [0, 0, 0, 1, 1]]
    >>> [t.tolist() for t in offset_pairs(3, 2, wrap=True)]
    [[0, 1, 2, 0, 1, 2], [0, 1, 2, 1, 2, 0], [0, 0, 0, 1, 1, 1]]
    """
    ii, jj, kk = [], [], []
    for k in range(negatives):
        i = torch.arange(n if wrap else n - k, device=device)
        ii.append(i)
        jj.append((i + k) % n)
        kk.append(torch.full_like(i, k))
    return torch.cat(ii), torch.cat(jj), torch.cat(kk)
