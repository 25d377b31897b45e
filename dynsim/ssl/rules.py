"""Learning rules as plasticity callbacks: BP, RF, URF and DTP.

One callback per plastic unit (``s<l>`` a stage, ``h<l>`` a head). After each batch's
learning signals are computed (:class:`~dynsim.ssl.signals.ContrastiveSignals`) the callback reads the unit's
input ``pre`` (2B, n_in, ...) and its post-synaptic error ``err`` (2B, n_out, ...) and
forms the local update

    ΔW ∝ −Adam(post-error × pre-activity)       (:meth:`Conv3x3.weight_grad`)

The rules differ only in what reaches the unit as ``err``, and in what else they learn:

- :class:`BP`: the error came down through ``Wᵀ`` (exact gradient; the baseline);
- :class:`RF`: it came down through a fixed random ``B`` (feedback alignment);
- :class:`URF`: as RF, and ``B`` gets exactly the update of ``W`` (ΔB = ΔW in W's layout,
  i.e. ΔB = ΔWᵀ for the feedback matrix), so ``B − W`` never changes;
- :class:`DTP`: ``err`` is a target difference (``h − ĥ`` through the unit's activation)
  and the unit's inverse ``g`` learns to reconstruct noise-corrupted inputs,
  ``ΔV ∝ −(g(f(h + ε)) − (h + ε)) ⊙ g' × f(h + ε)``: also post-error × pre-activity.

A schedule switches callbacks on and off through :attr:`LocalRule.active`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynsim.callbacks import Callback
from dynsim.errors import ConfigError
from dynsim.ssl.stages import ACTIVATIONS, Conv3x3, Dense, Encoder

RULES = ("bp", "rf", "urf", "dtp")


class LocalRule(Callback):
    """Adam on the local update ``post_err × pre`` of one unit.

    Parameters
    ----------
    name : unit name in the settler's result (``"s0"``, ``"h2"``, ...).
    unit : the :class:`Conv3x3` or :class:`Dense` it updates.
    stage : the stage index the unit belongs to (stage planners switch by stage).
    lr : Adam learning rate.
    """

    def __init__(self, name: str, unit: Conv3x3 | Dense, stage: int, *, lr: float):
        self.name = name
        self.unit = unit
        self.stage = stage
        self.lr = lr
        self.active = True
        self.updates = 0
        self.optimizer = torch.optim.Adam([unit.weight], lr=lr)

    def on_settled(self, engine: Any, batch: Any, result: Any) -> None:
        """Update ``W`` from ``result.pre[name]`` and ``result.err[name]`` when active."""
        if not self.active or self.name not in result.err:
            return
        grad = self.unit.weight_grad(result.pre[self.name], result.err[self.name])
        self.step(grad)

    def step(self, grad: torch.Tensor) -> torch.Tensor:
        """Apply one Adam step along ``grad``; return the change ΔW."""
        w = self.unit.weight
        before = w.detach().clone()
        w.grad = grad
        self.optimizer.step()
        w.grad = None
        self.updates += 1
        return w.detach() - before

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state and update count."""
        return {"optimizer": self.optimizer.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = state["updates"]


class BP(LocalRule):
    """Backpropagation: the unit's feedback is its own weight (``feedback = None``)."""

    def __init__(self, name, unit, stage, *, lr):
        super().__init__(name, unit, stage, lr=lr)
        unit.feedback = None


class RF(LocalRule):
    """Fixed random feedback: the error below this unit goes through a random ``B``."""

    def __init__(self, name, unit, stage, *, lr, generator: torch.Generator | None = None):
        super().__init__(name, unit, stage, lr=lr)
        unit.make_feedback(generator)


class URF(RF):
    """Updated random feedback (Amit 2019): ``B`` receives the same update as ``W``."""

    def step(self, grad: torch.Tensor) -> torch.Tensor:
        """Adam step on ``W``, then ``B += ΔW``; returns ΔW."""
        delta_w = super().step(grad)
        self.unit.feedback.add_(delta_w)
        return delta_w


class Inverse(nn.Module):
    """Learned inverse ``g(h) = act(V · up(h))`` of a stage or head, for DTP.

    Maps an output of shape ``in_shape`` back to the layer's input shape ``out_shape``.
    Between feature maps it is nearest-upsampling to the target size then a 3x3 conv;
    otherwise a dense map. ``forward`` returns ``(a, g(h))`` like a stage.
    """

    def __init__(self, in_shape, out_shape, act: str | None, generator=None):
        super().__init__()
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.act = ACTIVATIONS[act] if act else (lambda a: a)
        if len(self.in_shape) == 3 and len(self.out_shape) == 3:
            self.unit: Conv3x3 | Dense = Conv3x3(self.in_shape[0], self.out_shape[0], generator)
        else:
            self.unit = Dense(math.prod(self.in_shape), math.prod(self.out_shape), generator)

    def pre(self, h: torch.Tensor) -> torch.Tensor:
        """The inverse unit's input."""
        if isinstance(self.unit, Conv3x3):
            return F.interpolate(h, size=self.out_shape[1:], mode="nearest")
        return h.flatten(1)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, *in_shape) -> (a, g(h) of shape (B, *out_shape))."""
        a = self.unit(self.pre(h))
        return a, self.act(a).view(-1, *self.out_shape)


class DTP(LocalRule):
    """Difference target propagation (Lee et al. 2015) for one unit.

    The forward update is :class:`LocalRule`'s with ``err`` = the target difference the
    settler computed. The inverse ``g`` (if any; the first stage has none) is trained on
    noise-corrupted inputs: with ``h̃ = h + σ ε``, ``ΔV ∝ −(g(f(h̃)) − h̃) ⊙ g' × f(h̃)``.

    Parameters
    ----------
    forward : the stage or head map ``f`` (input in native shape -> output).
    inverse : the :class:`Inverse` of ``f`` or ``None``.
    noise : σ of the corruption.
    """

    def __init__(
        self,
        name,
        unit,
        stage,
        *,
        lr,
        forward: Callable[[torch.Tensor], torch.Tensor],
        inverse: Inverse | None,
        noise: float,
        generator: torch.Generator,
    ):
        super().__init__(name, unit, stage, lr=lr)
        unit.feedback = None
        self.forward, self.inverse, self.noise = forward, inverse, noise
        self.generator = generator
        self.inverse_optimizer = (
            torch.optim.Adam([inverse.unit.weight], lr=lr) if inverse is not None else None
        )
        self.reconstruction = float("nan")

    def on_settled(self, engine: Any, batch: Any, result: Any) -> None:
        """Forward update from the target difference, then one inverse update."""
        if not self.active or self.name not in result.err:
            return
        super().on_settled(engine, batch, result)
        if self.inverse is not None:
            self.train_inverse(result.below[self.name])

    def train_inverse(self, h: torch.Tensor) -> float:
        """One local step of ``g`` on ``h̃ = h + σ ε``; returns ``½‖g(f(h̃)) − h̃‖²/B``."""
        eps = torch.randn(h.shape, generator=self.generator).to(h)
        noisy = h + self.noise * eps
        with torch.no_grad():
            out = self.forward(noisy)
            g_pre = self.inverse.pre(out)
            a = self.inverse.unit(g_pre)
        a.requires_grad_(True)
        rec = self.inverse.act(a).view(-1, *self.inverse.out_shape)
        diff = (rec - noisy).detach()
        (post_err,) = torch.autograd.grad(rec, a, grad_outputs=diff)
        v = self.inverse.unit.weight
        v.grad = self.inverse.unit.weight_grad(g_pre, post_err)
        self.inverse_optimizer.step()
        v.grad = None
        self.reconstruction = float(0.5 * diff.pow(2).sum() / h.shape[0])
        return self.reconstruction

    def state_dict(self) -> dict[str, Any]:
        """:class:`LocalRule`'s state plus the inverse's optimizer and last reconstruction."""
        state = super().state_dict()
        if self.inverse_optimizer is not None:
            state["inverse_optimizer"] = self.inverse_optimizer.state_dict()
        state["reconstruction"] = self.reconstruction
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the inverse's weights travel with its module)."""
        super().load_state_dict(state)
        if self.inverse_optimizer is not None:
            self.inverse_optimizer.load_state_dict(state["inverse_optimizer"])
        self.reconstruction = state["reconstruction"]


