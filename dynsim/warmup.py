"""Compiled kernels ready before a run's progress bar starts.

The first run on a machine compiles :mod:`dynsim.compiled`'s kernels (~10 s; numba then caches
them beside the package or under ``NUMBA_CACHE_DIR``). Done inside the first training step, that
time made the progress bar extrapolate a first-image rate into an ETA of days. :func:`warm_up`
settles and updates a tiny 8×8 network once, with the same code paths (Newton, Euler, batched,
online Hebbian update, the engine's fused online backend) and dtype, so compilation — announced
once per machine — or loading the cache (well under a second) happens before any bar or timer
starts.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
COMPILING_MESSAGE = "compiling kernels (once per machine, ~10 s)"
_warm = False


def kernels_cached() -> bool:
    """Whether numba's cache of the compiled kernels exists on this machine."""
    from dynsim import compiled

    folder = Path(os.environ.get("NUMBA_CACHE_DIR") or Path(compiled.__file__).parent / "__pycache__")
    return folder.is_dir() and any(folder.rglob("compiled.*.nbi"))


def warm_up(dtype: torch.dtype = torch.float32) -> bool:
    """Compile or load the kernels now (no-op when numba is absent, switched off, or already
    done in this process); log :data:`COMPILING_MESSAGE` when they must be compiled.
    Returns whether anything was done."""
    global _warm
    from dynsim import compiled

    if _warm or not compiled.available():
        return False
    if not kernels_cached():
        logger.info(COMPILING_MESSAGE)
    from dynsim.settle import settle
    from dynsim.solvers import Euler, SiteNewton
    from dynsim.stopping import MaxSteps, RelativeChange
    from dynsim.systems import HebbianLayer

    layer = HebbianLayer((1, 8, 8), nps=2, stride=2, radius=3.0).to(dtype)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0), dtype=dtype)
    stop = RelativeChange(1e-4) | MaxSteps(20)
    with torch.no_grad():
        for solver in (SiteNewton(), Euler()):
            for batch in (x[:1], x):
                res = settle(layer, batch, solver=solver, stop=stop)
        if compiled.applies(layer, x[:1], res.r[:1]):
            compiled.hebbian_update_online(layer, x[:1], res.r[:1], 1e-3, 5e-4)
        from dynsim.engine import DynamicsSettler, Engine, EpochDraws
        from dynsim.plasticity import SimilarityMatchingRule

        Engine(DynamicsSettler(layer, SiteNewton(), stop), [SimilarityMatchingRule(layer)], progress=False).fit(
            EpochDraws(x, images=2, batch_size=1, seed=0), 1)  # the fused online kernel
    _warm = True
    return True
