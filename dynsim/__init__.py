"""dynsim: continuous-time Hebbian networks with pluggable ODE solvers.

>>> import torch, dynsim
>>> layer = dynsim.HebbianLayer((1, 8, 8), nps=4, stride=2, radius=3.0)
>>> res = dynsim.settle(layer, torch.randn(2, 64), solver=dynsim.Euler(),
...                     stop=dynsim.ResidualBelow(1e-4) | dynsim.MaxSteps(3000))
>>> res.r.shape
torch.Size([2, 64])
"""

import os

# Before torch loads its OpenMP runtime (a no-op if it already has; a user's choice wins): torch's
# OpenMP workers otherwise spin after every parallel op, and while the compiled kernels' own
# threads settle an evaluation batch (--threads > 1) the spinning took the cores from them
# (benchmarks/README.md, issue 14 item 3). Passive waiting costs torch's large ops nothing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from dynsim._version import __version__
from dynsim.callbacks import Callback
from dynsim.checkpoint import Checkpoint
from dynsim.engine import Batch, DynamicsSettler, Engine
from dynsim.errors import ConfigError, DataError, DivergenceError, DynsimError, OutputError
from dynsim.settle import SettleResult, settle
from dynsim.solvers import (
    RK4,
    SEED_SCHEDULE,
    SOLVERS,
    Anderson,
    ConstantStep,
    DecayingStep,
    Dopri5,
    Euler,
    Heun,
    SiteNewton,
    make_solver,
)
from dynsim.stopping import AnyOf, MaxSteps, RelativeChange, ResidualBelow, Status, stop_rule
from dynsim.systems import HebbianLayer, System

__all__ = [
    "__version__",
    "SEED_SCHEDULE",
    "SOLVERS",
    "RK4",
    "Anderson",
    "AnyOf",
    "Batch",
    "Callback",
    "Checkpoint",
    "ConfigError",
    "ConstantStep",
    "DataError",
    "DecayingStep",
    "DivergenceError",
    "Dopri5",
    "DynamicsSettler",
    "DynsimError",
    "Engine",
    "Euler",
    "HebbianLayer",
    "Heun",
    "MaxSteps",
    "RelativeChange",
    "ResidualBelow",
    "SettleResult",
    "SiteNewton",
    "Status",
    "System",
    "OutputError",
    "make_solver",
    "settle",
    "stop_rule",
]
