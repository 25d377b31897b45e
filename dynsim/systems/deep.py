"""Deep structured Hebbian network with feedback (Obeid, Ramambason & Pehlevan 2019, eq. 15).

Layers ``p = 1 … P``, each a structured :class:`~dynsim.systems.hebbian.HebbianLayer`
(its own stride, receptive-field radius, NpS and lateral distance), settle together as one
system (eq. 15 of Obeid, Ramambason & Pehlevan 2019):

    τ du_p/ds = −u_p + W_p r_{p−1} / m_p + γ m_{p+1} W_{p+1}ᵀ r_{p+1} + s·(L_p − I) r_p,
    r_p = f(g_p u_p)

with ``r_0 = x`` (the image), no feedback into the top layer ``P``, and ``s`` the lateral
sign (−1: the authors' inhibition, ``−(L_p − I) r_p``). ``g_p`` (``gains``) and ``m_p``
(``mult_factors``) are the authors' per-layer ``tanh_factors`` and ``mult_factors``
(Obeid et al.'s public code, ``deep_network.activation_function`` and
``deep_network_GPU.create_deep_network``: the structure block of layer p is
``W_p/m_p``, its feedback block ``γ m_{p+1} W_{p+1}ᵀ``); both default to 1, their code's
default. The plasticity acts on the raw ``W_p`` and ``L_p``, so ``m_p`` divides the learned
feed-forward drive (``W_p → ⟨r_p r_{p−1}ᵀ⟩``).

Stop test (``layer_stop``): ``"each"`` (default, the authors' ``deep_network.neural_dynamics``)
judges ``max_p ‖du_p/ds‖/‖u_p‖``, i.e. every layer's own residual below T, which implies
the whole state's (``‖F‖²/‖u‖² = Σ‖F_p‖²/Σ‖u_p‖² ≤ max_p ‖F_p‖²/‖u_p‖²``); ``"state"``
judges the whole state's ``‖du/ds‖/‖u‖`` only. The state is the concatenation
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
from dynsim.systems.hebbian import _DERIVATIVES, HebbianLayer
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


LAYER_STOPS = ("each", "state")
_DENSE_MIN_BATCH = 32  # feed-forward maps of layers above the first: dense matmul from this batch size
_DENSE_MAX_ENTRIES = 1 << 22  # ... when the dense W_p has at most this many entries (16 MiB in float32)


def _per_layer_factors(name: str, values: Sequence[float] | None, n: int) -> tuple[float, ...]:
    """``values`` as ``n`` finite positive floats (``None``: all 1); ConfigError otherwise."""
    if values is None:
        return (1.0,) * n
    out = tuple(float(v) for v in values)
    if len(out) == 1:
        out = out * n
    if len(out) != n:
        raise ConfigError(f"{name} has {len(out)} values for {n} layer(s); give one value or {n}")
    bad = [v for v in out if not (v == v and 0 < v < float("inf"))]
    if bad:
        raise ConfigError(f"{name} must be finite numbers > 0 (1: the authors' default), got {bad[0]}")
    return out


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
    gains : sequence of float, optional
        ``g_p`` in ``r_p = f(g_p u_p)``, one per layer (the authors' ``tanh_factors``; default 1).
    mult_factors : sequence of float, optional
        ``m_p``: feed-forward input ``W_p r_{p−1}/m_p``, feedback ``γ m_{p+1} W_{p+1}ᵀ r_{p+1}``
        (the authors' ``mult_factors``; default 1).
    layer_stop : {"each", "state"}
        Residual that stop rules judge (:meth:`residual_norm`): every layer's own (default,
        the authors' test) or the whole state's.

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
        gains: Sequence[float] | None = None,
        mult_factors: Sequence[float] | None = None,
        layer_stop: str = "each",
    ):
        super().__init__()
        if len(layers) < 1:
            raise ConfigError("a deep network needs at least one layer")
        if not (gamma >= 0 and gamma == gamma):
            raise ConfigError(f"feedback strength gamma must be >= 0, got {gamma}")
        self.gains = _per_layer_factors("gains (tanh_factors)", gains, len(layers))
        self.mult_factors = _per_layer_factors("mult_factors", mult_factors, len(layers))
        if layer_stop not in LAYER_STOPS:
            raise ConfigError(f"layer_stop must be one of {', '.join(LAYER_STOPS)}, got {layer_stop!r}")
        self.layer_stop = layer_stop
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
        self._unit_gains = all(g == 1.0 for g in self.gains)
        gain = torch.cat([torch.full((n,), g) for n, g in zip(sizes, self.gains, strict=True)])
        self.register_buffer("_gain", gain, persistent=False)

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
        """``[W_1 x / m_1, 0, …, 0]``: only the bottom layer sees the input directly."""
        d1 = self.layers[0].drive(x)
        if self.mult_factors[0] != 1.0:
            d1 = d1 / self.mult_factors[0]
        return torch.cat([d1, d1.new_zeros(x.shape[0], self.state_size - d1.shape[1])], dim=1)

    def rates(self, u: torch.Tensor) -> torch.Tensor:
        """``r_p = f(g_p u_p)`` for every layer: (B, Σ N_p)."""
        return self._f(u) if self._unit_gains else self._f(u * self._gain.to(u.dtype))

    def layer_rates(self, p: int, u_p: torch.Tensor) -> torch.Tensor:
        """``r_p = f(g_p u_p)`` of layer ``p`` (0-based) alone: (B, N_p)."""
        return self._f(u_p) if self.gains[p] == 1.0 else self._f(self.gains[p] * u_p)

    def feedforward_input(self, p: int, r_prev: torch.Tensor) -> torch.Tensor:
        """``W_p r_{p−1} / m_p`` for ``p ≥ 1`` (0-based): (B, N_{p−1}) -> (B, N_p).

        For large batches of small layers the map runs as one dense matmul with a cached
        dense copy of ``W_p`` (see :meth:`_dense_ff`): the structured gather would copy every
        input ~``fan-in/NpS`` times; the values are the same up to summation order."""
        layer = self.layers[p]
        dense = self._dense_ff(p) if r_prev.shape[0] >= _DENSE_MIN_BATCH else None
        if dense is not None:
            out = r_prev @ dense.T
        else:
            out = layer.ff(self.layers[p - 1].sites(r_prev)).reshape(r_prev.shape[0], -1)
        return out if self.mult_factors[p] == 1.0 else out / self.mult_factors[p]

    def _dense_ff(self, p: int) -> torch.Tensor | None:
        """Dense ``W_p`` (N_p, N_{p−1}) for ``p ≥ 1``, rebuilt when the weights change in place;
        ``None`` when it would exceed :data:`_DENSE_MAX_ENTRIES` (e.g. NpS 100)."""
        layer, below = self.layers[p], self.layers[p - 1]
        if layer.state_size * below.state_size > _DENSE_MAX_ENTRIES:
            return None
        w = layer.ff.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        cache = self.__dict__.setdefault("_dense_cache", {})
        if cache.get(p, (None,))[0] != key:
            cache[p] = (key, layer.ff.to_dense(below.n_sites))
        return cache[p][1]

    def feedback_input(self, p: int, r_next: torch.Tensor) -> torch.Tensor:
        """``W_{p+1}ᵀ r_{p+1}`` (0-based ``p < P−1``): (B, N_{p+1}) -> (B, N_p), structured."""
        upper = self.layers[p + 1]
        dense = self._dense_ff(p + 1) if r_next.shape[0] >= _DENSE_MIN_BATCH else None
        if dense is not None:  # large batch, small layers: the cached dense W_{p+1} (feedforward_input)
            return r_next @ dense
        inverse = getattr(self, f"_feedback_index_{p + 1}")
        back = site_linear_transpose(upper.ff, upper.sites(r_next), self.layers[p].n_sites, inverse)
        return back.reshape(r_next.shape[0], -1)

    def layer_input(self, p: int, rs: Sequence[torch.Tensor | None], drive: torch.Tensor) -> torch.Tensor:
        """External input ``b_p`` of layer ``p`` (0-based): everything in ``du_p/ds`` that
        does not depend on ``u_p``, i.e. ``W_p r_{p−1}/m_p + γ m_{p+1} W_{p+1}ᵀ r_{p+1}``
        (``W_1 x/m_1`` from ``drive`` for the bottom layer). ``rs`` holds the layers' rates
        (only ``rs[p−1]`` and ``rs[p+1]`` are read). Shape (B, N_p)."""
        b = drive[:, self._slices[0]] if p == 0 else self.feedforward_input(p, rs[p - 1])
        fb = self.layer_feedback(p, rs)
        return b if fb is None else b + fb

    def layer_feedback(self, p: int, rs) -> torch.Tensor | None:
        """``γ m_{p+1} W_{p+1}ᵀ r_{p+1}`` into layer ``p`` (0-based), or ``None`` (top layer, γ = 0).
        ``rs[p + 1]`` (a list or a dict by layer index) holds the rates of the layer above."""
        if not self.gamma or p + 1 >= self.n_layers:
            return None
        return (self.gamma * self.mult_factors[p + 1]) * self.feedback_input(p, rs[p + 1])

    def field(self, u: torch.Tensor, drive: torch.Tensor) -> torch.Tensor:
        """``du/ds`` of all layers, concatenated (B, Σ N_p)."""
        us = self.split(u)
        rs = [self.layer_rates(p, v) for p, v in enumerate(us)]
        out = []
        for p, layer in enumerate(self.layers):
            du = self.lateral_sign * layer.lateral_input(rs[p]) - us[p] + self.layer_input(p, rs, drive)
            out.append(du)
        du = torch.cat(out, dim=1)
        return du if self.tau == 1.0 else du / self.tau

    def layer_residuals(self, u: torch.Tensor, drive: torch.Tensor) -> torch.Tensor:
        """Per-layer ``‖du_p/ds‖/‖u_p‖``: (B, P)."""
        return self.split_residuals(self.field(u, drive), u)

    def split_residuals(self, f: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Per-layer ``‖f_p‖/‖u_p‖`` of a field ``f`` at ``u``: (B, P)."""
        from dynsim.stopping import relative_norm

        return torch.stack([relative_norm(f[:, sl], u[:, sl]) for sl in self._slices], dim=1)

    def residual_norm(self, f: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The residual that stop rules judge, (B,): ``max_p ‖f_p‖/‖u_p‖`` (``layer_stop="each"``)
        or ``‖f‖/‖u‖`` (``"state"``). :func:`dynsim.settle` uses it for every solver."""
        from dynsim.stopping import relative_norm

        if self.layer_stop == "state" or self.n_layers == 1:
            return relative_norm(f, u)
        return self.split_residuals(f, u).amax(dim=1)

    # --- per-layer Newton (lateral distance 0): the blocks a block solver needs ---------
    @property
    def layers_site_separable(self) -> bool:
        """True when every layer's lateral map joins neurons of the same site only, so
        each layer's fixed-point problem (others held fixed) splits by site."""
        return all(layer.site_separable for layer in self.layers)

    def layer_newton_step(
        self, p: int, u_p: torch.Tensor, b_p: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One per-site Newton step on layer ``p``'s equation with its input ``b_p`` held fixed.

        ``F_p(u_p) = (−u_p + b_p + s·A f(g_p u_p))/τ`` with ``A`` the per-site blocks of
        ``L_p − I``; site ``k``'s Jacobian is ``J_k = (−I + s·A_k diag(g_p f'(g_p u_k)))/τ``
        (nps × nps). Returns ``(u_p − J⁻¹F_p, F_p(u_p))``, both (B, N_p). As in
        :meth:`HebbianLayer.newton_step`, the iterate is projected onto the box
        ``|u_k| ≤ |b_k| + Σ_j |s·A_kj|`` that holds every fixed point of a tanh layer.
        """
        layer, g = self.layers[p], self.gains[p]
        a, a_t = layer._lateral_blocks()
        us = layer.sites(u_p)
        r, fp = _DERIVATIVES[self.activation](us if g == 1.0 else g * us)
        lat = torch.bmm(a, r.permute(1, 2, 0)).permute(2, 0, 1)
        bs = layer.sites(b_p)
        f = bs - us + lat
        jac_t = a_t * (fp if g == 1.0 else g * fp).unsqueeze(-1)  # Jᵀ (see HebbianLayer.newton_step)
        jac_t.diagonal(dim1=-2, dim2=-1).sub_(1.0)
        u_next = us - torch.linalg.solve_ex(jac_t.mT, f)[0]
        u_next = torch.nan_to_num(u_next, nan=0.0)
        if self.activation == "tanh":
            box = bs.abs().add_(layer._abs_row_sums())
            u_next = torch.clamp(u_next, min=-box, max=box)
        b = u_p.shape[0]
        if self.tau != 1.0:
            f = f / self.tau
        return u_next.reshape(b, -1), f.reshape(b, -1)

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
                "gain": self.gains[p],
                "mult_factor": self.mult_factors[p],
            }
            for p, layer in enumerate(self.layers)
        ]
