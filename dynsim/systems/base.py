"""The :class:`System` interface: what evolves.

A system is an ODE on a batch of flat states ``u`` (B, D) driven by inputs ``x`` (B, D_in):

    τ du/ds = F(u, drive(x))

``drive`` is everything that depends on the input alone (e.g. ``W x``); it is computed once
per input and then held fixed while the state settles. Solvers only ever see
:meth:`System.field`; the readout ``r = f(u)`` is :meth:`System.rates`.
"""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = ("tanh", "linear", "relu")


def activation_fn(name: str):
    """The rate function ``f`` by name: ``tanh`` (default), ``linear`` (identity), ``relu``."""
    from dynsim.errors import ConfigError

    if name == "tanh":
        return torch.tanh
    if name == "linear":
        return lambda u: u
    if name == "relu":
        return torch.relu
    raise ConfigError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")


class System(nn.Module):
    """Base class of systems. Subclasses set ``state_size`` and implement the three maps."""

    state_size: int
    input_size: int

    def drive(self, x: torch.Tensor) -> torch.Tensor:
        """Input term held fixed during settling: (B, D_in) -> (B, D)."""
        raise NotImplementedError

    def field(self, u: torch.Tensor, drive: torch.Tensor) -> torch.Tensor:
        """Vector field ``du/ds``: (B, D), (B, D) -> (B, D), in units of 1/time."""
        raise NotImplementedError

    def rates(self, u: torch.Tensor) -> torch.Tensor:
        """Readout ``r = f(u)``: (B, D) -> (B, D)."""
        raise NotImplementedError
