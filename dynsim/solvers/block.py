"""Block Gauss–Seidel over layers with per-site Newton inside each layer (deep networks).

In the deep network (eq. 15 of Obeid, Ramambason & Pehlevan 2019) layer ``p`` couples to
its neighbours only through its external input

    b_p = W_p r_{p−1}/m_p + γ m_{p+1} W_{p+1}ᵀ r_{p+1},     F_p(u) = (−u_p + b_p + s·A_p f(g_p u_p))/τ,

and, for lateral distance 0, ``F_p = 0`` with ``b_p`` held fixed splits into one
``nps``-dimensional problem per site. One step of :class:`BlockNewton` is a sweep
``p = 1 … P``: compute ``b_p`` from the *newest* rates below and the current rates above
(Gauss–Seidel), then take one per-site Newton step on layer ``p``
(``DeepHebbianNet.layer_newton_step``). With γ = 0 the coupling is block lower-triangular
and the sweep is Newton's method on a triangular system (each layer sees its converged
input after the layer below converges); with γ > 0 the feedback enters as a lagged term,
which converges linearly at a rate of order γ‖W_{p+1}‖² f'.

With ``inner_tol`` (what ``--solver auto`` picks, with the threshold T: ``block,inner_tol=T``)
each layer of a sweep takes per-site Newton steps with ``b_p`` fixed until its own
``‖F_p‖/‖u_p‖ < inner_tol`` (at most ``inner_max``), i.e. nonlinear block Gauss–Seidel with
exact layer solves: with γ = 0 one sweep solves the network and the next only tests it, so the
upper layers' feed-forward maps run once per sweep instead of once per Newton step (the cost of
a sweep step is then ~2× one layer's settle; benchmarks/deep_settle.py). Without it (default)
a sweep takes one Newton step per layer.

The first sweep (``picard_start``, default True) is a Picard sweep ``u_p ← b_p + s·A_p r_p``
(from rest: ``u_1 = W_1 x/m_1``, then ``u_2 = W_2 f(g_1 u_1)/m_2`` …), the deep analogue of
:class:`~dynsim.solvers.SiteNewton`'s start. Safeguard: from sweep ``damp_after`` (default 20)
on, a sample still running takes half steps ``u ← u + ½Δu``. With saturated rates
(``f' ≈ 0``) the Newton step is nearly a Picard step ``u ← b + s·A f(u)``, which can cycle
between two states when the lateral coupling is strong (seen on the authors' default
settings after 3000 training images: 3 of 1000 test images hit the 3000-sweep cap);
halving the step averages such a cycle away. Each step returns the vector field at the
state it was given, so :func:`dynsim.settle` judges the same residual (every layer's
``‖du_p/ds‖/‖u_p‖`` by default) as for any other solver.

The system must provide ``split``, ``layer_rates``, ``feedforward_input``, ``layer_feedback``,
``layer_newton_step``, ``layers_site_separable`` and ``activation``
(:class:`~dynsim.systems.deep.DeepHebbianNet` does). A single
:class:`~dynsim.systems.HebbianLayer` is one block: there the method *is*
:class:`~dynsim.solvers.SiteNewton` (including its compiled CPU loop).
"""

from __future__ import annotations

import torch

from dynsim.errors import ConfigError
from dynsim.solvers.base import StepResult
from dynsim.solvers.newton import SiteNewton
from dynsim.stopping import relative_norm

_NEEDS = ("split", "layer_rates", "feedforward_input", "layer_feedback", "layer_newton_step", "gamma")


