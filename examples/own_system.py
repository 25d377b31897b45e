"""Define your own Hebbian system and settle it.

A dense layer with lateral inhibition, ``τ du/ds = −u + W x − (L − I) r``, ``r = f(u)``: the
single-layer DSSM dynamics of Obeid et al. (2019) without the receptive-field structure. A
:class:`dynsim.System` gives three maps — the input drive ``W x`` (held fixed while the state
settles), the vector field ``du/ds`` and the readout ``r = f(u)`` — and every dynsim solver
and stop rule works on it.

With the identity rate function the fixed point has a closed form: ``−u + W x − (L − I) u = 0``
⇔ ``L u* = W x``; the script checks the settled state against it.

Run: ``python examples/own_system.py``
"""

from __future__ import annotations

import torch

import dynsim


class DenseHebbian(dynsim.System):
    """``τ du/ds = −u + W x − (L − I) f(u)``; state (B, N), input (B, D)."""

    def __init__(self, n_in: int, n_out: int, *, activation: str = "tanh", tau: float = 1.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.input_size, self.state_size, self.tau = n_in, n_out, tau
        self.W = torch.nn.Parameter(torch.randn(n_out, n_in, generator=g) / n_in**0.5, requires_grad=False)
        # L = I + a small symmetric positive part: lateral inhibition between the neurons
        a = 0.1 * torch.rand(n_out, n_out, generator=g)
        self.L = torch.nn.Parameter(torch.eye(n_out) + (a + a.T) / 2, requires_grad=False)
        self.f = dynsim.systems.base.activation_fn(activation)

    def drive(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, N): W x
        return x @ self.W.T

    def field(self, u: torch.Tensor, drive: torch.Tensor) -> torch.Tensor:  # du/ds, 1/time
        r = self.f(u)
        return (-u + drive - r @ (self.L - torch.eye(self.state_size)).T) / self.tau

    def rates(self, u: torch.Tensor) -> torch.Tensor:
        return self.f(u)


def main(quick: bool = False) -> dict:
    """Settle 8 random inputs with two solvers; return the steps, statuses and the distance to
    the closed-form fixed point (identity rates)."""
    torch.manual_seed(0)
    system = DenseHebbian(n_in=64, n_out=16, activation="linear")
    x = torch.randn(8, 64)
    stop = dynsim.RelativeChange(1e-6) | dynsim.MaxSteps(200 if quick else 5000)
    exact = torch.linalg.solve(system.L, system.drive(x).T).T  # L u* = W x
    out = {}
    for name, solver in (("euler dt=0.5", dynsim.Euler(dynsim.ConstantStep(0.5))),
                         ("anderson", dynsim.make_solver("anderson", beta=0.5, memory=5))):
        res = dynsim.settle(system, x, solver=solver, stop=stop)
        error = float(((res.u - exact).norm(dim=1) / exact.norm(dim=1)).max())
        statuses = [dynsim.Status(int(s)).name for s in res.status]
        out[name] = {"steps": res.steps.tolist(), "status": statuses, "max_relative_error": error}
        print(f"{name:>13}: steps {res.steps.tolist()}, {statuses.count('SETTLED')}/8 settled, "
              f"max |u - u*|/|u*| = {error:.1e}")
    return out


if __name__ == "__main__":
    main()
