"""Hebbian / anti-Hebbian similarity-matching plasticity.

Pehlevan, Sengupta & Chklovskii (2018), "Why do similarity matching objectives lead to
Hebbian/anti-Hebbian networks?"; Obeid, Ramambason & Pehlevan (2019), structured networks.

After each settled batch, with settled rates ``r`` (B, N) and inputs ``x`` (B, D_in):

    ΔW = η c (⟨r xᵀ⟩ − W) ⊙ mask_W          (Hebbian, feed-forward)
    ΔL = (η/2) c (⟨r rᵀ⟩ − L) ⊙ mask_L      (anti-Hebbian, lateral)

where ``⟨·⟩`` is the mean over the batch and ``c`` is the batch rule: ``"sum"`` (c = B,
the default: the sum of B online updates computed at the same weights) or ``"mean"``
(c = 1: one online-sized step per batch). The authors' published code (Obeid et al. 2019)
updates after every image and has no batched rule; batch 100 is a setting of the
reproduction report, whose batched update we could not inspect, so ``"sum"`` is our choice. With B = 1
both equal the online rule ``ΔW = η (r xᵀ − W)``. Only stored (structural) weights change.

:func:`structured_update` is the one definition of the update of a structured weight
(``weight += rate (⟨post preᵀ⟩ − decay·weight)``), used by this layer and by the deep network
(:mod:`dynsim.plasticity.deep`); the compiled batch-1 kernel (:mod:`dynsim.backend`) computes
the same formula and is tested for parity against it.
"""

from __future__ import annotations

import torch

from dynsim import backend
from dynsim.callbacks import Callback
from dynsim.errors import ConfigError
from dynsim.plasticity.learning_rates import SEED_RATE, DecayingRate
from dynsim.systems.hebbian import HebbianLayer

BATCH_RULES = ("sum", "mean")
LATERAL_FACTOR = 0.5  # ΔL = (η/2)(r rᵀ − L): the lateral rate is half the feed-forward one


def hebbian_update(
    layer: HebbianLayer,
    x: torch.Tensor,
    r: torch.Tensor,
    eta: float,
    *,
    batch_rule: str = "sum",
    lateral_factor: float = LATERAL_FACTOR,
) -> None:
    """Apply ``ΔW`` and ``ΔL`` above to ``layer`` in place. Shapes: x (B, D_in), r (B, N)."""
    b = x.shape[0]
    scale = float(b) if batch_rule == "sum" else 1.0
    if backend.compiled_hebbian_update(layer, x, r, eta * scale, lateral_factor * eta * scale):
        return  # batch 1 on CPU: the same formula in one compiled pass
    rs = layer.sites(r)  # (B, S, M)
    structured_update(layer.ff, rs, layer.input_groups(x), eta * scale)  # pre: pixels of each receptive field
    structured_update(layer.lateral, rs, rs, lateral_factor * eta * scale)  # pre: neighbouring sites' rates


def structured_update(linear, post: torch.Tensor, pre: torch.Tensor, rate: float, *, decay: float = 1.0) -> None:
    """``weight += rate (⟨post ⊗ gather(pre)⟩ − decay · weight)`` on the stored weights, in place.

    Shapes: ``post`` (B, S, M) rates of the output sites, ``pre`` (B, S_in, G) input groups
    (gathered into each site's (B, S, K·G) presynaptic values); ``⟨·⟩`` the batch mean.
    Padded (absent) connections read zeros and hold zero weights, so their correlation and
    their update are exactly zero: no mask multiply is needed. With ``decay = 1`` the update is
    ``lerp(weight, corr, rate)``.
    """
    corr = _site_correlation(post, linear.gather(pre))
    if decay == 1.0:
        linear.weight.lerp_(corr, rate)
    else:
        linear.weight.add_(rate * (corr - decay * linear.weight))


def _site_correlation(post: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """Batch mean of per-site outer products: (B, S, M), (B, S, K) -> (S, M, K)."""
    b = post.shape[0]
    if b == 1:
        return post[0].unsqueeze(-1) * pre[0].unsqueeze(-2)
    return torch.bmm(post.transpose(0, 1).transpose(1, 2), pre.transpose(0, 1)) / b


class SimilarityMatchingRule(Callback):
    """Plasticity callback: :func:`hebbian_update` after every settled batch.

    Parameters
    ----------
    layer : the :class:`HebbianLayer` to train.
    rate : learning-rate schedule per epoch (default: the seed's ``max(5e-3/(1+0.5e), 1e-4)``).
    batch_rule : ``"sum"`` or ``"mean"`` (see module docstring).

    Samples whose dynamics diverged are left out of the update.
    """

    def __init__(self, layer: HebbianLayer, *, rate: DecayingRate = SEED_RATE, batch_rule: str = "sum"):
        if batch_rule not in BATCH_RULES:
            raise ConfigError(f"batch rule must be one of {BATCH_RULES}, got {batch_rule!r}")
        self.layer, self.rate, self.batch_rule = layer, rate, batch_rule
        self.eta = rate(0)

    def on_epoch_start(self, engine, epoch):
        self.eta = self.rate(epoch)
        engine.log(learning_rate=self.eta)

    def state_dict(self):
        """The current rate (the weights themselves belong to the layer's ``state_dict``)."""
        return {"eta": self.eta}

    def load_state_dict(self, state):
        self.eta = state["eta"]

    def update(self, x: torch.Tensor, r: torch.Tensor) -> None:
        """Apply the rule to inputs ``x`` (B, D_in) and settled rates ``r`` (B, N)."""
        hebbian_update(self.layer, x, r, self.eta, batch_rule=self.batch_rule)

    def fused_update(self) -> tuple[HebbianLayer, float, float] | None:
        """The rule at batch 1 for the engine's fused online backend (:mod:`dynsim.fused`):
        ``(layer, η, η/2)`` of the current epoch (``sum`` and ``mean`` agree at B = 1); diverged
        inputs are left out there too. ``None`` when a subclass replaces :meth:`update` (its
        update is not this formula; the engine then runs the per-input path)."""
        if type(self).update is not SimilarityMatchingRule.update:
            return None
        return self.layer, self.eta, LATERAL_FACTOR * self.eta

    def on_settled(self, engine, batch, result):
        x, r = batch.x, result.r
        ok = ~result.diverged
        if not bool(ok.all()):
            x, r = x[ok], r[ok]
        if x.shape[0]:
            self.update(x, r)
