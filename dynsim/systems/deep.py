"""Deep structured Hebbian network with feedback (Obeid, Ramambason & Pehlevan 2019, eq. 15).

Layers ``p = 1 … P``, each a structured :class:`~dynsim.systems.hebbian.HebbianLayer`
(its own stride, receptive-field radius, NpS and lateral distance), settle together as one
system (eq. 15 of Obeid, Ramambason & Pehlevan 2019):

    τ du_p/ds = −u_p + W_p r_{p−1} + γ W_{p+1}ᵀ r_{p+1} + s·(L_p − I) r_p,    r_p = f(u_p)

with ``r_0 = x`` (the image), no feedback into the top layer ``P``, and ``s`` the lateral
sign (−1: the authors' inhibition, ``−(L_p − I) r_p``). The state is the concatenation
``u = [u_1, …, u_P]`` (B, Σ N_p), each block site-major, so every registered solver,
stop rule and :func:`~dynsim.settle.settle` work on it unchanged.

Layer ``p > 1`` sees the previous layer's site grid as an image with ``nps_{p−1}``
channels. Its state is site-major, i.e. channel-*last* ``(B, rows, cols, nps)``, which is
exactly the ``(B, S_in, G)`` grouping :class:`~dynsim.systems.structure.SiteLinear`
takes, so the deep net passes the previous layer's sites to ``ff`` directly (no
transposition) and ``W_p``'s dense columns are in the previous layer's site-major order.

The feedback ``W_{p+1}ᵀ r_{p+1}`` uses the transpose of the structured map
(:func:`site_linear_transpose`: scatter-add over the gather index), never a dense matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dynsim.errors import ConfigError
from dynsim.systems.base import System, activation_fn
from dynsim.systems.hebbian import HebbianLayer
from dynsim.systems.structure import SiteLinear


def transpose_index(linear: SiteLinear, n_in_groups: int) -> torch.Tensor:
    """Inverse of the gather index: ``(S_in, J)`` positions ``s·K + k`` that read each input group.

    Padded with ``S·K`` (a zero row). Entries of ``linear.index`` that point at padding
    (``>= n_in_groups``) are left out.
    """
    s, k = linear.index.shape
    flat = linear.index.reshape(-1)
    lists: list[list[int]] = [[] for _ in range(n_in_groups)]
    for pos, j in enumerate(flat.tolist()):
        if j < n_in_groups:
            lists[j].append(pos)
    width = max(1, max(len(item) for item in lists))
    inv = torch.full((n_in_groups, width), s * k, dtype=torch.long)
    for j, item in enumerate(lists):
        inv[j, : len(item)] = torch.tensor(item, dtype=torch.long)
    return inv.to(linear.index.device)


def site_linear_transpose(
    linear: SiteLinear, y: torch.Tensor, n_in_groups: int, inverse: torch.Tensor | None = None
) -> torch.Tensor:
    """Apply the transpose of a structured map: ``(B, S, M) -> (B, S_in, G)``.

    ``x[b, index[s, k], g] += Σ_m weight[s, m, k·G + g] · y[b, s, m]``, i.e. ``Wᵀ y`` for the
    dense ``W = linear.to_dense(n_in_groups)``. Each site's contributions come from one
    batched matmul; they are summed per input group by gathering through ``inverse``
    (:func:`transpose_index`, computed here when not given; a gather reads in parallel where
    ``index_add_`` would serialise its scatter on CPU). No dense matrix is formed.
    """
    b = y.shape[0]
    g = linear.group_size
    per_site = torch.bmm(y.transpose(0, 1), linear.weight).transpose(0, 1)  # (B, S, K·G)
    per_site = per_site.reshape(b, -1, g)  # (B, S·K, G)
    if inverse is None:
        inverse = transpose_index(linear, n_in_groups)
    padded = torch.cat([per_site, per_site.new_zeros(b, 1, g)], dim=1)
    return padded[:, inverse].sum(dim=2)


@dataclass(frozen=True)
class LayerSpec:
    """Structure of one layer: neurons per site, site spacing, receptive-field radius
    (in units of the layer's input grid) and lateral distance (in sites)."""

    nps: int = 4
    stride: int = 2
    radius: float = 4.0
    lateral_distance: float = 0.0


class DeepHebbianNet(System):
    """A stack of structured Hebbian layers with feedback of strength ``gamma``.

    Parameters
    ----------
    input_shape : (C, H, W)
        Shape of one input image (``C`` channels, channel-major flat inputs).
    layers : sequence of :class:`LayerSpec`
        One entry per layer, bottom first.
    gamma : float
        Feedback strength γ ≥ 0 (0: purely feed-forward coupling, layers settle in turn).
    lateral_sign, activation, tau : as for :class:`HebbianLayer`, shared by all layers.
    seed : int
        Layer ``p`` (0-based) is initialised with seed ``seed + p``.

    Examples
    --------
    >>> net = DeepHebbianNet((1, 28, 28), [LayerSpec(4, 2, 4.0), LayerSpec(4, 1, 2.0)], gamma=0.1)
    >>> net.state_size, [layer.state_size for layer in net.layers]
    (1568, [784, 784])
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        layers: Sequence[LayerSpec],
        *,
        gamma: float = 0.0,
        lateral_sign: int = -1,
        activation: str = "tanh",
        tau: float = 1.0,
        seed: int = 0,
    ):
        super().__init__()
        if len(layers) < 1:
            raise ConfigError("a deep network needs at least one layer")
        if not (gamma >= 0 and gamma == gamma):
            raise ConfigError(f"feedback strength gamma must be >= 0, got {gamma}")
        self.input_shape = tuple(int(v) for v in input_shape)
        self.specs = tuple(layers)
        self.gamma, self.lateral_sign, self.tau = float(gamma), lateral_sign, tau
        self.activation = activation
        self._f = activation_fn(activation)
        built = []
        shape = self.input_shape
        for p, spec in enumerate(self.specs):
            try:
                layer = HebbianLayer(
                    shape,
                    nps=spec.nps,
                    stride=spec.stride,
                    radius=spec.radius,
                    lateral_distance=spec.lateral_distance,
                    lateral_sign=lateral_sign,
                    activation=activation,
                    tau=tau,
                    seed=seed + p,
                )
            except ConfigError as exc:
                raise ConfigError(f"layer {p + 1} (input {shape}): {exc}") from None
            built.append(layer)
            shape = (spec.nps, *layer.grid)
        self.layers = torch.nn.ModuleList(built)
        sizes = [layer.state_size for layer in self.layers]
        self.sizes = sizes
        self.offsets = [sum(sizes[:p]) for p in range(len(sizes) + 1)]
        self.state_size = self.offsets[-1]
        self._slices = [slice(self.offsets[p], self.offsets[p + 1]) for p in range(len(sizes))]
        for p in range(1, len(built)):  # feedback W_pᵀ: inverse gather index of layer p's ff map
            inv = transpose_index(built[p].ff, built[p - 1].n_sites)
            self.register_buffer(f"_feedback_index_{p}", inv, persistent=False)
        self.input_size = self.layers[0].input_size

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def layer_slices(self) -> list[slice]:
        """Slice of the flat state held by each layer."""
        return list(self._slices)

    def split(self, u: torch.Tensor) -> list[torch.Tensor]:
        """Flat state (B, Σ N_p) -> per-layer views [(B, N_1), …]."""
        return [u[:, sl] for sl in self._slices]

    def lateral_scale(self, p: int) -> float:
        """``κ_p`` of layer ``p`` (0-based): ``1/(1+γ)`` for hidden layers, 1 on top.

        See :mod:`dynsim.plasticity.deep` for where the lateral update applies it.
        """
        return 1.0 / (1.0 + self.gamma) if p < self.n_layers - 1 else 1.0

    # --- dynamics -------------------------------------------------------------------
    def drive(self, x: torch.Tensor) -> torch.Tensor:
        """``[W_1 x, 0, …, 0]``: only the bottom layer sees the input directly."""
        d1 = self.layers[0].drive(x)
        return torch.cat([d1, d1.new_zeros(x.shape[0], self.state_size - d1.shape[1])], dim=1)

    def rates(self, u: torch.Tensor) -> torch.Tensor:
        return self._f(u)

    def feedforward_input(self, p: int, r_prev: torch.Tensor) -> torch.Tensor:
        """``W_p r_{p−1}`` for ``p ≥ 1`` (0-based): (B, N_{p−1}) -> (B, N_p)."""
        layer = self.layers[p]
        return layer.ff(self.layers[p - 1].sites(r_prev)).reshape(r_prev.shape[0], -1)

    def feedback_input(self, p: int, r_next: torch.Tensor) -> torch.Tensor:
        """``W_{p+1}ᵀ r_{p+1}`` (0-based ``p < P−1``): (B, N_{p+1}) -> (B, N_p), structured."""
        upper = self.layers[p + 1]
        inverse = getattr(self, f"_feedback_index_{p + 1}")
        back = site_linear_transpose(upper.ff, upper.sites(r_next), self.layers[p].n_sites, inverse)
        return back.reshape(r_next.shape[0], -1)

    def field(self, u: torch.Tensor, drive: torch.Tensor) -> torch.Tensor:
        """``du/ds`` of all layers, concatenated (B, Σ N_p)."""
        us = self.split(u)
        rs = [self._f(v) for v in us]
        out = []
        for p, layer in enumerate(self.layers):
            du = self.lateral_sign * layer.lateral_input(rs[p]) - us[p]
            du = du + (
                drive[:, self._slices[0]] if p == 0 else self.feedforward_input(p, rs[p - 1])
            )
            if self.gamma and p + 1 < self.n_layers:
                du = du + self.gamma * self.feedback_input(p, rs[p + 1])
            out.append(du)
        du = torch.cat(out, dim=1)
        return du if self.tau == 1.0 else du / self.tau

    def layer_residuals(self, u: torch.Tensor, drive: torch.Tensor) -> torch.Tensor:
        """Per-layer ``‖du_p/ds‖/‖u_p‖``: (B, P)."""
        from dynsim.settle import relative_norm

        f = self.field(u, drive)
        return torch.stack([relative_norm(f[:, sl], u[:, sl]) for sl in self.layer_slices()], dim=1)

    # --- dense views (tests, references; small sizes only) --------------------------
    def dense_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, dense ``W_p`` (N_p, N_{p−1}) and ``L_p`` (N_p, N_p).

        ``W_1``'s columns follow the flat image (channel-major); ``W_p``'s for ``p > 1``
        follow the previous layer's site-major state.
        """
        out = [self.layers[0].dense_weights()]
        for p in range(1, self.n_layers):
            layer = self.layers[p]
            out.append(
                (
                    layer.ff.to_dense(self.layers[p - 1].n_sites),
                    layer.lateral.to_dense(layer.n_sites),
                )
            )
        return out

    def describe(self) -> list[dict]:
        """Per-layer structure summary (for result files)."""
        return [
            {
                "n_neurons": layer.state_size,
                "n_sites": layer.n_sites,
                "grid": list(layer.grid),
                "input_shape": list(layer.input_shape),
                "nps": layer.nps,
                "stride": layer.stride,
                "radius": layer.radius,
                "lateral_distance": layer.lateral_distance,
                "mean_fan_in": layer.mean_fan_in,
                "ff_nonzeros": layer.ff.nnz,
                "lateral_nonzeros": layer.lateral.nnz,
            }
            for layer in self.layers
        ]
