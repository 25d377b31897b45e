"""Write a plasticity rule as a callback.

The event loop (:class:`dynsim.Engine`) settles each input and then calls every callback's
``on_settled(engine, batch, result)``; a learning rule is a callback that updates the system's
weights from the input ``batch.x`` and the settled rates ``result.r``. Here: Oja's rule for one
linear neuron, ``τ du/ds = −u + w·x`` (so ``y = w·x`` once settled) and
``Δw = η y (x − y w)`` (Oja 1982, "A simplified neuron model as a principal component
analyzer"). It converges to the unit-length first principal component of the inputs, which the
script compares with the top eigenvector of their covariance.

Run: ``python examples/plasticity_callback.py``
"""

from __future__ import annotations

import torch

import dynsim
from dynsim.builders import epoch_batches


class LinearNeuron(dynsim.System):
    """One neuron: ``du/ds = −u + w·x``, rate ``y = u``."""

    def __init__(self, n_in: int, seed: int = 0):
        super().__init__()
        self.input_size, self.state_size = n_in, 1
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(1, n_in, generator=g) * 0.1, requires_grad=False)

    def drive(self, x):
        return x @ self.w.T

    def field(self, u, drive):
        return -u + drive

    def rates(self, u):
        return u


class OjaRule(dynsim.Callback):
    """``Δw = η Σ_b y_b (x_b − y_b w)`` after each settled batch (sum over the batch)."""

    def __init__(self, neuron: LinearNeuron, eta: float = 1e-2):
        self.neuron, self.eta = neuron, eta

    def on_settled(self, engine, batch, result):
        y = result.r  # (B, 1)
        w = self.neuron.w
        w += self.eta * (y.T @ batch.x - (y**2).sum() * w)

    def state_dict(self):  # what a checkpoint saves of this callback (nothing: w is the system's)
        return {}


def main(quick: bool = False) -> dict:
    """Train on correlated 2-D Gaussian data; return the learned w and the |cosine| with PC 1."""
    g = torch.Generator().manual_seed(1)
    mix = torch.tensor([[2.0, 0.0], [1.2, 0.5]])
    x = torch.randn(2000, 2, generator=g) @ mix.T
    neuron = LinearNeuron(2)
    settler = dynsim.DynamicsSettler(neuron, dynsim.Euler(dynsim.ConstantStep(0.5)),
                                     dynsim.RelativeChange(1e-6) | dynsim.MaxSteps(100))
    engine = dynsim.Engine(settler, [OjaRule(neuron, eta=5e-3)], progress=False)
    with torch.no_grad():
        engine.fit(epoch_batches(x, images=500 if quick else 2000, batch_size=1, seed=0), epochs=2 if quick else 4)
    w = neuron.w[0]
    pc1 = torch.linalg.eigh(torch.cov(x.T)).eigenvectors[:, -1]
    cosine = float(abs(w @ pc1) / w.norm())
    print(f"w = {w.tolist()}, |w| = {float(w.norm()):.3f}, |cos(w, PC 1)| = {cosine:.4f}")
    return {"w": w.tolist(), "norm": float(w.norm()), "cosine": cosine}


if __name__ == "__main__":
    main()
