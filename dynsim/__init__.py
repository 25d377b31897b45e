"""dynsim: continuous-time Hebbian networks with pluggable ODE solvers."""

__version__ = "0.1.0"
