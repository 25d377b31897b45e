"""The :class:`System` interface: what evolves.

A system is an ODE on a batch of flat states ``u`` (B, D) driven by inputs ``x`` (B, D_in):

    τ du/ds = F(u, drive(x))

``drive`` is everything that depends on the input alone (e.g. ``W x``); it is computed once
per input and then held fixed while the state settles. Solvers only ever see
:meth:`System.field`; the readout ``r = f(u)`` is :meth:`System.rates`.

A system is also an ``f(t, u)`` module, as torchdiffeq and torchode expect: after
``system.hold(x)`` (the input held fixed), ``system(t, u)`` is ``du/ds`` at ``u``, so
``torchdiffeq.odeint(layer.hold(x), u0, t)`` integrates the same ODE that :func:`dynsim.settle` does.

Systems that a Newton-type solver can settle also follow :class:`BlockJacobian`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

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

    def hold(self, x: torch.Tensor) -> System:
        """Hold the input ``x`` (B, D_in) fixed for :meth:`forward`; returns ``self``."""
        self._held_drive = self.drive(x)
        return self

    def forward(self, t, u: torch.Tensor) -> torch.Tensor:
        """``du/ds`` at ``u`` (B, D) for the input held by :meth:`hold` (autonomous: ``t`` unused)."""
        drive = self.__dict__.get("_held_drive")
        if drive is None:
            from dynsim.errors import ConfigError

            raise ConfigError(f"{type(self).__name__}(t, u) needs an input: call .hold(x) first")
        return self.field(u, drive)


@runtime_checkable
class BlockJacobian(Protocol):
    """A system whose fixed-point equation splits into independent blocks of ``block_size`` states.

    ``jacobian_blocks(u, drive) -> (G, J)``: ``G = τF(u)`` as (B, S, M) blocks and its Jacobian
    ``J = ∂G/∂u`` (B, S, M, M), block ``k`` depending only on ``u``'s block ``k``;
    ``newton_safeguard(u_next, drive) -> u_next`` ((B, S, M)) may move a Newton iterate back
    into a region known to hold the fixed points (identity if none). ``state_size`` = S·M.
    """

    state_size: int
    block_size: int

    def jacobian_blocks(self, u: torch.Tensor, drive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def newton_safeguard(self, u_next: torch.Tensor, drive: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class FactoredJacobian(Protocol):
    """A :class:`BlockJacobian` whose block Jacobians are ``J_k = −I + a_k diag(c_k)``.

    ``jacobian_factors(u, drive) -> (G, a, c, symmetric)``: ``G = τF(u)`` (B, S, M), the blocks
    ``a`` (S, M, M) shared by every sample, the per-sample diagonal ``c`` (B, S, M) ≥ 0 and whether
    all ``a_k`` are symmetric. A Newton–Krylov solver applies ``J`` without forming it.
    """

    state_size: int
    block_size: int

    def jacobian_factors(self, u: torch.Tensor, drive: torch.Tensor): ...

    def jacobian_blocks(self, u: torch.Tensor, drive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def newton_safeguard(self, u_next: torch.Tensor, drive: torch.Tensor) -> torch.Tensor: ...
