"""Plasticity of the deep structured network (Obeid, Ramambason & Pehlevan 2019, eq. 15).

After each settled batch, with settled rates ``r_p`` of every layer and ``r_0 = x``:

    ΔW_p = η c (⟨r_p r_{p−1}ᵀ⟩ − W_p) ⊙ mask_W_p
    ΔL_p = (η/2) c (⟨r_p r_pᵀ⟩ − κ_p L_p) ⊙ mask_L_p          lateral_rule="code" (default)
    ΔL_p = (η/2) c κ_p (⟨r_p r_pᵀ⟩ − L_p) ⊙ mask_L_p          lateral_rule="scaled"

with ``κ_p = 1/(1+γ)`` for the hidden layers ``p < P`` and ``κ_P = 1`` for the top layer;
``c`` is the batch rule (``"sum"``: c = B, ``"mean"``: c = 1), as for the single layer.

Convention and source: only the *lateral* updates of the *hidden* layers carry the factor
``1/(1+γ)``; feed-forward updates and the top layer's lateral update never do (eq. 15 of
Obeid, Ramambason & Pehlevan 2019). *Where* the factor sits differs between
readings. The authors' code (Pehlevan-Group/Deep_Structured_SM, ``snn_multipleneurons_fast.py``,
``deep_network.update_weights``: ``grad = update ⊙ (r rᵀ − adjustment ⊙ weights)`` with
``adjustment = L_structure/(1+gamma)`` on hidden layers, ``update = L_structure/2``)
puts it on the decay term only, so a hidden layer's ``L_p`` tends to ``(1+γ)⟨r_p r_pᵀ⟩``;
that is ``"code"``, the default. ``"scaled"`` multiplies the whole update (the wording
"lateral updates are scaled by 1/(1+γ)"): same fixed point as the single layer
(``L_p → ⟨r_p r_pᵀ⟩``), at a slower rate. With γ = 0 both equal the single-layer rule.
"""

from __future__ import annotations

import torch

from dynsim.errors import ConfigError
from dynsim.plasticity.learning_rates import SEED_RATE, DecayingRate
from dynsim.plasticity.similarity_matching import BATCH_RULES, SimilarityMatchingRule, structured_update
from dynsim.systems.deep import DeepHebbianNet

LATERAL_RULES = ("code", "scaled")


def deep_hebbian_update(
    net: DeepHebbianNet,
    x: torch.Tensor,
    r: torch.Tensor,
    eta: float,
    *,
    batch_rule: str = "sum",
    lateral_rule: str = "code",
) -> None:
    """Apply ``ΔW_p`` and ``ΔL_p`` above to every layer in place. x (B, D_in), r (B, Σ N_p)."""
    if batch_rule not in BATCH_RULES:
        raise ConfigError(f"batch rule must be one of {BATCH_RULES}, got {batch_rule!r}")
    if lateral_rule not in LATERAL_RULES:
        raise ConfigError(f"lateral rule must be one of {LATERAL_RULES}, got {lateral_rule!r}")
    scale = float(x.shape[0]) if batch_rule == "sum" else 1.0
    rs = net.split(r)
    pre = net.layers[0].input_groups(x)
    for p, layer in enumerate(net.layers):
        post = layer.sites(rs[p])
        structured_update(layer.ff, post, pre, eta * scale)
        kappa = net.lateral_scale(p)
        if lateral_rule == "scaled":
            structured_update(layer.lateral, post, post, 0.5 * eta * scale * kappa)
        else:
            structured_update(layer.lateral, post, post, 0.5 * eta * scale, decay=kappa)
        pre = post


class DeepSimilarityMatchingRule(SimilarityMatchingRule):
    """Plasticity callback: :func:`deep_hebbian_update` after every settled batch.

    Same arguments and behaviour as :class:`~dynsim.plasticity.SimilarityMatchingRule`
    (rate schedule, batch rule, diverged samples left out, checkpointed rate), plus
    ``lateral_rule`` (``"code"`` or ``"scaled"``, see the module docstring).
    """

    def __init__(
        self,
        net: DeepHebbianNet,
        *,
        rate: DecayingRate = SEED_RATE,
        batch_rule: str = "sum",
        lateral_rule: str = "code",
    ):
        if lateral_rule not in LATERAL_RULES:
            raise ConfigError(f"lateral rule must be one of {LATERAL_RULES}, got {lateral_rule!r}")
        super().__init__(net, rate=rate, batch_rule=batch_rule)
        self.net, self.lateral_rule = net, lateral_rule

    def update(self, x: torch.Tensor, r: torch.Tensor) -> None:
        deep_hebbian_update(self.net, x, r, self.eta, batch_rule=self.batch_rule, lateral_rule=self.lateral_rule)
