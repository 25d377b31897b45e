"""The compiled Newton–CG backend (dynsim/compiled_cg.py, issue 15): same iteration as the torch
step, same fixed points as SiteNewton, same weights after online updates.

newton-cg also runs through the conformance table of tests/test_solvers.py, compiled and not
(``test_backends_agree``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dynsim import HebbianLayer, MaxSteps, ResidualBelow, Status, backend, compiled, compiled_cg, settle
from dynsim.plasticity import hebbian_update
from dynsim.solvers import SiteNewton, SiteNewtonCG

pytestmark = pytest.mark.skipif(not compiled.available(), reason="numba not installed")
torch.set_num_threads(1)


def _trained_like_layer(nps: int, seed: int = 0, image: int = 8, dtype=torch.float64) -> HebbianLayer:
    """A layer whose L = 0.3·I + (2/k) Σ r rᵀ (positive definite, as the Hebbian rule makes it)."""
    radius = 3.0 if image == 8 else 4.0
    layer = HebbianLayer((1, image, image), nps=nps, stride=2, radius=radius, seed=seed).to(dtype)
    gen = torch.Generator().manual_seed(seed + 7)
    w = layer.lateral.weight
    r = torch.tanh(torch.randn(w.shape[0], nps, 3 * nps, generator=gen, dtype=dtype))
    gram = r @ r.mT
    with torch.no_grad():  # symmetrised: the matmul's rounding need not be (the Hebbian rule's is exact)
        w.copy_(0.3 * torch.eye(nps, dtype=dtype) + (gram + gram.mT) / (3 * nps))
    return layer


def _inputs(n: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("picard", [True, False])
@pytest.mark.parametrize("nps", [3, 8, 16])
def test_compiled_cg_reaches_site_newtons_fixed_point(nps, picard):
    """float64, ‖F‖/‖u‖ < 1e-10: the kernel's fixed points equal SiteNewton's (LU) to 1e-9, from the
    Picard start and from rest (what the DSSM's auto runs)."""
    layer = _trained_like_layer(nps)
    x = _inputs(5, 64, 1)
    stop = ResidualBelow(1e-10) | MaxSteps(100)
    solver = SiteNewtonCG(picard_start=picard)
    assert backend.compiled_settle(layer, x, None, solver, stop.limits(), 1e6) is not None  # the kernel runs
    fast = settle(layer, x, solver=solver, stop=stop)
    ref = settle(layer, x, solver=SiteNewton(), stop=stop)
    assert fast.status.tolist() == [Status.SETTLED] * 5 == ref.status.tolist()
    rel = torch.linalg.vector_norm(fast.u - ref.u, dim=1) / torch.linalg.vector_norm(ref.u, dim=1)
    assert float(rel.max()) < 1e-9
    assert float(fast.residual.max()) < 1e-10
    torch.testing.assert_close(fast.r, torch.tanh(fast.u))


@pytest.mark.parametrize("merit", ["energy", "residual"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_cg_equals_the_torch_step(dtype, merit):
    """Same steps, statuses, evaluation counts and states as the torch newton-cg (which runs the
    same CG with the same per-site share and the same line search), at the tolerance the DSSM uses."""
    layer = _trained_like_layer(12, image=28, dtype=dtype)
    x = _inputs(4, 784, 2, dtype)
    stop = ResidualBelow(1e-4) | MaxSteps(50)
    fast = settle(layer, x, solver=SiteNewtonCG(merit=merit), stop=stop)
    with compiled.disabled():
        ref = settle(layer, x, solver=SiteNewtonCG(merit=merit), stop=stop)
    assert fast.steps.tolist() == ref.steps.tolist()
    assert fast.status.tolist() == ref.status.tolist() == [Status.SETTLED] * 4
    assert fast.n_evals == ref.n_evals
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(fast.u, ref.u, rtol=tol, atol=tol)


def test_an_indefinite_site_takes_the_exact_step():
    """Site 0's L has an eigenvalue −0.72 (K not positive definite): that site takes the LU step;
    the fixed point is SiteNewton's. (Newton wanders for dozens of steps on one sample here, so
    the step counts of the two solvers, and of the kernel against the torch step, are not
    compared: rounding decides them.)"""
    layer = _trained_like_layer(4)
    with torch.no_grad():
        layer.lateral.weight[0] -= 1.2 * torch.eye(4, dtype=torch.float64)
    assert float(torch.linalg.eigvalsh(layer.lateral.weight[0]).min()) < -0.5
    x = _inputs(4, 64, 5)
    stop = ResidualBelow(1e-10) | MaxSteps(200)
    fast = settle(layer, x, solver=SiteNewtonCG(), stop=stop)
    with compiled.disabled():
        ref = settle(layer, x, solver=SiteNewton(), stop=stop)
    assert fast.status.tolist() == ref.status.tolist() == [Status.SETTLED] * 4
    torch.testing.assert_close(fast.u, ref.u, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sites_on_threads_give_the_same_bits(monkeypatch, dtype):
    """Batch-1 settling splits each pass over the sites among threads (runs of ``_RUN`` sites per
    chunk): every chunk count gives the same states, rates, steps, statuses and residuals, bit for
    bit, as one thread (each site's numbers are its own; the norms are summed in site order).
    28×28, NpS 8: 196 sites, so 3 chunks get unequal shares and the last run is short."""
    layer = _trained_like_layer(8, image=28, dtype=dtype)
    x = _inputs(3, 784, 8, dtype)
    stop = ResidualBelow(1e-7) | MaxSteps(100)
    settings = compiled_cg.kernel_settings(SiteNewtonCG(picard_start=False), stop.limits(), 1e6)
    outs = {}
    for chunks in (1, 2, 3):
        monkeypatch.setattr(compiled_cg, "site_threads", lambda c=chunks: c)
        outs[chunks] = [compiled_cg.settle_layer(layer, x[i:i + 1], None, **settings) for i in range(3)]
    for chunks in (2, 3):
        for got, want in zip(outs[chunks], outs[1], strict=True):
            for a, b in zip(got[:5], want[:5], strict=True):
                assert torch.equal(a, b)
            assert got[5] == want[5]
    assert [int(o[3]) for o in outs[1]] == [Status.SETTLED] * 3
    assert min(int(o[2]) for o in outs[1]) >= 2  # real Newton iterations, not a trivial settle
    with torch.no_grad():  # one asymmetric block among many, found by any chunk
        layer.lateral.weight[101, 0, 1] += 0.2
    for chunks in (1, 2, 3):
        monkeypatch.setattr(compiled_cg, "site_threads", lambda c=chunks: c)
        assert compiled_cg.settle_layer(layer, x[:1], None, **settings) is None


@pytest.mark.parametrize("torch_threads, numba_threads", [(1, 2), (2, 3)])
def test_the_kernel_keeps_torchs_thread_count(torch_threads, numba_threads):
    """numba's first parallel launch (when the kernel is loaded, or when a batch of one splits its
    sites) sets OpenMP's thread count to numba's, which torch reads as its own: a fresh process
    keeps its torch thread count after settling one input."""
    code = (
        "import torch, dynsim\n"
        "from dynsim import compiled_cg\n"
        "from dynsim.solvers import SiteNewtonCG\n"
        f"torch.set_num_threads({torch_threads})\n"
        "layer = dynsim.HebbianLayer((1, 8, 8), nps=4, stride=2, radius=3.0)\n"
        "stop = dynsim.ResidualBelow(1e-6) | dynsim.MaxSteps(50)\n"
        "settings = compiled_cg.kernel_settings(SiteNewtonCG(), stop.limits(), 1e6)\n"
        "assert compiled_cg.settle_layer(layer, torch.randn(1, 64), None, **settings) is not None\n"
        "print(torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "NUMBA_NUM_THREADS": str(numba_threads)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(torch_threads)]


def _same_bits_in_groups_and_chunks(monkeypatch, layer, x, u0, settings, variants):
    """Settle ``x`` one input at a time on one thread, then with each ``(GROUP, chunks)`` of
    ``variants``; assert every output is the same, bit for bit, and return the first run's."""
    runs = {}
    for group, chunks in ((1, 1), *variants):
        monkeypatch.setattr(compiled_cg, "GROUP", group)
        monkeypatch.setattr(compiled_cg, "site_threads", lambda c=chunks: c)
        runs[group, chunks] = compiled_cg.settle_layer(layer, x, u0, **settings)
    want = runs[1, 1]
    for key in variants:
        for a, b in zip(runs[key][:5], want[:5], strict=True):
            assert torch.equal(a, b), key
        assert runs[key][5] == want[5], key
    return want


@pytest.mark.parametrize("case", ["nps 5, warm start, one diverges", "residual merit, Picard start"])
def test_pairs_with_a_divergence_a_warm_start_and_the_residual_merit(monkeypatch, case):
    """As below, for the pair loop's other paths: an input that diverges (the state bound) while its
    partner settles, a warm start ``u0``, NpS 5 (not a multiple of the product's four rows), and the
    residual line search with the Picard start."""
    if case.startswith("nps 5"):
        layer = _trained_like_layer(5, image=28)
        solver, bound = SiteNewtonCG(picard_start=False), 0.9
    else:
        layer = _trained_like_layer(8, image=28)
        solver, bound = SiteNewtonCG(merit="residual"), 1e6
    x = _inputs(5, 784, 11) * torch.tensor([1.0, 6.0, 0.3, 2.0, 1.0], dtype=torch.float64)[:, None]
    u0 = 0.1 * _inputs(5, layer.state_size, 12)
    settings = compiled_cg.kernel_settings(solver, (ResidualBelow(1e-9) | MaxSteps(200)).limits(), bound)
    want = _same_bits_in_groups_and_chunks(monkeypatch, layer, x, u0, settings, ((2, 1), (2, 2)))
    if case.startswith("nps 5"):
        assert Status.DIVERGED in want[3].tolist() and Status.SETTLED in want[3].tolist()
    assert len(set(want[2].tolist())) > 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_images_settled_in_pairs_give_the_same_bits_as_one_by_one(monkeypatch, dtype):
    """Two images settle together (``GROUP``), their CG in lockstep on each site with one pass over
    the block per product for both (``_site_cg2``): the same states, steps, statuses, residuals and
    evaluation counts, bit for bit, as one at a time; also with the sites split among threads, and
    for an odd batch (the last image alone). The images take different numbers of Newton steps, so
    one finishes while the other goes on."""
    layer = _trained_like_layer(8, image=28, dtype=dtype)
    x = _inputs(5, 784, 9, dtype) * torch.tensor([1.0, 3.0, 0.3, 2.0, 1.0], dtype=dtype)[:, None]
    stop = ResidualBelow(1e-7) | MaxSteps(100)
    settings = compiled_cg.kernel_settings(SiteNewtonCG(picard_start=False), stop.limits(), 1e6)
    want = _same_bits_in_groups_and_chunks(monkeypatch, layer, x, None, settings, ((2, 1), (2, 3)))
    assert len(set(want[2].tolist())) > 1  # the pair's images stop at different steps


def test_site_threads_follow_torchs_threads():
    most = compiled.numba.config.NUMBA_NUM_THREADS
    torch.set_num_threads(1)
    assert compiled_cg.site_threads() == 1
    torch.set_num_threads(most + 1)
    assert compiled_cg.site_threads() == most  # at most numba's
    assert compiled.numba.get_num_threads() == most
    torch.set_num_threads(1)


def test_an_empty_batch_and_a_nan_diagonal():
    """No input: empty outputs (the pair loop is not entered). A NaN on a block's diagonal counts as
    not symmetric, as before, so the torch path takes over."""
    layer = _trained_like_layer(3)
    settings = compiled_cg.kernel_settings(SiteNewtonCG(), (ResidualBelow(1e-8) | MaxSteps(50)).limits(), 1e6)
    u, r, steps, status, residual, n_evals = compiled_cg.settle_layer(layer, torch.empty(0, 64, dtype=torch.float64),
                                                                      None, **settings)
    assert u.shape == (0, layer.state_size) and steps.shape == (0,) and n_evals == 0
    with torch.no_grad():
        layer.lateral.weight[1, 2, 2] = float("nan")
    assert compiled_cg.settle_layer(layer, _inputs(2, 64, 3), None, **settings) is None


def test_a_non_symmetric_block_leaves_it_to_the_torch_path():
    layer = _trained_like_layer(3)
    with torch.no_grad():
        layer.lateral.weight[2, 0, 1] += 0.2
    x = _inputs(2, 64, 6)
    stop = ResidualBelow(1e-10) | MaxSteps(100)
    assert compiled_cg.settle_backend(layer, x, None, SiteNewtonCG(), stop.limits(), 1e6) is None
    res = settle(layer, x, solver=SiteNewtonCG(), stop=stop)  # the torch step's exact Newton steps
    ref = settle(layer, x, solver=SiteNewton(), stop=stop)
    torch.testing.assert_close(res.u, ref.u, rtol=1e-9, atol=1e-10)


def test_same_weights_after_online_updates_as_site_newton():
    """28×28, NpS 16, from L = I: eight online updates (batch 1, η = 5e-3) settled by the compiled
    newton-cg and by SiteNewton (the compiled LU kernel) give the same W and L (float64)."""
    weights = []
    xs = _inputs(8, 784, 4)
    for solver in (SiteNewton(), SiteNewtonCG(), SiteNewtonCG(picard_start=False)):
        layer = HebbianLayer((1, 28, 28), nps=16, stride=2, radius=4.0, seed=3).double()
        for i in range(8):
            res = settle(layer, xs[i : i + 1], solver=solver, stop=ResidualBelow(1e-10) | MaxSteps(100))
            assert res.status.tolist() == [Status.SETTLED]
            hebbian_update(layer, xs[i : i + 1], res.r, 5e-3)
        weights.append((layer.ff.weight.clone(), layer.lateral.weight.clone()))
    assert float((weights[0][1] - torch.eye(16, dtype=torch.float64)).abs().max()) > 1e-3  # L did learn
    for other in weights[1:]:
        torch.testing.assert_close(weights[0][0], other[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(weights[0][1], other[1], rtol=0, atol=1e-12)


def test_parallel_rows_equal_one_thread():
    layer = _trained_like_layer(6)
    x = _inputs(300, 64, 7)
    stop = ResidualBelow(1e-8) | MaxSteps(100)
    old = torch.get_num_threads()
    try:
        one = settle(layer, x, solver=SiteNewtonCG(), stop=stop)
        torch.set_num_threads(2)
        two = settle(layer, x, solver=SiteNewtonCG(), stop=stop)
    finally:
        torch.set_num_threads(old)
    assert one.steps.tolist() == two.steps.tolist()
    torch.testing.assert_close(one.u, two.u, rtol=0, atol=0)


def test_the_batch_1_hebbian_kernel_applies_past_nps_32():
    """Large-NpS online training uses the compiled Hebbian update too: same W and L as torch's."""
    layers = [_trained_like_layer(40, dtype=torch.float32) for _ in range(2)]
    x = _inputs(1, 64, 8, torch.float32)
    r = torch.tanh(_inputs(1, layers[0].state_size, 9, torch.float32))
    assert backend.compiled_hebbian_update(layers[0], x, r, 5e-3, 2.5e-3)  # the kernel ran
    with compiled.disabled():
        hebbian_update(layers[1], x, r, 5e-3)
    torch.testing.assert_close(layers[0].ff.weight, layers[1].ff.weight, rtol=0, atol=1e-7)
    torch.testing.assert_close(layers[0].lateral.weight, layers[1].lateral.weight, rtol=0, atol=1e-7)
