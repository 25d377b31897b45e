"""Single-layer structured Hebbian network (similarity matching; Obeid, Ramambason & Pehlevan 2019).

    τ du/ds = −u + W x + s·(L − I) r,      r = f(u)

``W`` (N × D_in) is locally connected (each site sees a disc of pixels), ``L`` (N × N)
connects neurons of nearby sites (same site only, by default), and ``s`` is the lateral
sign: ``s = −1`` is the authors' lateral inhibition (the similarity-matching default),
``s = +1`` the form printed in the reproduction report. Both matrices are stored without
their zeros (:class:`~dynsim.systems.structure.SiteLinear`).

Neuron order is **site-major**: neuron ``n`` of site ``s`` is entry ``s·nps + n`` of the
state (the authors' code uses ``n·S + s``; use :meth:`HebbianLayer.to_site_minor` to
convert). Inputs are flat images ``(B, C·H·W)`` in channel-major (torch) order.
"""

from __future__ import annotations

import math

import torch

from dynsim.errors import ConfigError
from dynsim.systems.base import System, activation_fn
from dynsim.systems.structure import SiteLinear, lateral_neighbours, receptive_fields, site_grid


def _tanh_and_slope(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.tanh(u)
    return r, 1.0 - r * r


def _linear_and_slope(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return u, torch.ones_like(u)


def _relu_and_slope(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.relu(u), (u > 0).to(u.dtype)


_DERIVATIVES = {"tanh": _tanh_and_slope, "linear": _linear_and_slope, "relu": _relu_and_slope}


class HebbianLayer(System):
    """A structured Hebbian layer.

    Parameters
    ----------
    input_shape : (C, H, W)
        Shape of one input image.
    nps : int
        Neurons per site (NpS).
    stride : int
        Site spacing in pixels.
    radius : float
        Receptive-field radius in pixels (Euclidean, centre to pixel centre).
    lateral_distance : float
        Lateral connections join sites at most this far apart on the site grid (0: same site).
    lateral_sign : {-1, +1}
        ``s`` in the equation above.
    activation : str
        Rate function ``f``: ``tanh``, ``linear`` or ``relu``.
    tau : float
        Time constant τ (time units of the solver's ``s``).
    seed : int
        Seed of the initial weights ``W = mask ⊙ N(0, 1) / sqrt(mean fan-in)``, ``L = I``.

    Examples
    --------
    >>> layer = HebbianLayer((1, 28, 28), nps=4, stride=2, radius=4.0)
    >>> layer.state_size, layer.ff.nnz, layer.lateral.nnz
    (784, 35968, 3136)
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        *,
        nps: int = 4,
        stride: int = 2,
        radius: float = 4.0,
        lateral_distance: float = 0.0,
        lateral_sign: int = -1,
        activation: str = "tanh",
        tau: float = 1.0,
        seed: int = 0,
    ):
        super().__init__()
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise ConfigError(f"input_shape must be (channels, height, width), got {input_shape}")
        if nps < 1:
            raise ConfigError(f"nps (neurons per site) must be >= 1, got {nps}")
        if lateral_sign not in (-1, 1):
            raise ConfigError(f"lateral_sign must be -1 (inhibition) or +1, got {lateral_sign}")
        if not tau > 0:
            raise ConfigError(f"tau must be > 0, got {tau}")
        self.input_shape = tuple(int(v) for v in input_shape)
        self.nps, self.stride, self.radius = nps, stride, radius
        self.lateral_distance, self.lateral_sign, self.tau = lateral_distance, lateral_sign, tau
        self.activation = activation
        self._f = activation_fn(activation)
        c, h, w = self.input_shape
        self.grid = site_grid(h, w, stride)
        self.n_sites = self.grid[0] * self.grid[1]
        self.state_size = self.n_sites * nps
        self.input_size = c * h * w

        ff_index, ff_valid = receptive_fields(h, w, stride=stride, radius=radius)
        self.ff = SiteLinear(ff_index, ff_valid, group_size=c, out_per_site=nps)
        lat_index, lat_valid = lateral_neighbours(*self.grid, distance=lateral_distance)
        self.lateral = SiteLinear(lat_index, lat_valid, group_size=nps, out_per_site=nps)
        self.reset_parameters(seed)

    @property
    def mean_fan_in(self) -> float:
        """Mean number of inputs per neuron (pixels × channels), over all sites."""
        return float(self.ff.fan_in.mean())

    def reset_parameters(self, seed: int = 0) -> None:
        """``W = mask ⊙ N(0, 1)/sqrt(mean fan-in)``, ``L = I`` (as the authors' code of Obeid et al. 2019)."""
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(self.ff.weight.shape, generator=gen, dtype=self.ff.weight.dtype)
        self.ff.weight.copy_(w.to(self.ff.weight.device) * self.ff.mask / math.sqrt(self.mean_fan_in))
        eye = torch.eye(self.nps, dtype=self.lateral.weight.dtype, device=self.lateral.weight.device)
        self.lateral.weight.zero_()
        self.lateral.weight[:, :, : self.nps] = eye  # the site itself is the first neighbour

    # --- layout helpers -------------------------------------------------------------
    def input_groups(self, x: torch.Tensor) -> torch.Tensor:
        """Flat images (B, C·H·W) -> pixel groups (B, H·W, C)."""
        c = self.input_shape[0]
        return x.reshape(x.shape[0], c, -1).transpose(1, 2)

    def sites(self, u: torch.Tensor) -> torch.Tensor:
        """Flat state (B, N) -> (B, S, nps) view."""
        return u.reshape(u.shape[0], self.n_sites, self.nps)

    def to_site_minor(self, r: torch.Tensor) -> torch.Tensor:
        """Reorder (B, N) from site-major ``s·nps + n`` to the authors' ``n·S + s``."""
        return self.sites(r).transpose(1, 2).reshape(r.shape[0], -1)

    # --- dynamics -------------------------------------------------------------------
    def drive(self, x: torch.Tensor) -> torch.Tensor:
        """``W x``: (B, C·H·W) -> (B, N)."""
        if x.ndim != 2 or x.shape[1] != self.input_size:
            raise ConfigError(
                f"input must have shape (batch, {self.input_size}) for images {self.input_shape}, "
                f"got {tuple(x.shape)}"
            )
        return self.ff(self.input_groups(x)).reshape(x.shape[0], -1)

    def rates(self, u: torch.Tensor) -> torch.Tensor:
        """``r = f(u)``."""
        return self._f(u)

    def lateral_input(self, r: torch.Tensor) -> torch.Tensor:
        """``(L − I) r``: (B, N) -> (B, N)."""
        return self.lateral(self.sites(r)).reshape(r.shape[0], -1) - r

    def field(self, u: torch.Tensor, drive: torch.Tensor) -> torch.Tensor:
        """``du/ds = (−u + W x + s·(L − I) f(u)) / τ``."""
        du = drive - u + self.lateral_sign * self.lateral_input(self._f(u))
        return du if self.tau == 1.0 else du / self.tau

    # --- per-site Newton (lateral distance 0) ----------------------------------------
    @property
    def site_separable(self) -> bool:
        """True when ``L`` only joins neurons of the same site (block-diagonal lateral map).

        The fixed-point equation then splits into ``S`` independent ``nps``-dimensional
        problems (:meth:`jacobian_blocks`), which :class:`~dynsim.solvers.SiteNewton` solves site by site.
        """
        return self.lateral.is_identity_gather and self.activation in _DERIVATIVES

    @property
    def symmetric_blocks(self) -> bool:
        """Every lateral block ``s·(L_k − I)`` is symmetric (the Hebbian rule keeps it so from ``L = I``):
        Newton–CG's block systems are then symmetric and the site energy ``Φ_k``
        (:func:`dynsim.solvers.newton.site_energy`) exists."""
        self._lateral_blocks()
        return self._symmetric

    def _lateral_blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``s·(L_k − I)`` (S, M, M) and its transpose (contiguous), cached until ``L`` changes in place."""
        w = self.lateral.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if getattr(self, "_blocks_key", None) != key:
            eye = torch.eye(self.nps, dtype=w.dtype, device=w.device)
            a = self.lateral_sign * (w - eye)
            self._blocks = (a, a.mT.contiguous())
            self._row_sums = a.abs().sum(dim=-1)  # (S, M): Σ_j |s·A_kj|, for the Newton safeguard
            self._symmetric = bool(torch.equal(a, self._blocks[1]))  # Newton–CG needs symmetric blocks
            self._blocks_key = key
        return self._blocks

    def monotone_sites(self) -> torch.Tensor:
        """(S,) bool: ``I − s·(L_k − I)`` is positive definite (a Cholesky factorisation exists).

        Then every site Jacobian ``J_k = −I + s·A_k D`` (``0 ≤ D ≤ I``) is similar to a negative
        definite matrix, the site has exactly one fixed point and the Newton line search of
        :func:`dynsim.solvers.newton.line_search` converges to it. For the inhibitory sign this is
        ``L_k ≻ 0``. Cached until ``L`` changes."""
        a, _ = self._lateral_blocks()
        if getattr(self, "_monotone_key", None) != self._blocks_key:
            eye = torch.eye(self.nps, dtype=a.dtype, device=a.device)
            self._monotone = torch.linalg.cholesky_ex(eye - 0.5 * (a + a.mT))[1] == 0
            self._monotone_key = self._blocks_key
        return self._monotone

    def _abs_row_sums(self) -> torch.Tensor:
        self._lateral_blocks()
        return self._row_sums

    @property
    def block_size(self) -> int:
        """States per block of the fixed-point problem (:class:`~dynsim.systems.base.BlockJacobian`): nps."""
        return self.nps

    def jacobian_blocks(self, u: torch.Tensor, drive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``G = τF(u)`` per site and its Jacobian (the :class:`~dynsim.systems.base.BlockJacobian` protocol).

        ``G_k = −u_k + d_k + s·A_k f(u_k)`` with ``A_k`` the site's block of ``L − I``, and
        ``J_k = ∂G_k/∂u_k = −I + s·A_k diag f'(u_k)``. Shapes: u, drive (B, N) ->
        (B, S, nps), (B, S, nps, nps). Requires :attr:`site_separable`.
        """
        if not self.site_separable:
            raise ConfigError(
                "the per-site Newton solver needs lateral_distance 0 and a tanh/linear/relu rate; "
                "use --solver euler for this layer"
            )
        a, a_t = self._lateral_blocks()
        us = self.sites(u)
        r, fp = _DERIVATIVES[self.activation](us)  # (B, S, M) each
        # s·A_k r_k for every sample: one bmm over sites, (S, M, M) @ (S, M, B) -> (B, S, M); a
        # broadcast matmul would copy A for every sample
        lat = torch.bmm(a, r.permute(1, 2, 0)).permute(2, 0, 1)
        g = self.sites(drive) - us + lat
        # J built transposed (row j of Jᵀ = f'_j · column j of s·A), so that J = (Jᵀ).mT is
        # column-major and LAPACK factorises it without a transposing copy
        jac_t = a_t * fp.unsqueeze(-1)  # (B, S, M, M)
        jac_t.diagonal(dim1=-2, dim2=-1).sub_(1.0)
        return g, jac_t.mT

    def jacobian_factors(self, u: torch.Tensor, drive: torch.Tensor):
        """``G = τF(u)`` per site and its Jacobian in factored form (the
        :class:`~dynsim.systems.base.FactoredJacobian` protocol): ``J_k = −I + a_k diag(f'(u_k))``.

        Returns ``G`` (B, S, M), ``a`` = ``s·(L_k − I)`` (S, M, M), ``f'(u)`` (B, S, M) and whether every
        ``a_k`` is symmetric (it is for ``L`` built by the Hebbian rule from ``L = I``). Nothing of
        size B·S·M² is formed: :class:`~dynsim.solvers.SiteNewtonCG` applies ``J`` as ``a`` times a
        vector. Requires :attr:`site_separable`.
        """
        if not self.site_separable:
            raise ConfigError(
                "the per-site Newton solvers need lateral_distance 0 and a tanh/linear/relu rate; "
                "use --solver euler for this layer"
            )
        a, a_t = self._lateral_blocks()
        us = self.sites(u)
        r, fp = _DERIVATIVES[self.activation](us)
        # (a_k r_k)ᵀ = r_kᵀ a_kᵀ for all samples: one bmm over sites of (B, M) rows by (M, M), the
        # layout that reads each block once also at batch 1 (benchmarks/README.md, issue 15)
        g = self.sites(drive) - us + torch.bmm(r.transpose(0, 1), a_t).transpose(0, 1)
        return g, a, fp, self._symmetric

    def newton_safeguard(self, u_next: torch.Tensor, drive: torch.Tensor) -> torch.Tensor:
        """A Newton iterate (B, S, nps) made safe: NaN → 0 and, for tanh, the box that holds every fixed point.

        A site whose Jacobian is (nearly) singular — e.g. ``J(0) = −L_k`` once a corner site's
        ``L_k`` has become rank-deficient after many epochs — takes a huge or non-finite step.
        Every fixed point of a tanh layer lies in the box ``|u_k| ≤ |d_k| + Σ_j |s·A_kj|`` (since
        ``u = d + s·A r`` and ``|r| ≤ 1``), so projecting onto it changes nothing near the
        solution and brings a wild step back (tanh then saturates and the next step is a
        fixed-point iteration). NaN restarts at 0.
        """
        u_next = torch.nan_to_num(u_next, nan=0.0)
        if self.activation == "tanh":
            box = self.sites(drive).abs().add_(self._abs_row_sums())
            u_next = torch.clamp(u_next, min=-box, max=box)
        return u_next

    # --- dense views (tests, references; small sizes only) --------------------------
    def dense_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense ``W`` (N, C·H·W) in the input's channel-major order and ``L`` (N, N)."""
        c, h, w = self.input_shape
        wd = self.ff.to_dense(h * w)  # columns ordered pixel·C + channel
        wd = wd.reshape(-1, h * w, c).transpose(1, 2).reshape(-1, c * h * w)
        return wd, self.lateral.to_dense(self.n_sites)
