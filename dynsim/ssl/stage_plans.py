"""Stage plans of layer-wise training: which stage (and head) is trained on each batch.

A stage planner is a callback: in ``on_input`` it picks a :class:`~dynsim.ssl.signals.Plan`,
hands it to the settler (which stages run with errors, which head carries the loss) and
switches the rule callbacks of the other units off. The engine's loop is unchanged.

- :class:`EndToEnd` (E2E): every stage, loss on the top head.
- :class:`Greedy` (GLL): stage s and head s, in order, earlier stages frozen (they run without
  errors and their callbacks are off); each stage has a budget of ``E // L`` epochs (the last
  stage: what is left of E) and ends earlier when a loss plateau calls :meth:`Greedy.advance`.
- :class:`RandomLayerwise` (RLL): each batch one stage at random, each stage the same
  number of times per epoch (±1 when L does not divide the number of batches). With the
  authors' budget an epoch holds L passes over the data, so every stage sees every image
  once per epoch (the pipeline's ``rll_budget``).
"""

from __future__ import annotations

from typing import Any

import torch

from dynsim.callbacks import Callback
from dynsim.errors import ConfigError
from dynsim.ssl.rules import LocalRule
from dynsim.ssl.signals import ContrastiveSignals, Plan

SCHEDULES = ("e2e", "gll", "rll")  # the planners by name (the CLI's --schedule of run ssl)


class StagePlanner(Callback):
    """Base class: subclasses implement :meth:`plan`.

    Parameters
    ----------
    settler : the settler whose ``plan`` is set per batch.
    rules : the plasticity callbacks; a rule is active iff its unit is in the plan.
    """

    def __init__(self, settler: ContrastiveSignals, rules: list[LocalRule]):
        self.settler = settler
        self.rules = rules
        self.n_stages = len(settler.encoder.stages)
        self.history: list[int] = []  # loss stage per batch

    def plan(self, batch: Any) -> Plan:
        """The plan for ``batch``."""
        raise NotImplementedError

    def on_input(self, engine: Any, batch: Any) -> None:
        """Set the settler's plan and switch the rule callbacks."""
        plan = self.plan(batch)
        self.settler.plan = plan
        units = plan.units()
        for rule in self.rules:
            rule.active = rule.name in units
        self.history.append(plan.top)

    def state_dict(self) -> dict[str, Any]:
        """The loss stage of every batch so far (for checkpoints)."""
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.history = list(state["history"])


class EndToEnd(StagePlanner):
    """All stages every batch; the loss sits on the last head."""

    def plan(self, batch: Any) -> Plan:  # noqa: D102
        return Plan(0, self.n_stages - 1)


class Greedy(StagePlanner):
    """Greedy layer-wise: one stage at a time, in order.

    Stage ``stage`` began at epoch ``stage_start``; it ends after ``epochs // L`` epochs (the
    last stage runs to the end of the budget) or earlier through :meth:`advance`.
    """

    def __init__(self, settler, rules, *, epochs: int):
        super().__init__(settler, rules)
        if epochs < self.n_stages:
            raise ConfigError(
                f"GLL with {self.n_stages} stages needs epochs >= {self.n_stages} "
                f"(got {epochs}); the epochs are shared equally among the stages"
            )
        self.epochs = epochs
        self.per_stage = epochs // self.n_stages
        self.stage = 0
        self.stage_start = 0

    def stage_of(self, epoch: int) -> int:
        """The stage trained in ``epoch`` on the budget alone (no plateau advances)."""
        return min(epoch // self.per_stage, self.n_stages - 1)

    def on_epoch_start(self, engine: Any, epoch: int) -> None:
        """Move to the next stage when the current one has used its budget."""
        if self.stage < self.n_stages - 1 and epoch - self.stage_start >= self.per_stage:
            self.stage += 1
            self.stage_start = epoch

    def advance(self, epoch: int) -> bool:
        """End the current stage after ``epoch``; False if it is the last stage."""
        if self.stage >= self.n_stages - 1:
            return False
        self.stage += 1
        self.stage_start = epoch + 1
        return True

    def plan(self, batch: Any) -> Plan:  # noqa: D102
        return Plan(self.stage, self.stage)

    def state_dict(self) -> dict[str, Any]:
        """The current stage and its first epoch (for checkpoints)."""
        return {**super().state_dict(), "stage": self.stage, "stage_start": self.stage_start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.stage, self.stage_start = state["stage"], state["stage_start"]


class RandomLayerwise(StagePlanner):
    """Random layer-wise: a fresh balanced random order of stages each epoch.

    Parameters
    ----------
    batches_per_epoch : number of batches in an epoch.
    generator : seeds the orders.
    """

    def __init__(self, settler, rules, *, batches_per_epoch: int, generator: torch.Generator):
        super().__init__(settler, rules)
        self.batches_per_epoch = batches_per_epoch
        self.generator = generator
        self.order = torch.zeros(0, dtype=torch.long)
        self.counts: list[list[int]] = []  # per epoch, batches per stage

    def on_epoch_start(self, engine: Any, epoch: int) -> None:
        """Draw this epoch's balanced order of stages."""
        n, L = self.batches_per_epoch, self.n_stages
        # which stages get the extra batches when L does not divide n: random too
        extra = torch.randperm(L, generator=self.generator)
        base = torch.cat([torch.arange(L).repeat(n // L), extra[: n % L]])
        self.order = base[torch.randperm(n, generator=self.generator)]
        self.counts.append(torch.bincount(self.order, minlength=L).tolist())

    def plan(self, batch: Any) -> Plan:  # noqa: D102
        s = int(self.order[batch.number % max(len(self.order), 1)])
        return Plan(s, s)

    def state_dict(self) -> dict[str, Any]:
        """Generator state, this epoch's order and the counts so far (for checkpoints)."""
        return {
            **super().state_dict(),
            "generator": self.generator.get_state(),
            "order": self.order.clone(),
            "counts": [list(c) for c in self.counts],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])
        self.order = state["order"].clone()
        self.counts = [list(c) for c in state["counts"]]


def make_schedule(
    name: str,
    settler: ContrastiveSignals,
    rules: list[LocalRule],
    *,
    epochs: int,
    batches_per_epoch: int,
    generator: torch.Generator,
) -> StagePlanner:
    """Stage planner by name: ``"e2e"``, ``"gll"`` or ``"rll"``."""
    if name == "e2e":
        return EndToEnd(settler, rules)
    if name == "gll":
        return Greedy(settler, rules, epochs=epochs)
    if name == "rll":
        return RandomLayerwise(
            settler, rules, batches_per_epoch=batches_per_epoch, generator=generator
        )
    raise ConfigError(f"schedule {name!r} is unknown; use one of {', '.join(SCHEDULES)}")


Schedule = StagePlanner
"""Deprecated name of :class:`StagePlanner`."""
