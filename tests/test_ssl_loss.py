"""Contrastive hinge loss: hand-computed values, autograd agreement, settings checks."""

import pytest
import torch

from dynsim.errors import ConfigError
from dynsim.ssl.augment import Deform
from dynsim.ssl.loss import hinge_loss, offset_pairs

# 3 samples, D = 2; tau = 2, delta = 0.5: positives pulled if d > 1.5, negatives pushed if d < 2.5.
Z = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
ZP = torch.tensor([[0.0, 1.0], [3.0, 0.0], [1.0, 3.0]])
# L1 distances d_ij = |z_i - z'_j|_1, by hand:
#   row 0: 1 3 4      row 1: 2 2 3      row 2: 2 6 1
# positives [d_ii - 1.5]+ = 0, 0.5, 0; negatives [2.5 - d_ij]+ nonzero for d10 = d20 = 2 (0.5 each)


def _brute(z, zp, tau, delta, pairs, weights):
    """Independent autograd reference: L = Σ w [±(d − thr)]₊ over the given pairs."""
    z, zp = z.clone().requires_grad_(True), zp.clone().requires_grad_(True)
    loss = 0.0
    for (i, j), w in zip(pairs, weights, strict=True):
        d = (z[i] - zp[j]).abs().sum()
        loss = loss + w * (torch.relu(d - (tau - delta)) if i == j else torch.relu(tau + delta - d))
    loss.backward()
    return loss.detach(), z.grad, zp.grad


def test_all_negatives_hand_values():
    r = hinge_loss(Z, ZP, tau=2.0, delta=0.5)
    assert float(r.loss) == pytest.approx(0.5 + 0.5 + 0.5)
    # c11 = +1, c10 = c20 = -1; dL/dz_i = Σ_j c_ij sign(z_i - z'_j)
    torch.testing.assert_close(r.err, torch.tensor([[0.0, 0.0], [-2.0, 1.0], [0.0, -1.0]]))
    torch.testing.assert_close(r.err_prime, torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]))


def test_k_negatives_are_offset_diagonals_without_wrap_around():
    # the authors' torch.diagonal(OUT, k): diagonal k of a batch of 5 holds the 5 - k pairs (i, i+k)
    ii, jj, kk = offset_pairs(5, 3)
    assert list(zip(ii.tolist(), jj.tolist(), strict=True)) == [
        (0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (0, 1), (1, 2), (2, 3), (3, 4), (0, 2), (1, 3), (2, 4)]
    assert kk.tolist() == [0] * 5 + [1] * 4 + [2] * 3


def test_k_negatives_hand_values():
    # K = 2, no wrap-around: pairs (0,0) (1,1) (2,2) (0,1) (1,2); negatives weighted 1/2.
    # d: positives 1, 2, 1 -> [d - 1.5]+ = 0, 0.5, 0; negatives d01 = 3, d12 = 3 -> [2.5 - d]+ = 0
    r = hinge_loss(Z, ZP, tau=2.0, delta=0.5, negatives=2)
    assert float(r.loss) == pytest.approx(0.5)
    torch.testing.assert_close(r.err, torch.tensor([[0.0, 0.0], [-1.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(r.err_prime, torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]))


def test_k_negatives_with_wrap_around_hand_values():
    # wrap=True adds the pair (2, 0): d20 = 2 -> 0.5 · 1/2
    r = hinge_loss(Z, ZP, tau=2.0, delta=0.5, negatives=2, wrap=True)
    assert float(r.loss) == pytest.approx(0.5 + 0.5 * 0.5)
    torch.testing.assert_close(r.err, torch.tensor([[0.0, 0.0], [-1.0, 0.0], [0.0, -0.5]]))
    torch.testing.assert_close(r.err_prime, torch.tensor([[0.0, 0.5], [1.0, 0.0], [0.0, 0.0]]))


def test_gradient_block_zeroes_only_the_deformed_branch():
    free = hinge_loss(Z, ZP, tau=2.0, delta=0.5, negatives=2)
    blocked = hinge_loss(Z, ZP, tau=2.0, delta=0.5, negatives=2, grad_block=True)
    assert float(blocked.loss) == float(free.loss)
    torch.testing.assert_close(blocked.err, free.err)
    assert torch.count_nonzero(blocked.err_prime) == 0


@pytest.mark.parametrize("negatives,wrap", [(None, False), (1, False), (3, False), (7, False), (3, True)])
def test_errors_match_autograd(negatives, wrap):
    g = torch.Generator().manual_seed(1)
    z, zp = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    n, k = 7, negatives
    if k is None:
        pairs = [(i, j) for i in range(n) for j in range(n)]
        weights = [1.0] * len(pairs)
    else:
        keep = [(i, s) for i in range(n) for s in range(k) if wrap or i + s < n]
        pairs = [(i, (i + s) % n) for i, s in keep]
        weights = [1.0 if s == 0 else 1.0 / k for _, s in keep]
    loss, gz, gzp = _brute(z, zp, 4.0, 1.0, pairs, weights)
    r = hinge_loss(z, zp, tau=4.0, delta=1.0, negatives=negatives, wrap=wrap)
    torch.testing.assert_close(r.loss, loss)
    torch.testing.assert_close(r.err, gz)
    torch.testing.assert_close(r.err_prime, gzp)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(tau=1.0, delta=1.0),  # tau <= delta: positives could never be pulled in
        dict(tau=1.0, delta=2.0),
        dict(tau=1.0, delta=-0.1),
        dict(tau=2.0, delta=1.0, negatives=0),
        dict(tau=2.0, delta=1.0, negatives=4),  # K > B = 3
        dict(tau=2.0, delta=1.0, negatives=2.5),
    ],
)
def test_bad_settings_raise(kwargs):
    with pytest.raises(ConfigError):
        hinge_loss(Z, ZP, **kwargs)


def test_deform_is_seeded_and_shape_preserving():
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    a = Deform()(x, torch.Generator().manual_seed(3))
    b = Deform()(x, torch.Generator().manual_seed(3))
    c = Deform()(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    # identity settings leave the images alone
    same = Deform(affine=0.0, flip=False, saturation=0.0, hue=0.0)(x, torch.Generator())
    torch.testing.assert_close(same, x)
