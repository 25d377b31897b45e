"""Structured (locally connected) sparse linear maps, stored without the zeros.

A *site* is a point of a regular grid laid over the image; ``nps`` neurons sit at each
site and share its receptive field. The map from a grouped input ``x`` (B, S_in, G)
(``S_in`` groups of ``G`` features: pixels × channels, or sites × neurons) to the sites'
neurons ``y`` (B, S, M) is

    y[b, s, m] = Σ_k Σ_g  weight[s, m, k·G + g] · x[b, index[s, k], g]

where ``index[s, :]`` lists the (at most K) input groups site ``s`` sees, padded with a
dummy all-zero group. Storage is S × M × K·G numbers instead of a dense N × D matrix:
for 28×28 MNIST with NpS = 4 that is 196 × 4 × 52 instead of 784 × 784.

Geometry (Obeid, Ramambason & Pehlevan 2019, and their code): with stride ``t`` the sites
form an ``(H // t) × (W // t)`` grid; site ``(i, j)`` is centred at ``(t·i + t/2, t·j + t/2)``
in pixel coordinates, where pixel ``(k, l)`` sits at ``(k + 0.5, l + 0.5)``; a site sees every
pixel (all channels) whose centre lies within Euclidean distance ``radius`` of its own. Lateral connections join
sites whose grid distance ``‖(i, j) − (i', j')‖`` is at most ``lateral_distance``
(0: only the neurons of the same site, i.e. block-diagonal NpS × NpS blocks).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dynsim.errors import ConfigError


def site_grid(height: int, width: int, stride: int) -> tuple[int, int]:
    """Number of sites along each image axis: ``(height // stride, width // stride)``."""
    if stride < 1:
        raise ConfigError(f"stride must be a positive integer, got {stride}")
    rows, cols = height // stride, width // stride
    if rows < 1 or cols < 1:
        raise ConfigError(f"stride {stride} is larger than the {height}x{width} image")
    return rows, cols


def _pad_lists(lists: list[list[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ragged index lists into ``index`` (S, K) padded with ``pad_value`` and ``valid``."""
    k = max(len(item) for item in lists)
    index = torch.full((len(lists), k), pad_value, dtype=torch.long)
    valid = torch.zeros((len(lists), k), dtype=torch.bool)
    for s, item in enumerate(lists):
        index[s, : len(item)] = torch.tensor(item, dtype=torch.long)
        valid[s, : len(item)] = True
    return index, valid


def receptive_fields(
    height: int, width: int, *, stride: int, radius: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels seen by each site.

    Returns
    -------
    index : (S, K) long
        Flat pixel indices ``k·width + l``, padded with ``height·width``.
    valid : (S, K) bool
        Which entries of ``index`` are real pixels.
    """
    if radius <= 0 or not math.isfinite(radius):
        raise ConfigError(f"receptive-field radius must be a positive number, got {radius}")
    rows, cols = site_grid(height, width, stride)
    pix_r = torch.arange(height, dtype=torch.float64) + 0.5
    pix_c = torch.arange(width, dtype=torch.float64) + 0.5
    lists = []
    for i in range(rows):
        for j in range(cols):
            cr, cc = stride * i + stride / 2, stride * j + stride / 2
            d2 = (pix_r[:, None] - cr) ** 2 + (pix_c[None, :] - cc) ** 2
            inside = torch.nonzero(d2.flatten() <= radius**2 + 1e-9).flatten()
            lists.append(inside.tolist())
    if min(len(item) for item in lists) == 0:
        raise ConfigError(f"radius {radius} leaves some sites without any pixel; use radius >= {stride / 2}")
    return _pad_lists(lists, pad_value=height * width)


def lateral_neighbours(rows: int, cols: int, *, distance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sites within grid distance ``distance`` of each site (itself first).

    Returns ``index`` (S, K) of site numbers ``i·cols + j`` padded with ``S``, and ``valid``.
    """
    if distance < 0 or not math.isfinite(distance):
        raise ConfigError(f"lateral distance must be >= 0, got {distance}")
    lists = []
    for i in range(rows):
        for j in range(cols):
            near = [i * cols + j]
            for a in range(rows):
                for b in range(cols):
                    if (a, b) != (i, j) and (a - i) ** 2 + (b - j) ** 2 <= distance**2 + 1e-9:
                        near.append(a * cols + b)
            lists.append(near)
    return _pad_lists(lists, pad_value=rows * cols)


class SiteLinear(nn.Module):
    """Locally connected linear map ``(B, S_in, G) -> (B, S, M)`` without stored zeros.

    Parameters
    ----------
    index, valid : (S, K)
        Input groups seen by each output site (see :func:`receptive_fields`).
    group_size : int
        Features per input group ``G``.
    out_per_site : int
        Output neurons per site ``M``.

    Buffers
    -------
    weight : (S, M, K·G)
        The non-zero weights; entries of padded groups are kept at exactly zero.
    mask : (S, 1, K·G)
        1.0 where a weight exists, 0.0 at padding.
    """

    def __init__(self, index: torch.Tensor, valid: torch.Tensor, *, group_size: int, out_per_site: int):
        super().__init__()
        n_sites, k = index.shape
        self.group_size = group_size
        self.out_per_site = out_per_site
        self.register_buffer("index", index)
        mask = valid[:, :, None].expand(n_sites, k, group_size).reshape(n_sites, 1, k * group_size)
        self.register_buffer("mask", mask.to(torch.get_default_dtype()))
        self.register_buffer("weight", torch.zeros(n_sites, out_per_site, k * group_size))
        identity = torch.arange(n_sites)
        self.is_identity_gather = bool(k == 1 and torch.equal(index[:, 0], identity))

    @property
    def n_sites(self) -> int:
        return self.index.shape[0]

    @property
    def fan_in(self) -> torch.Tensor:
        """(S,) number of real inputs per output site."""
        return self.mask[:, 0, :].sum(dim=1)

    @property
    def nnz(self) -> int:
        """Number of stored non-zero weights (excluding padding)."""
        return int(self.mask.sum().item()) * self.out_per_site

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Presynaptic inputs per site: ``(B, S_in, G) -> (B, S, K·G)`` (padding reads zeros)."""
        b = x.shape[0]
        if self.is_identity_gather:
            return x
        padded = torch.nn.functional.pad(x, (0, 0, 0, 1))  # one all-zero group at the end
        return padded[:, self.index].reshape(b, self.n_sites, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y[b, s, m] = Σ_j weight[s, m, j] · gather(x)[b, s, j]``; shape (B, S, M)."""
        xg = self.gather(x)
        if xg.shape[0] == 1:  # batch 1 (online learning): one bmm, no transposes
            return torch.bmm(self.weight, xg[0].unsqueeze(-1)).reshape(1, self.n_sites, -1)
        return torch.bmm(xg.transpose(0, 1), self.weight.transpose(1, 2)).transpose(0, 1)

    def to_dense(self, n_in_groups: int) -> torch.Tensor:
        """Dense ``(S·M, S_in·G)`` matrix in site-major row order (for tests and references)."""
        s, m, kg = self.weight.shape
        g = self.group_size
        dense = torch.zeros(s, m, n_in_groups + 1, g, dtype=self.weight.dtype, device=self.weight.device)
        w = self.weight.reshape(s, m, -1, g)
        for k in range(self.index.shape[1]):
            dense[torch.arange(s), :, self.index[:, k], :] += w[:, :, k, :]
        return dense[:, :, :n_in_groups, :].reshape(s * m, n_in_groups * g)
