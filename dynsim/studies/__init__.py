"""Studies: the solver benchmark, the convergence-vs-accuracy grid, settling trajectories."""
