"""Which implementation runs: the torch path everywhere, the compiled CPU kernels where they apply.

Three computations have a compiled backend (numba): settling a site-separable
:class:`~dynsim.systems.HebbianLayer` (:mod:`dynsim.compiled`; with Newton–CG at any NpS,
:mod:`dynsim.compiled_cg`) and a deep network of such layers
(:mod:`dynsim.compiled_deep`: block sweeps or Euler), both called by :func:`dynsim.settle`,
and the batch-1 Hebbian update (called by :func:`dynsim.plasticity.hebbian_update`). The torch
implementations are the definitions; the kernels compute the same formulas and are tested for
parity against them (``tests/test_compiled.py``, and the solver conformance table run with and
without them). This module is the one place that asks the kernels whether they apply, so
solvers, systems and plasticity rules never import them.
"""

from __future__ import annotations

import torch

from dynsim import compiled, compiled_cg, compiled_deep


def compiled_settle(system, x: torch.Tensor, u0, solver, limits, max_state_norm: float):
    """``SettleResult`` fields from the compiled loop, or ``None`` (then settle's torch loop runs)."""
    fast = compiled.settle_backend(system, x, u0, solver, limits, max_state_norm)
    if fast is None:
        fast = compiled_cg.settle_backend(system, x, u0, solver, limits, max_state_norm)
    if fast is None and hasattr(system, "layers"):
        fast = compiled_deep.settle_backend(system, x, u0, solver, limits, max_state_norm)
    return fast


def compiled_hebbian_update(layer, x: torch.Tensor, r: torch.Tensor, rate_ff: float, rate_lat: float) -> bool:
    """Apply one sample's update ``W += rate_ff (r xᵀ − W)``, ``L += rate_lat (r rᵀ − L)`` with the
    compiled kernel if it applies (batch 1, a layer and tensors it handles); False if it did not."""
    if x.shape[0] != 1 or not compiled.applies(layer, x, r, max_nps=None):  # site-first: any NpS
        return False
    compiled.hebbian_update_online(layer, x, r, rate_ff, rate_lat)
    return True