def build_inverses(
    encoder: Encoder, image_shape: tuple[int, int, int], generator=None
) -> dict[str, Inverse]:
    """Inverses ``g`` for stages 1..L−1 (h_l -> h_{l−1}) and every head (z -> h_l).

    The shapes are found by passing one zero image through ``encoder`` on the encoder's own
    device (a GPU encoder must not be given a CPU tensor); the inverses are built on the CPU
    (move them with ``.to(device)``).
    """
    shapes: list[tuple[int, ...]] = []
    w = next(encoder.parameters())
    with torch.no_grad():
        h = torch.zeros(1, *image_shape, dtype=w.dtype, device=w.device)
        for s in encoder.stages:
            h = s(h)[1]
            shapes.append(tuple(h.shape[1:]))
    out: dict[str, Inverse] = {}
    for i, stage in enumerate(encoder.stages):
        act = stage.act_name
        if i > 0:
            prev_act = encoder.stages[i - 1].act_name
            out[f"s{i}"] = Inverse(shapes[i], shapes[i - 1], prev_act, generator)
        dim = encoder.heads[i].unit.weight.shape[0]
        out[f"h{i}"] = Inverse((dim,), shapes[i], act, generator)
    return out


def make_rules(
    rule: str,
    encoder: Encoder,
    *,
    lr: float,
    generator: torch.Generator,
    inverses: dict[str, Inverse] | None = None,
    dtp_noise: float = 0.1,
) -> list[LocalRule]:
    """One callback per unit of ``encoder`` for rule ``"bp" | "rf" | "urf" | "dtp"``."""
    if rule not in RULES:
        raise ConfigError(f"rule {rule!r} is unknown; use one of {', '.join(RULES)}")
    if not lr > 0:
        raise ConfigError(f"lr = {lr} must be > 0 (e.g. 1e-3)")
    if rule == "dtp" and inverses is None:
        raise ConfigError("rule 'dtp' needs inverses; build them with build_inverses()")
    rules: list[LocalRule] = []
    for i, (stage, head) in enumerate(zip(encoder.stages, encoder.heads, strict=True)):
        for name, unit, fwd in ((f"s{i}", stage.unit, stage), (f"h{i}", head.unit, head)):
            if rule == "bp":
                rules.append(BP(name, unit, i, lr=lr))
            elif rule == "rf":
                rules.append(RF(name, unit, i, lr=lr, generator=generator))
            elif rule == "urf":
                rules.append(URF(name, unit, i, lr=lr, generator=generator))
            else:
                f = (lambda x, s=fwd: s(x)[1]) if fwd is stage else fwd
                rules.append(
                    DTP(
                        name,
                        unit,
                        i,
                        lr=lr,
                        forward=f,
                        inverse=inverses.get(name),
                        noise=dtp_noise,
                        generator=generator,
                    )
                )
    return rules
