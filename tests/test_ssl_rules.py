"""Learning rules: BP equals autograd, RF with B = W equals BP, URF keeps B − W, DTP with
exact inverses follows the gradient."""

import pytest
import torch
import torch.nn.functional as F

from dynsim.errors import ConfigError
from dynsim.ssl.augment import Deform
from dynsim.ssl.rules import URF, Inverse, build_inverses, make_rules
from dynsim.ssl.settler import ContrastiveSettler, Plan
from dynsim.ssl.stages import Conv3x3, Dense, build_encoder

SHAPE = (1, 8, 8)


HINGE = dict(tau=6.0, delta=3.0, negatives=None, grad_block=False)


class _Batch:
    def __init__(self, x, epoch=0, number=0):
        self.x, self.y, self.index = x, None, torch.arange(len(x))
        self.epoch, self.number = epoch, number


def _images(n=12, seed=0):
    return torch.rand(n, 64, generator=torch.Generator().manual_seed(seed))


def _settler(encoder, **kw):
    return ContrastiveSettler(
        encoder,
        SHAPE,
        Deform(flip=False),
        generator=torch.Generator().manual_seed(5),
        **{**HINGE, **kw},
    )


def _autograd_grads(encoder, x2, n, **hinge):
    """Reference: dL/dW for every unit by plain autograd on F.conv2d / F.linear."""
    weights = {
        k: u.weight.detach().clone().requires_grad_(True) for k, u in encoder.units().items()
    }
    h = x2
    for i, s in enumerate(encoder.stages):
        w = weights[f"s{i}"]
        a = F.conv2d(h, w, padding=1) if isinstance(s.unit, Conv3x3) else s.pre(h) @ w.T
        h = s.post(a)
    top = len(encoder.stages) - 1
    z = encoder.heads[top].pre(h) @ weights[f"h{top}"].T
    # the hinge loss written with torch ops, differentiated by autograd
    d = (z[:n, None, :] - z[None, n:, :]).abs().sum(-1)
    eye = torch.eye(n, dtype=torch.bool)
    tau, delta = hinge["tau"], hinge["delta"]
    loss = torch.where(eye, torch.relu(d - (tau - delta)), torch.relu(tau + delta - d)).sum()
    loss.backward()
    return {k: w.grad for k, w in weights.items() if w.grad is not None}, loss.detach()


def _local_grads(encoder, result):
    units = encoder.units()
    return {k: units[k].weight_grad(result.pre[k], result.err[k]) for k in result.err}


def test_bp_local_updates_equal_autograd_gradient():
    enc = build_encoder("c4-p-c8-p", SHAPE, generator=torch.Generator().manual_seed(0))
    make_rules("bp", enc, lr=1e-3, generator=torch.Generator())
    result = _settler(enc)(_Batch(_images()))
    expected, loss = _autograd_grads(enc, result.pre["s0"], 12, **HINGE)
    torch.testing.assert_close(result.loss, loss)
    got = _local_grads(enc, result)
    assert set(got) == {"s0", "s1", "h1"}
    for k in got:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["c4-p-c8-p", "c4-p-d16-d8"])
def test_rf_with_feedback_equal_to_w_reproduces_bp(arch):
    enc = build_encoder(arch, SHAPE, generator=torch.Generator().manual_seed(0))
    make_rules("bp", enc, lr=1e-3, generator=torch.Generator())
    bp = _local_grads(enc, _settler(enc)(_Batch(_images())))
    make_rules("rf", enc, lr=1e-3, generator=torch.Generator().manual_seed(1))
    random_b = _local_grads(enc, _settler(enc)(_Batch(_images())))
    assert not torch.allclose(random_b["s0"], bp["s0"])  # random B: other errors below the top
    for unit in enc.units().values():
        unit.feedback = unit.weight.detach().clone()  # B = Wᵀ (W's layout)
    rf = _local_grads(enc, _settler(enc)(_Batch(_images())))
    for k in bp:
        torch.testing.assert_close(rf[k], bp[k], rtol=0, atol=0)


class _Feed:
    """Minimal engine stand-in: settle each batch, call on_input / on_settled."""

    def __init__(self, settler, callbacks):
        self.settler, self.callbacks, self.should_stop = settler, callbacks, False

    def run(self, batches):
        for b in batches:
            for c in self.callbacks:
                c.on_input(self, b)
            r = self.settler(b)
            for c in self.callbacks:
                c.on_settled(self, b, r)


def test_urf_keeps_feedback_minus_weight_constant():
    enc = build_encoder("c4-p-c8-p", SHAPE, generator=torch.Generator().manual_seed(0))
    rules = make_rules("urf", enc, lr=1e-2, generator=torch.Generator().manual_seed(1))
    assert all(isinstance(r, URF) for r in rules)
    units = enc.units()
    gap0 = {k: u.feedback - u.weight.detach() for k, u in units.items()}
    w0 = {k: u.weight.detach().clone() for k, u in units.items()}
    _Feed(_settler(enc), rules).run([_Batch(_images(seed=s)) for s in range(5)])
    for k, u in units.items():
        if k in ("h0",):  # head 0 carries no loss end-to-end: untouched
            continue
        assert not torch.allclose(u.weight, w0[k]), k
        torch.testing.assert_close(u.feedback - u.weight.detach(), gap0[k], rtol=0, atol=1e-6)


def _orthogonal(n, seed):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed)))
    return q


