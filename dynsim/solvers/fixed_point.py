"""Anderson-accelerated fixed-point iteration for the settled state.

The settled state solves ``F(u) = 0``. Anderson acceleration (type II, Walker & Ni 2011)
works on the damped map ``g(u) = u + β·F(u)`` (a forward-Euler step of size β, whose
fixed points are those of ``F``) with residual ``r(u) = g(u) − u = β·F(u)``. With the
last ``k ≤ m`` differences ``ΔR = [r_{i+1} − r_i]``, ``ΔG = [g_{i+1} − g_i]`` of each
sample it solves the regularised least-squares problem

    γ = argmin ‖r_n − ΔR γ‖² + λ·s·‖γ‖²,   s = mean diag(ΔRᵀΔR)

and steps to ``u_{n+1} = g(u_n) − ΔG γ``. One field evaluation per step. The history is
per sample (rows of (B, k, D) tensors); within one :func:`dynsim.settle` call all running
samples have taken the same number of steps, so the history length is shared.
"""

from __future__ import annotations

import math

import torch

from dynsim.errors import ConfigError
from dynsim.solvers.base import Solver


class Anderson(Solver):
    """Anderson acceleration of ``u ← u + β·F(u)``.

    Parameters
    ----------
    beta : float
        Damping (the Euler step of the underlying map, time units). Plain fixed-point
        iteration (β = 1) does not converge for the Hebbian layer's lateral term; 0.1–0.5 do.
    memory : int
        Number of past differences kept per sample (m).
    reg : float
        Relative Tikhonov regularisation λ of the least-squares problem.
    restart : float or None
        If a sample's ``‖r‖`` grows by more than this factor over the best it has seen,
        its history is dropped (plain damped step), a cheap safeguard. ``None``: never.

    Examples
    --------
    >>> import torch
    >>> from dynsim import HebbianLayer, settle, RelativeChange, MaxSteps
    >>> layer = HebbianLayer((1, 8, 8), nps=2, stride=2, radius=3.0)
    >>> res = settle(layer, torch.randn(3, 64), solver=Anderson(beta=0.5),
    ...              stop=RelativeChange(1e-6) | MaxSteps(500))
    >>> bool(res.converged.all())
    True
    """

    name = "anderson"
    evals_per_step = 1

    def __init__(
        self, *, beta: float = 0.5, memory: int = 5, reg: float = 1e-8, restart: float | None = 1e3
    ):
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
            raise ConfigError(f"anderson: beta must be a positive number, got {beta!r}")
        if not (isinstance(memory, int) and memory >= 1):
            raise ConfigError(f"anderson: memory must be an integer >= 1, got {memory!r}")
        if not (reg >= 0):
            raise ConfigError(f"anderson: reg must be >= 0, got {reg!r}")
        self.beta, self.memory, self.reg, self.restart = beta, memory, reg, restart

    def __repr__(self) -> str:
        return f"Anderson(beta={self.beta}, memory={self.memory}, reg={self.reg})"

    def init(self, field, u0):
        # previous g and r (B, 1, D) and the difference histories (B, k, D)
        return {"g": None, "r": None, "dg": None, "dr": None, "best": None}

    def step(self, field, u, state, n):
        f = field(u)
        r = self.beta * f
        g = u + r
        rn = torch.linalg.vector_norm(r, dim=1)
        best = rn if state["best"] is None else torch.minimum(state["best"], rn)
        if state["g"] is None:
            return g, f, {"g": g, "r": r, "dg": None, "dr": None, "best": best}
        dg_new = (g - state["g"])[:, None]
        dr_new = (r - state["r"])[:, None]
        dg = (
            dg_new
            if state["dg"] is None
            else torch.cat([state["dg"], dg_new], 1)[:, -self.memory :]
        )
        dr = (
            dr_new
            if state["dr"] is None
            else torch.cat([state["dr"], dr_new], 1)[:, -self.memory :]
        )
        gram = dr @ dr.transpose(1, 2)  # (B, k, k)
        k = gram.shape[1]
        scale = torch.diagonal(gram, dim1=1, dim2=2).mean(dim=1)
        eye = torch.eye(k, dtype=u.dtype, device=u.device)
        lhs = gram + (self.reg * scale + torch.finfo(u.dtype).tiny)[:, None, None] * eye
        plain = scale <= 0  # no usable history: a plain damped step
        if self.restart is not None:
            plain |= rn > self.restart * best
        lhs = torch.where(plain[:, None, None], eye.expand_as(lhs), lhs)
        rhs = dr @ r[:, :, None]  # (B, k, 1)
        gamma = torch.linalg.solve_ex(lhs, rhs)[0]
        gamma = torch.nan_to_num(gamma, nan=0.0, posinf=0.0, neginf=0.0)
        gamma = torch.where(plain[:, None, None], torch.zeros_like(gamma), gamma)
        u_next = g - (dg.transpose(1, 2) @ gamma)[:, :, 0]
        return u_next, f, {"g": g, "r": r, "dg": dg, "dr": dr, "best": best}

    def select(self, state, keep):
        return {key: (None if v is None else v[keep]) for key, v in state.items()}