class BlockNewton(SiteNewton):
    """Block Gauss–Seidel sweeps over layers, per-site Newton inside each (module docstring).

    One step = one sweep: every layer's field once and one batched nps × nps solve per site
    of every layer (counted as one field evaluation); with ``inner_tol``, up to ``inner_max``
    such solves per layer (counted as the largest number of field evaluations of any layer;
    the torch path counts the batch's slowest sample, the compiled loop each sample's own). The feed-forward inputs
    ``W_p r_{p−1}/m_p`` computed in a sweep are the solver state: they are the next sweep's
    inputs at its starting state, so each sweep maps every layer's rates up once.

    Examples
    --------
    >>> from dynsim import settle, stop_rule
    >>> from dynsim.systems.deep import DeepHebbianNet, LayerSpec
    >>> net = DeepHebbianNet((1, 8, 8), [LayerSpec(2, 2, 3.0), LayerSpec(2, 1, 2.0)], gamma=0.1)
    >>> res = settle(net, torch.randn(4, 64), solver=BlockNewton(), stop=stop_rule(1e-6, 100))
    >>> bool(res.converged.all()), int(res.steps.max()) < 15
    (True, True)
    """

    name = "block"
    evals_per_step = 1

    def __init__(self, picard_start: bool | str | int = True, damp_after: int = 20, inner_tol: float | None = None,
                 inner_max: int = 50):
        super().__init__(picard_start)
        if isinstance(damp_after, bool) or not isinstance(damp_after, int) or damp_after < 1:
            raise ConfigError(f"damp_after must be an integer >= 1 (sweeps), got {damp_after!r}")
        if inner_tol is not None and (isinstance(inner_tol, bool) or not isinstance(inner_tol, (int, float))
                                      or not 0 < inner_tol < float("inf")):
            raise ConfigError(f"inner_tol must be a number > 0 (a layer's ‖F_p‖/‖u_p‖) or none, got {inner_tol!r}")
        if isinstance(inner_max, bool) or not isinstance(inner_max, int) or inner_max < 1:
            raise ConfigError(f"inner_max must be an integer >= 1 (Newton steps per layer and sweep), "
                              f"got {inner_max!r}")
        self.damp_after = damp_after
        self.inner_tol = None if inner_tol is None else float(inner_tol)
        self.inner_max = inner_max

    def __repr__(self) -> str:
        inner = "" if self.inner_tol is None else f", inner_tol={self.inner_tol!r}, inner_max={self.inner_max}"
        return f"BlockNewton(picard_start={self.picard_start}, damp_after={self.damp_after}{inner})"

    def _layer_solve(self, system, p: int, u_p: torch.Tensor, b: torch.Tensor, lateral_at_u, picard: bool, n: int):
        """Layer ``p``'s update with its input ``b`` held fixed: ``(v, τ-less field F_p at u_p, evaluations)``.

        ``inner_tol`` None: one Picard (``picard``) or per-site Newton step. Else per-site Newton
        steps (the first a Picard step when ``picard``) until each sample's ``‖F_p‖/‖u_p‖ <
        inner_tol`` or ``inner_max`` steps; a sample that has met the test keeps its state."""
        tau = system.tau

        def one(v, j, f=None):
            if picard and j == 0:
                f = (b - v + lateral_at_u) / tau if f is None else f
                return v + tau * f, f
            v_new, f = system.layer_newton_step(p, v, b)
            if n >= self.damp_after or j >= self.damp_after:  # safeguard: half steps
                v_new = v + 0.5 * (v_new - v)
            return v_new, f

        v, f_first = one(u_p, 0)
        if self.inner_tol is None:
            return v, f_first, 1
        v, v_new, f, evals = u_p, v, f_first, 1
        done = torch.zeros(u_p.shape[0], dtype=torch.bool, device=u_p.device)
        for j in range(self.inner_max):
            if j:
                v_new, f = one(v, j)
                evals += 1
            done |= relative_norm(f, v) < self.inner_tol
            if bool(done.all()):
                break
            v = torch.where(done[:, None], v, v_new)
        return v, f_first, evals

    @staticmethod
    def _system(field):
        system = getattr(field, "system", None)
        if system is None or not all(hasattr(system, name) for name in _NEEDS):
            raise ConfigError(
                "the block solver needs a layered system with per-layer Newton steps (a deep network, "
                "dynsim.systems.deep.DeepHebbianNet) run through dynsim.settle; use --solver newton for "
                "one layer or --solver euler"
            )
        if not system.layers_site_separable:
            raise ConfigError(
                "the block solver needs lateral distance 0 in every layer (per-site Newton); "
                "use --solver euler for this network"
            )
        return system

    def step(self, field, u, state, n):
        if not hasattr(getattr(field, "system", None), "layer_newton_step"):
            return super().step(field, u, state, n)  # one layer: per-site Newton
        system = self._system(field)
        drive, tau = field.drive, system.tau
        us = system.split(u)
        last = len(us) - 1
        old: list[torch.Tensor | None] = [None] * len(us)  # rates at u, computed where needed

        def old_rate(p: int) -> torch.Tensor:
            if old[p] is None:
                old[p] = system.layer_rates(p, us[p])
            return old[p]

        picard = n == 0 and self.picard_start and system.activation == "tanh"
        u_next, f_at_u, carried = [], [], []
        evals = 1
        r_below = None  # the newest rates of the layer below
        for p, u_p in enumerate(us):
            if p == 0:
                ff_old = ff_new = drive[:, : u_p.shape[1]]
            else:  # the last sweep's W_p r_{p-1}/m_p is this sweep's input at u (solver state)
                ff_old = state[p - 1] if state is not None else system.feedforward_input(p, old_rate(p - 1))
                ff_new = system.feedforward_input(p, r_below)
                carried.append(ff_new)
            fb = None
            if system.gamma and p < last:  # the layer above still holds its rates at u
                fb = system.layer_feedback(p, {p + 1: old_rate(p + 1)})
            b_new = ff_new if fb is None else ff_new + fb
            lateral = system.lateral_sign * system.layers[p].lateral_input(old_rate(p)) if picard else None
            v, f_new, used = self._layer_solve(system, p, u_p, b_new, lateral, picard, n)
            evals = max(evals, used)
            f_at_u.append(f_new if p == 0 else f_new + (ff_old - ff_new) / tau)  # F_p at the given u
            u_next.append(v)
            if p < last:
                r_below = system.layer_rates(p, v)
        return StepResult(torch.cat(u_next, dim=1), torch.cat(f_at_u, dim=1), carried, evals)  # one sweep