def test_dtp_with_exact_inverses_follows_the_gradient():
    """Linear net with orthogonal (hence invertible) weights and exact inverses g_l = W_l⁻¹.

    Then h_l − ĥ_l = η (W_L ⋯ W_{l+1})⁻¹ dL/dh_L = η (W_L ⋯ W_{l+1})ᵀ dL/dh_L = η dL/dh_l, so
    every DTP update is η times the BP gradient (cosine 1). For a general invertible net
    DTP follows a Gauss-Newton-like direction instead (Lee et al. 2015).
    """
    enc = build_encoder("d16-d16", (1, 4, 4), act="linear", head_dim=16)
    for i, unit in enumerate(enc.units().values()):
        with torch.no_grad():
            unit.weight.copy_(_orthogonal(16, i))
    invs = {
        "s1": Inverse((16,), (16,), "linear"),
        "h1": Inverse((16,), (16,), "linear"),
    }
    units = enc.units()
    for k, g in invs.items():
        with torch.no_grad():
            g.unit.weight.copy_(torch.linalg.inv(units[k].weight.detach()))
    x = torch.rand(10, 16, generator=torch.Generator().manual_seed(2))
    kw = dict(tau=2.0, delta=1.0, negatives=None, grad_block=False)

    def settler(propagation):
        return ContrastiveSettler(
            enc,
            (1, 4, 4),
            Deform(affine=0.1, flip=False),
            propagation=propagation,
            inverses=invs,
            target_step=0.01,
            generator=torch.Generator().manual_seed(3),
            **kw,
        )

    make_rules("bp", enc, lr=1e-3, generator=torch.Generator())
    bp = _local_grads(enc, settler("error")(_Batch(x)))
    dtp = _local_grads(enc, settler("target")(_Batch(x)))
    assert set(dtp) == set(bp) == {"s0", "s1", "h1"}
    for k in bp:
        cos = F.cosine_similarity(dtp[k].flatten(), bp[k].flatten(), dim=0)
        assert float(cos) == pytest.approx(1.0, abs=1e-5), k
        torch.testing.assert_close(dtp[k], 0.01 * bp[k], rtol=1e-4, atol=1e-6)


def test_dtp_inverse_learns_to_reconstruct():
    enc = build_encoder("c4-p-c8-p", SHAPE, generator=torch.Generator().manual_seed(0))
    invs = build_inverses(enc, SHAPE, torch.Generator().manual_seed(1))
    assert set(invs) == {"s1", "h0", "h1"}
    rules = make_rules(
        "dtp",
        enc,
        lr=1e-2,
        generator=torch.Generator().manual_seed(2),
        inverses=invs,
        dtp_noise=0.1,
    )
    rule = next(r for r in rules if r.name == "s1")
    h = enc.stages[0](_images(32).view(-1, *SHAPE))[1].detach()
    first = rule.train_inverse(h)
    for _ in range(150):
        last = rule.train_inverse(h)
    assert last < 0.5 * first


def test_dtp_step_trains_every_unit_and_lowers_the_loss():
    enc = build_encoder("c4-p-c8-p", SHAPE, generator=torch.Generator().manual_seed(0))
    invs = build_inverses(enc, SHAPE, torch.Generator().manual_seed(1))
    rules = make_rules(
        "dtp", enc, lr=3e-3, generator=torch.Generator().manual_seed(2), inverses=invs
    )
    settler = ContrastiveSettler(
        enc,
        SHAPE,
        Deform(flip=False),
        propagation="target",
        inverses=invs,
        generator=torch.Generator().manual_seed(4),
        **HINGE,
    )
    settler.plan = Plan(0, 1)
    w0 = {k: u.weight.detach().clone() for k, u in enc.units().items()}
    x = _images(20)
    losses = []
    for _ in range(30):
        r = settler(_Batch(x))
        losses.append(float(r.loss))
        for rule in rules:
            rule.on_settled(None, None, r)
    changed = {k for k, u in enc.units().items() if not torch.equal(u.weight, w0[k])}
    assert changed == {"s0", "s1", "h1"}
    assert losses[-1] < losses[0]


def test_unknown_rule_and_bad_lr_raise():
    enc = build_encoder("c4-p", SHAPE)
    with pytest.raises(ConfigError, match="rule 'sgd'"):
        make_rules("sgd", enc, lr=1e-3, generator=torch.Generator())
    with pytest.raises(ConfigError, match="lr"):
        make_rules("bp", enc, lr=0.0, generator=torch.Generator())
    with pytest.raises(ConfigError, match="inverses"):
        make_rules("dtp", enc, lr=1e-3, generator=torch.Generator())


def test_dense_weight_grad_is_post_error_times_pre():
    unit = Dense(3, 2)
    pre = torch.tensor([[1.0, 2.0, 3.0]])
    err = torch.tensor([[1.0, -1.0]])
    torch.testing.assert_close(
        unit.weight_grad(pre, err), torch.tensor([[1.0, 2, 3], [-1, -2, -3]])
    )


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_error_below_equals_conv2d_input(channels_last):
    """The error sent below a conv unit (forward kernel on the flipped, transposed weight)
    equals torch's conv2d_input, for both memory layouts and a feedback B != W."""
    from torch.nn.grad import conv2d_input

    from dynsim.ssl.stages import conv_transpose_input

    g = torch.Generator().manual_seed(3)
    w = torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64)
    e = torch.randn(4, 5, 7, 6, generator=g, dtype=torch.float64)
    if channels_last:
        e = e.contiguous(memory_format=torch.channels_last)
    want = conv2d_input((4, 3, 7, 6), w, e, padding=1)
    torch.testing.assert_close(conv_transpose_input(w, e), want, rtol=1e-12, atol=1e-12)
    unit = Conv3x3(3, 5, generator=g).double()
    unit.make_feedback(g)
    unit.feedback = unit.feedback.double()
    x = torch.randn(4, 3, 7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    (grad_x,) = torch.autograd.grad(unit(x), x, grad_outputs=e)
    torch.testing.assert_close(grad_x, conv2d_input(x.shape, unit.feedback, e, padding=1), rtol=1e-12, atol=1e-12)
