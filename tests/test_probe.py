"""The authors' probe (one linear layer, cross-entropy, Adam): closed-form gradients vs autograd."""

import torch
import torch.nn.functional as F

from dynsim.readouts import fit_linear_probe, train_softmax_layer


def _autograd_reference(x, y, k, *, epochs, lr, batch_size, seed):
    """The probe's training loop as it was written before (nn.Linear, autograd, x[idx])."""
    gen = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(x.shape[1], k).to(x.dtype)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(layer(x[idx]), y[idx]).backward()
            opt.step()
    return layer.weight.detach(), layer.bias.detach()


def _problem(n=300, d=20, k=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    centres = 2 * torch.randn(k, d, generator=g, dtype=dtype)
    y = torch.randint(0, k, (n,), generator=g)
    return centres[y] + torch.randn(n, d, generator=g, dtype=dtype), y


def test_closed_form_probe_takes_the_autograd_steps():
    """Same batches, same Adam: the weights after 25 epochs agree with the autograd loop's
    (float64: to rounding), with a last batch smaller than the others (300 = 4 x 64 + 44)."""
    x, y = _problem()
    w_ref, b_ref = _autograd_reference(x, y, 4, epochs=25, lr=1e-2, batch_size=64, seed=7)
    w, b = train_softmax_layer(x, y, 4, epochs=25, lr=1e-2, batch_size=64,
                               generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(w, w_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b, b_ref, rtol=1e-9, atol=1e-9)
    assert float(w.abs().max()) > 0.1  # it moved


def test_probe_accuracy_equals_the_autograd_probe_in_float32():
    x, y = _problem(dtype=torch.float32)
    w_ref, b_ref = _autograd_reference(x[:200], y[:200], 4, epochs=40, lr=1e-3, batch_size=50, seed=0)
    ref_acc = float(((x[200:] @ w_ref.T + b_ref).argmax(1) == y[200:]).float().mean())
    r = fit_linear_probe(x[:200], y[:200], x[200:], y[200:], epochs=40, lr=1e-3, batch_size=50, seed=0,
                         standardize=False)
    assert r["test_accuracy"] == ref_acc
    assert ref_acc > 0.5  # a real classification, not chance (0.25)
