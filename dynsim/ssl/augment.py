"""Batch-wise random deformations on tensors (no torchvision), seeded by a generator.

Per image (Tang et al. 2022, CIFAR settings):

- random affine: each of the 6 entries of ``θ = [[1, 0, 0], [0, 1, 0]]`` gets
  ``U(−s, s)`` added, the two translations ``U(−2s, 2s)``, ``s = 0.2``; sampled with
  ``F.affine_grid``/``F.grid_sample`` (bilinear, zero padding; coordinates in [−1, 1]);
- horizontal flip with probability 0.5 (when ``flip``);
- colour images only: saturation ``x ← g + 2^u (x − g)``, ``u ~ U(−2, 2)``, ``g`` the grey
  level; hue rotation by ``2π·h``, ``h ~ U(−0.05, 0.05)``, in YIQ space; clamp to [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


@dataclass(frozen=True)
class Deform:
    """Random deformation settings; call it on a batch.

    Attributes
    ----------
    affine : half-width ``s`` of the uniform perturbation of the affine matrix (0 = off).
    flip : flip horizontally with probability 0.5.
    saturation : ``u`` range for the ``2^u`` saturation factor (colour images; 0 = off).
    hue : half-width of the hue shift, in turns (colour images; 0 = off).

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> Deform()(torch.rand(4, 3, 8, 8), g).shape
    torch.Size([4, 3, 8, 8])
    """

    affine: float = 0.2
    flip: bool = True
    saturation: float = 2.0
    hue: float = 0.05

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Deform a batch ``x`` (B, C, H, W) with values in [0, 1]; returns a new tensor."""
        n, c = x.shape[:2]

        def uniform(*shape: int, half: float) -> torch.Tensor:
            u = torch.rand(*shape, generator=generator)
            return ((2 * u - 1) * half).to(x.device, x.dtype)

        out = x
        if self.affine > 0:
            theta = torch.eye(2, 3, dtype=x.dtype, device=x.device).repeat(n, 1, 1)
            scale = torch.tensor([1.0, 1.0, 2.0], dtype=x.dtype, device=x.device)
            theta = theta + uniform(n, 2, 3, half=self.affine) * scale
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            out = F.grid_sample(
                out, grid, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        if self.flip:
            flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
            out = torch.where(flip[:, None, None, None], out.flip(-1), out)
        if c == 3 and self.saturation > 0:
            factor = 2.0 ** uniform(n, 1, 1, 1, half=self.saturation)
            grey = (out * _RGB_TO_YIQ[0].to(out)[None, :, None, None]).sum(1, keepdim=True)
            out = grey + factor * (out - grey)
        if c == 3 and self.hue > 0:
            out = rotate_hue(out, uniform(n, half=self.hue))
        return out.clamp(0.0, 1.0) if c == 3 else out


def rotate_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma (I, Q) of RGB images (B, 3, H, W) by ``2π·turns`` (B,)."""
    m = _RGB_TO_YIQ.to(x)
    yiq = torch.einsum("ij,bjhw->bihw", m, x)
    a = 2 * math.pi * turns
    cos, sin = torch.cos(a)[:, None, None], torch.sin(a)[:, None, None]
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], 1)
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(m), yiq)
