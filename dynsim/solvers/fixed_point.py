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
from dynsim.solvers.base import Solver, StepResult


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
    >>> from dynsim import HebbianLayer, settle, ResidualBelow, MaxSteps
    >>> layer = HebbianLayer((1, 8, 8), nps=2, stride=2, radius=3.0)
    >>> res = settle(layer, torch.randn(3, 64), solver=Anderson(beta=0.5),
    ...              stop=ResidualBelow(1e-6) | MaxSteps(500))
    >>> bool(res.converged.all())
    True
    """

    name = "anderson"

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
        # previous g and r, ring buffers of the last m differences (B, m, D), steps taken
        return {"g": None, "r": None, "dg": None, "dr": None, "best": None, "count": 0}

    def step(self, field, u, state, n):
        f = field(u, n * self.beta)  # the damped map is an Euler step of size β: time n·β
        r = self.beta * f
        g = u + r
        count = state["count"]
        rn = torch.linalg.vector_norm(r, dim=1)
        if count == 0:
            b, d = u.shape
            dg = u.new_empty(b, self.memory, d)
            dr = u.new_empty(b, self.memory, d)
            return StepResult(g, f, {"g": g, "r": r, "dg": dg, "dr": dr, "best": rn, "count": 1}, 1)
        dg, dr = state["dg"], state["dr"]
        slot = (count - 1) % self.memory  # column order does not matter to least squares
        torch.sub(g, state["g"], out=dg[:, slot])
        torch.sub(r, state["r"], out=dr[:, slot])
        k = min(count, self.memory)
        dgk, drk = dg[:, :k], dr[:, :k]
        gram = torch.bmm(drk, drk.transpose(1, 2))  # (B, k, k)
        scale = torch.diagonal(gram, dim1=1, dim2=2).mean(dim=1)
        best = torch.minimum(state["best"], rn)
        plain = scale <= 0  # no usable history: a plain damped step
        if self.restart is not None:
            plain = plain | (rn > self.restart * best)
        reg = self.reg * scale + torch.finfo(u.dtype).tiny
        gram.diagonal(dim1=1, dim2=2).add_(reg[:, None])
        gamma = torch.linalg.solve_ex(gram, torch.bmm(drk, r[:, :, None]))[0]  # (B, k, 1)
        ok = torch.isfinite(gamma).all(dim=1) & ~plain[:, None]  # (B, 1)
        gamma = torch.where(ok[:, :, None], gamma, 0.0)
        u_next = g - torch.bmm(dgk.transpose(1, 2), gamma)[:, :, 0]
        return StepResult(u_next, f, {"g": g, "r": r, "dg": dg, "dr": dr, "best": best, "count": count + 1}, 1)

    def select(self, state, keep):
        return {key: (v[keep] if isinstance(v, torch.Tensor) else v) for key, v in state.items()}
