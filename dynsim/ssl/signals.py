"""The learning signals of one SSL batch: deform, forward, hinge loss, and the errors each unit sees.

The engine calls :class:`ContrastiveSignals` once per batch, in the slot where a dynamical
network would settle (the stages here are feed-forward: nothing settles, one pass computes
everything). What differs between learning rules is how the top-layer error reaches the layers below:

- ``propagation="error"`` (BP, RF, URF): the error goes down through each unit's feedback
  (``Wᵀ`` for BP, ``B`` for RF/URF, see :mod:`dynsim.ssl.stages`); the result holds, per
  trained unit, its input ``pre`` and its post-synaptic error ``err = dL/da``;
- ``propagation="target"`` (DTP, Lee et al. 2015): targets go down through learned
  inverses, ``ĥ_{l−1} = h_{l−1} + g_l(ĥ_l) − g_l(h_l)``, from the top target
  ``ẑ = z − η dL/dz``; ``err`` is then the post-synaptic target difference
  ``d(½‖h_l − ĥ_l‖²)/da_l`` (routed only through the stage's own activation and pool).

The plasticity callbacks (:mod:`dynsim.ssl.rules`) turn ``pre`` and ``err`` into updates.
Which stages run and which head carries the loss is set per batch by a stage planner
(:mod:`dynsim.ssl.stage_plans`) through :attr:`ContrastiveSignals.plan`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from dynsim.errors import ConfigError
from dynsim.ssl.augment import Deform
from dynsim.ssl.loss import hinge_loss
from dynsim.ssl.stages import Encoder

VIEWS = ("clean+deformed", "two")
"""How the two views of an image are made (Tang, Yang & Amit 2022: CIFAR code / STL-10 code)."""


@dataclass(frozen=True)
class Plan:
    """Stages ``first..top`` are trained this batch; head ``top`` carries the loss."""

    first: int
    top: int

    def units(self) -> set[str]:
        """Names of the units trained under this plan."""
        return {f"s{i}" for i in range(self.first, self.top + 1)} | {f"h{self.top}"}


@dataclass
class SSLStep:
    """What one batch produced.

    Attributes
    ----------
    loss : scalar hinge loss (sum over pairs).
    plan : the plan it ran under.
    pre : unit name -> the unit's input (2B, ...) (both views stacked).
    err : unit name -> post-synaptic error or target difference at the unit's output.
    below : unit name -> the stage/head input in its native shape (for DTP inverses).
    """

    loss: torch.Tensor
    plan: Plan
    pre: dict[str, torch.Tensor] = field(default_factory=dict)
    err: dict[str, torch.Tensor] = field(default_factory=dict)
    below: dict[str, torch.Tensor] = field(default_factory=dict)


class ContrastiveSignals:
    """Callable ``(batch, on_step) -> SSLStep`` for the engine.

    Parameters
    ----------
    encoder : the :class:`~dynsim.ssl.stages.Encoder` being trained.
    image_shape : (C, H, W); ``batch.x`` (B, C*H*W) is viewed to it.
    deform : the random deformation making the views.
    views : ``"clean+deformed"`` (z = f(x), z' = f(deform(x)): the authors' CIFAR code) or
        ``"two"`` (z = f(deform(x)), z' = f(deform'(x)), two independent deformations: their
        STL-10 code); see :data:`VIEWS`.
    tau, delta, negatives, grad_block, wrap : hinge-loss settings (:func:`hinge_loss`).
    propagation : ``"error"`` or ``"target"`` (see the module docstring).
    inverses : for ``"target"``, unit name -> inverse module ``g`` (h_l -> h_{l−1}).
    target_step : η of the DTP top target ``ẑ = z − η dL/dz``.
    generator : seeds the deformations.
    """

    def __init__(
        self,
        encoder: Encoder,
        image_shape: tuple[int, int, int],
        deform: Deform,
        *,
        tau: float,
        delta: float,
        negatives: int | None,
        grad_block: bool,
        wrap: bool = False,
        views: str = "clean+deformed",
        propagation: Literal["error", "target"] = "error",
        inverses: dict[str, nn.Module] | None = None,
        target_step: float = 0.1,
        generator: torch.Generator,
    ):
        if propagation not in ("error", "target"):
            raise ConfigError(f"propagation {propagation!r} is unknown; use 'error' or 'target'")
        if views not in VIEWS:
            raise ConfigError(f"views {views!r} is unknown; use one of {', '.join(VIEWS)}")
        if propagation == "target" and inverses is None:
            raise ConfigError("propagation='target' (DTP) needs the learned inverses")
        self.encoder = encoder
        self.image_shape = tuple(image_shape)
        self.deform = deform
        self.hinge = dict(tau=tau, delta=delta, negatives=negatives, grad_block=grad_block, wrap=wrap)
        self.views = views
        self.channels_last = True  # memory layout of the batch (NHWC); benchmarks/ssl_step.py compares
        self.propagation = propagation
        self.inverses = inverses or {}
        self.target_step = target_step
        self.generator = generator
        n = len(encoder.stages)
        self.plan = Plan(0, n - 1)

    def __call__(self, batch: Any, on_step: Any = None) -> SSLStep:
        x = batch.x.view(-1, *self.image_shape)
        n = x.shape[0]
        first = x if self.views == "clean+deformed" else self.deform(x, self.generator)
        x2 = torch.cat([first, self.deform(x, self.generator)])
        if x2.dim() == 4 and self.channels_last:  # NHWC: faster pooling and convolutions on CPU
            x2 = x2.contiguous(memory_format=torch.channels_last)
        plan = self.plan
        stages = self.encoder.stages
        with torch.no_grad():  # frozen stages below the trained ones
            h = x2
            for s in stages[: plan.first]:
                h = s(h)[1]
        if self.propagation == "error":
            return self._error_step(h, n, plan)
        return self._target_step(h, n, plan)

    def _error_step(self, h: torch.Tensor, n: int, plan: Plan) -> SSLStep:
        out = SSLStep(loss=torch.zeros(()), plan=plan)
        outputs: dict[str, torch.Tensor] = {}
        h = h.detach()
        for i in range(plan.first, plan.top + 1):
            stage = self.encoder.stages[i]
            out.pre[f"s{i}"] = stage.pre(h).detach()
            a = stage.unit(stage.pre(h))
            outputs[f"s{i}"] = a
            h = stage.post(a)
        head = self.encoder.heads[plan.top]
        out.pre[f"h{plan.top}"] = head.pre(h).detach()
        z = head.unit(head.pre(h))
        outputs[f"h{plan.top}"] = z
        r = hinge_loss(z[:n], z[n:], **self.hinge)
        out.loss = r.loss
        names = list(outputs)
        errs = torch.autograd.grad(
            z, [outputs[k] for k in names], grad_outputs=torch.cat([r.err, r.err_prime])
        )
        out.err = {k: e.detach() for k, e in zip(names, errs, strict=True)}
        return out

    def _target_step(self, h: torch.Tensor, n: int, plan: Plan) -> SSLStep:
        out = SSLStep(loss=torch.zeros(()), plan=plan)
        acts: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (name, a leaf, h)
        hs = [h.detach()]
        for i in range(plan.first, plan.top + 1):
            stage = self.encoder.stages[i]
            name = f"s{i}"
            out.below[name] = hs[-1]
            out.pre[name] = stage.pre(hs[-1])
            with torch.no_grad():
                a = stage.unit(out.pre[name])
            a = a.requires_grad_(True)
            with torch.enable_grad():
                h_i = stage.post(a)
            acts.append((name, a, h_i))
            hs.append(h_i.detach())
        head = self.encoder.heads[plan.top]
        name = f"h{plan.top}"
        out.below[name] = hs[-1]
        out.pre[name] = head.pre(hs[-1])
        with torch.no_grad():
            z = head.unit(out.pre[name])
        r = hinge_loss(z[:n], z[n:], **self.hinge)
        out.loss = r.loss
        top_err = torch.cat([r.err, r.err_prime])
        # top layer: ẑ = z − η dL/dz, so d(½‖z − ẑ‖²)/dz = η dL/dz
        out.err[name] = self.target_step * top_err
        with torch.no_grad():
            target = self._difference_target(name, z - self.target_step * top_err, z, hs[-1])
        for k in range(len(acts) - 1, -1, -1):
            sname, a, h_i = acts[k]
            diff = h_i.detach() - target  # h_l − ĥ_l
            (out.err[sname],) = torch.autograd.grad(h_i, a, grad_outputs=diff)
            if k > 0:
                with torch.no_grad():
                    target = self._difference_target(sname, target, h_i.detach(), hs[k])
        return out

    def _difference_target(
        self, name: str, target: torch.Tensor, h: torch.Tensor, h_below: torch.Tensor
    ) -> torch.Tensor:
        """ĥ_{l−1} = h_{l−1} + g_l(ĥ_l) − g_l(h_l)."""
        g = self.inverses[name]
        return h_below + g(target)[1] - g(h)[1]
