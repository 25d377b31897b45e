"""Readouts: the fast LinearSVC solver against liblinear, ridge against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynsim.errors import ConfigError, DataError
from dynsim.readouts import (
    fit_liblinear,
    fit_ridge,
    fit_svc,
    readout_accuracy,
    svc_sample_costs,
)


def blobs(n=600, d=12, k=4, seed=0, imbalance=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    if imbalance:  # class c keeps a fraction (c + 1) / k of its samples
        keep = torch.rand(n, generator=g) < (y + 1).double() / k
        y = y[keep]
        n = len(y)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    x[torch.arange(n), y % d] += 2.5
    return x, y


def svc_objective(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """liblinear's per-class objective: ½‖w_c‖² + Σ C_i max(0, 1 − t_i w_cᵀ[x_i, 1])²,
    C_i = q_c for the positives of class c, 1 for its negatives (written out here, not imported)."""
    n = len(y)
    xb = torch.cat([x.double(), torch.ones(n, 1, dtype=torch.float64)], 1)
    q = n / (k * torch.bincount(y, minlength=k).double())
    out = []
    for c in range(k):
        t = torch.where(y == c, 1.0, -1.0).double()
        cost = torch.where(y == c, q[c], 1.0).double()
        slack = (1 - t * (xb @ w[:, c].double())).clamp_min(0)
        out.append(0.5 * (w[:, c].double() ** 2).sum() + (cost * slack**2).sum())
    return torch.stack(out)


@pytest.mark.parametrize("imbalance", [False, True])
@pytest.mark.parametrize("direction,block,cg_stop", [("hessian", None, "residual"), ("cg", None, "residual"),
                                                     ("cg", 4, "residual"), ("cg", 5, "residual"),
                                                     ("cg", None, "quadratic"), ("cg", 5, "quadratic")])
def test_svc_reaches_liblinear_minimum(imbalance, direction, block, cg_stop):
    """Every direction (exact Hessian; CG with the diagonal or a block-Jacobi preconditioner,
    d + 1 = 13 cut into blocks of 4 or of 5 with padding; CG stopped by the residual or the
    quadratic-model rule) reaches liblinear's minimum."""
    x, y = blobs(imbalance=imbalance)
    k = int(y.max()) + 1
    ours = fit_svc(x, y, tol=1e-8, direction=direction, block=block, cg_stop=cg_stop)
    ref = fit_liblinear(x, y, tol=1e-8, max_iter=100000)
    assert ours.info["converged"]
    ours_obj, ref_obj = svc_objective(ours.weights, x, y, k), svc_objective(ref.weights, x, y, k)
    assert torch.all(ours_obj <= ref_obj * (1 + 1e-9))
    torch.testing.assert_close(ours.weights, ref.weights, atol=1e-4, rtol=0)


def test_svc_objective_reported_matches_formula():
    x, y = blobs(imbalance=True)
    m = fit_svc(x, y)
    np.testing.assert_allclose(m.info["objective"], svc_objective(m.weights, x, y, 4).numpy(), rtol=1e-10)


def test_svc_binary_is_liblinears_single_problem():
    x, y = blobs(k=2, imbalance=True)
    ours = fit_svc(x, y, tol=1e-8)
    ref = fit_liblinear(x, y, tol=1e-8, max_iter=100000)
    assert ours.weights.shape == (13, 2)
    torch.testing.assert_close(ours.weights[:, 0], -ours.weights[:, 1])
    torch.testing.assert_close(ours.weights, ref.weights, atol=1e-4, rtol=0)


def test_svc_stops_with_liblinears_test():
    """‖∇f_c‖ ≤ tol · min(n⁺, n⁻)/n · ‖∇f_c(0)‖ for every class, and not long after."""
    x, y = blobs(imbalance=True)
    m = fit_svc(x, y, tol=1e-4)
    pos = torch.bincount(y).double()
    eps = 1e-4 * torch.minimum(pos, len(y) - pos) / len(y)
    assert np.all(m.info["gradient_ratio"] <= eps.numpy())


def test_svc_warm_start_same_test_fewer_iterations():
    x, y = blobs(n=2000, d=30)
    cold = fit_svc(x, y, tol=1e-6)
    x2 = x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    again = fit_svc(x2, y, tol=1e-6)
    warm = fit_svc(x2, y, tol=1e-6, w0=cold.weights)
    assert warm.info["converged"] and warm.info["newton_iterations"] < again.info["newton_iterations"]
    np.testing.assert_allclose(warm.info["objective"], again.info["objective"], rtol=1e-6)


def test_svc_costs_weight_positives_only():
    y = torch.tensor([0, 0, 0, 1])
    t, c = svc_sample_costs(y, 2, C=2.0, class_weight="balanced")
    # q = n / (k n_c): class 0 → 4/6, class 1 → 2; problem 0 weights its positives (rows 0–2) by 4/6
    torch.testing.assert_close(c[0], torch.tensor([2 * 4 / 6] * 3 + [2.0]))
    torch.testing.assert_close(c[1], torch.tensor([2.0] * 3 + [4.0]))
    torch.testing.assert_close(t[1], torch.tensor([-1.0, -1.0, -1.0, 1.0]))


def test_ridge_is_ridgeclassifier():
    from sklearn.linear_model import RidgeClassifier

    x, y = blobs(k=5)
    m = fit_ridge(x, y, alpha=2.0)
    sk = RidgeClassifier(alpha=2.0).fit(x.numpy(), y.numpy())
    np.testing.assert_allclose(m.weights[:-1].numpy(), sk.coef_.T, atol=1e-10)
    np.testing.assert_allclose(m.weights[-1].numpy(), sk.intercept_, atol=1e-10)


def test_readout_accuracy_by_name_and_errors():
    x, y = blobs(n=400)
    for name in ("svc", "ridge", "liblinear"):
        out = readout_accuracy(name, x[:300].numpy(), y[:300].numpy(), x[300:].numpy(), y[300:].numpy())
        assert out["accuracy"] > 0.8 and out["test_predictions"].shape == (100,)
    with pytest.raises(ConfigError, match="unknown readout 'probe'"):
        readout_accuracy("probe", x, y, x, y)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        readout_accuracy("svc", bad, y, x, y)
    with pytest.raises(DataError, match="shapes disagree"):
        readout_accuracy("svc", x[:10], y[:9], x, y)


@pytest.mark.parametrize("direction", ["hessian", "cg"])
def test_svc_intercept_scaling_is_liblinears_bias_feature(direction):
    """The intercept as a separate column term (no augmented copy) solves liblinear's problem with
    the bias a regularised feature of value ``intercept_scaling``: sklearn's weights, s · its bias."""
    from sklearn.svm import LinearSVC

    x, y = blobs(imbalance=True)
    ours = fit_svc(x, y, tol=1e-8, intercept_scaling=3.0, direction=direction)
    sk = LinearSVC(C=1.0, class_weight="balanced", intercept_scaling=3.0, tol=1e-8, max_iter=100000,
                   dual=False).fit(x.numpy(), y.numpy())
    assert ours.info["converged"]
    np.testing.assert_allclose(ours.weights[:-1].numpy(), sk.coef_.T, atol=1e-4)
    # sklearn reports intercept_ = s · w_bias; ours scores with the same s · w_bias in weights[-1]
    np.testing.assert_allclose(3.0 * ours.weights[-1].numpy(), sk.intercept_, atol=3e-4)


def test_svc_hessian_and_cg_agree_on_a_chunked_problem(monkeypatch):
    """Chunked passes (objective, Gram blocks, preconditioner) over many small chunks give the
    same minimum as one chunk: both directions, float32 data."""
    import dynsim.readouts as ro

    x, y = blobs(n=3000, d=40, k=5, imbalance=True, dtype=torch.float32)
    whole = fit_svc(x, y, tol=1e-6, direction="hessian")
    monkeypatch.setattr(ro, "CHUNK_ELEMENTS", 41 * 7)  # 7 rows a chunk
    for direction, block in (("hessian", None), ("cg", None), ("cg", 8)):
        m = fit_svc(x, y, tol=1e-6, direction=direction, block=block)
        assert m.info["converged"]
        np.testing.assert_allclose(m.info["objective"], whole.info["objective"], rtol=1e-5)
        torch.testing.assert_close(m.weights, whole.weights, atol=2e-3, rtol=0)


def test_svc_cg_products_over_the_active_rows_only(monkeypatch):
    """CG products over a copy of the rows active for some running class (``cg_rows``) reach the
    same minimum as products over all rows (``COMPACT_FRACTION`` 0: never compact); from w = 0
    every row is active (first entry n), near the optimum far fewer are."""
    import dynsim.readouts as ro

    x, y = blobs(n=2000, d=30, k=4)
    x[torch.arange(2000), y] += 4.0  # well separated: most rows leave every active set
    compact = fit_svc(x, y, tol=1e-9, direction="cg", block=5)
    monkeypatch.setattr(ro, "COMPACT_FRACTION", 0.0)
    full = fit_svc(x, y, tol=1e-9, direction="cg", block=5)
    assert compact.info["converged"] and full.info["converged"]
    assert full.info["cg_rows"] == [2000] * full.info["newton_iterations"]
    assert compact.info["cg_rows"][0] == 2000 and min(compact.info["cg_rows"]) < 0.5 * 2000
    np.testing.assert_allclose(compact.info["objective"], full.info["objective"], rtol=1e-10)
    torch.testing.assert_close(compact.weights, full.weights, atol=1e-7, rtol=0)


def test_svc_cg_products_for_the_live_classes_only():
    """``_LiveProducts``: ``H_c p_c`` for the live classes over the rows active for one of them
    equals the product over all rows and classes; the stopped classes get 0. In a fit, each
    Newton iteration's ``cg_per_newton`` is its slowest class's count (``cg_per_class``)."""
    from dynsim.readouts import _Design, _LiveProducts

    x, y = separated_blobs()
    gen = torch.Generator().manual_seed(3)
    cost = (torch.rand(4, 2000, generator=gen, dtype=x.dtype) < 0.1) * 1.5  # D_c: ~10 % active rows
    p = torch.randn(4, 31, generator=gen, dtype=x.dtype)
    design = _Design(x, 1.0)
    full = p + 2.0 * design.gauss_newton_product(p, cost)
    live = torch.tensor([False, True, False, True])
    products = _LiveProducts(design, cost)
    hp = products.hessian(p, live)
    torch.testing.assert_close(hp[live], full[live], rtol=1e-5, atol=1e-4)
    assert torch.equal(hp[~live], torch.zeros(2, 31, dtype=x.dtype))
    assert products.design.x.shape[0] < 0.7 * 2000  # a copy of the live classes' rows
    live &= torch.tensor([True, False, True, True])  # class 1 stops (in place, as in CG)
    hp = products.hessian(p, live)
    torch.testing.assert_close(hp[3], full[3], rtol=1e-5, atol=1e-4)
    assert torch.equal(hp[:3], torch.zeros(3, 31, dtype=x.dtype))
    dense = (torch.rand(4, 2000, generator=gen, dtype=x.dtype) < 0.9) * 1.5  # most rows active: no copy
    hp = _LiveProducts(design, dense).hessian(p, torch.tensor([True, True, False, False]))
    torch.testing.assert_close(hp[:2], (p + 2.0 * design.gauss_newton_product(p, dense))[:2], rtol=1e-5, atol=1e-4)
    m = fit_svc(x, y, tol=1e-9, direction="cg", block=5)
    assert [max(c) for c in m.info["cg_per_class"]] == m.info["cg_per_newton"]
    assert any(min(c) < max(c) for c in m.info["cg_per_class"])


def separated_blobs(n=2000, d=30, k=4):
    """Blobs far enough apart that most rows leave every active set (so CG runs on a compacted
    copy of the rows after the first Newton iterations), plus a shared direction of large variance."""
    x, y = blobs(n=n, d=d, k=k)
    x[torch.arange(n), y] += 4.0
    x += 3.0 * torch.rand(n, 1, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    return x, y


@pytest.mark.parametrize("block", [None, 5])
def test_svc_coarse_space_same_minimum(block):
    """The balancing preconditioner (``coarse`` = ℓ) changes CG's convergence only: the same
    minimum and weights as the one-level preconditioner, diagonal or block-Jacobi."""
    x, y = separated_blobs()
    one = fit_svc(x, y, tol=1e-9, direction="cg", block=block)
    two = fit_svc(x, y, tol=1e-9, direction="cg", block=block, coarse=4)
    assert one.info["converged"] and two.info["converged"] and two.info["coarse"] == 4 and one.info["coarse"] is None
    np.testing.assert_allclose(two.info["objective"], one.info["objective"], rtol=1e-10)
    torch.testing.assert_close(two.weights, one.weights, atol=1e-5, rtol=0)


def test_svc_coarse_space_of_every_direction_is_the_exact_newton_step():
    """``coarse = d + 1``: ``U`` spans every direction, ``Q_c = H_c⁻¹`` and the balancing
    preconditioner is ``H_c⁻¹`` itself, so CG ends after one iteration in every Newton
    iteration that uses it (those whose rows were compacted)."""
    x, y = separated_blobs()
    m = fit_svc(x, y, tol=1e-9, direction="cg", coarse=x.shape[1] + 1)
    used = [cg for cg, rows in zip(m.info["cg_per_newton"], m.info["cg_rows"], strict=True) if rows < len(y)]
    assert m.info["converged"] and len(used) >= 3
    assert used == [1] * len(used)


def test_svc_coarse_auto_only_where_auto_directions_are_cg(monkeypatch):
    """``coarse="auto"`` (the default): none up to ``EXACT_HESSIAN_MAX_DIM`` features, ``min(COARSE_RANK,
    d + 1)`` above it (where ``direction="auto"`` is CG)."""
    import dynsim.readouts as ro

    x, y = separated_blobs()
    assert fit_svc(x, y, direction="cg").info["coarse"] is None
    monkeypatch.setattr(ro, "EXACT_HESSIAN_MAX_DIM", 16)
    monkeypatch.setattr(ro, "COARSE_RANK", 8)
    m = fit_svc(x, y)
    assert m.info["direction"] == "cg" and m.info["coarse"] == 8


@pytest.mark.parametrize("coarse", [0, 32, -1, "full"])
def test_svc_coarse_out_of_range_is_one_line_error(coarse):
    x, y = blobs(n=200, d=30)
    with pytest.raises(ConfigError, match="coarse must be an integer in 1 … d \\+ 1 = 31"):
        fit_svc(x, y, direction="cg", coarse=coarse)


def site_features(n=3000, sites=24, nps=8, noise=0.05, seed=0, k=5):
    """Site-structured features (feature j = site j // nps, neuron j % nps), like the DSSM's
    settled rates: the neurons of a site follow one shared factor (plus ``noise``) at their own
    scales, so the within-site blocks of the Hessian are nearly rank one and far from diagonal."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, sites, 1, generator=g)
    scale = torch.rand(1, sites, nps, generator=g) * 3 + 0.2
    x = (scale * (z + noise * torch.randn(n, sites, nps, generator=g))).reshape(n, sites * nps)
    y = (x @ torch.randn(sites * nps, k, generator=g) + 3 * torch.randn(n, k, generator=g)).argmax(1)
    return x, y


def test_svc_block_jacobi_needs_far_fewer_cg_iterations_on_site_features():
    """On site-structured features the block-Jacobi preconditioner (block = NpS) reaches the same
    minimum as the diagonal one in under a third of its CG iterations."""
    x, y = site_features()
    diag = fit_svc(x, y, tol=1e-4, direction="cg")
    jac = fit_svc(x, y, tol=1e-4, direction="cg", block=8)
    assert diag.info["converged"] and jac.info["converged"] and jac.info["block"] == 8
    assert jac.info["cg_iterations"] * 3 < diag.info["cg_iterations"]
    assert len(jac.info["cg_per_newton"]) == jac.info["newton_iterations"]
    assert sum(jac.info["cg_per_newton"]) == jac.info["cg_iterations"]
    np.testing.assert_allclose(jac.info["objective"], diag.info["objective"], rtol=1e-4)


def test_svc_one_block_is_the_exact_newton_step():
    """``block = d + 1``: the preconditioner is the whole Hessian, so CG ends after one iteration
    in every Newton iteration and follows the exact-Hessian path (same Newton iterations)."""
    x, y = site_features(n=1500, sites=6, nps=4)
    exact = fit_svc(x.double(), y, tol=1e-6, direction="hessian")
    one = fit_svc(x.double(), y, tol=1e-6, direction="cg", block=x.shape[1] + 1)
    assert one.info["cg_per_newton"] == [1] * one.info["newton_iterations"]
    assert one.info["newton_iterations"] == exact.info["newton_iterations"]
    torch.testing.assert_close(one.weights, exact.weights, atol=1e-8, rtol=0)


def test_svc_block_jacobi_on_digits_is_liblinear():
    """Tiny digits (8×8 images, blocks of 8 = one image row): liblinear's weights and objective."""
    from sklearn.datasets import load_digits

    xd, yd = load_digits(return_X_y=True)
    x, y = torch.as_tensor(xd[:600] / 16.0), torch.as_tensor(yd[:600]).long()
    ours = fit_svc(x, y, tol=1e-8, direction="cg", block=8)
    ref = fit_liblinear(x, y, tol=1e-8, max_iter=100000)
    assert ours.info["converged"]
    ours_obj, ref_obj = svc_objective(ours.weights, x, y, 10), svc_objective(ref.weights, x, y, 10)
    assert torch.all(ours_obj <= ref_obj * (1 + 1e-9))
    torch.testing.assert_close(ours.weights, ref.weights, atol=1e-3, rtol=0)


def test_svc_bad_cg_stop_or_forcing_is_one_line_error():
    x, y = blobs()
    for bad, message in ((dict(cg_stop="Quadratic"), "cg_stop must be 'residual' or 'quadratic', got 'Quadratic'"),
                         (dict(cg_stop=["residual"]), "cg_stop must be 'residual' or 'quadratic'"),
                         (dict(cg_forcing=1.0), "cg_forcing must be in \\(0, 1\\), got 1.0"),
                         (dict(cg_forcing="x"), "cg_forcing must be a number in \\(0, 1\\), got 'x'")):
        with pytest.raises(ConfigError, match=message):
            fit_svc(x, y, direction="cg", **bad)


@pytest.mark.parametrize("block", [0, 14, -3])
def test_svc_block_out_of_range_is_one_line_error(block):
    x, y = blobs()
    with pytest.raises(ConfigError, match=r"block must be an integer in 1 … d \+ 1 = 13"):
        fit_svc(x, y, direction="cg", block=block)


_PEAK_SCRIPT = """
import resource, sys, torch
from dynsim.readouts import fit_svc
torch.set_num_threads(1)
n, d, direction = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
g = torch.Generator().manual_seed(0)
x = torch.randn(n, d, generator=g).clamp_min_(0.0)
y = torch.randint(0, 10, (n,), generator=g)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fit_svc(x, y, direction=direction, max_iter=2)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


@pytest.mark.parametrize("direction,n,d", [("cg", 20000, 4200), ("hessian", 40000, 600)])
def test_svc_holds_one_copy_of_the_features(tmp_path, direction, n, d):
    """Peak memory of the fit (``ru_maxrss`` of a fresh process, beyond what it held with the
    features made) stays below 0.6 × the features' bytes + 64 MiB (+ the k Hessian blocks in
    float64): no augmented copy, no transposed copy, float64 only in chunks. The former
    fit held three copies (features, ``[X, s]`` and its transpose): 2 × the features beyond."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "peak.py"
    script.write_text(_PEAK_SCRIPT)
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(script), str(n), str(d), direction], capture_output=True,
                         text=True, cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, check=True)
    extra = int(out.stdout.split()[-1])
    features = 4 * n * d
    blocks = 10 * (d + 1) ** 2 * 8 if direction == "hessian" else 0
    assert extra < 0.6 * features + blocks + 64 * 2**20, (extra / 2**20, features / 2**20)


@pytest.mark.parametrize("layers,nps,blocks", [(1, 3, [3]), (2, [2, 3], [2, 3])])
def test_dssm_evaluation_hands_the_neurons_per_site_to_the_readout(monkeypatch, layers, nps, blocks):
    """``run dssm``'s readout of site-major rates gets ``block = NpS`` (per layer of a deep net)."""
    from dynsim import evaluation
    from dynsim.pipelines.dssm import DSSMConfig, run_dssm

    seen = []
    real = evaluation.readout_accuracy

    def spy(*args, block=None, **kwargs):
        seen.append(block)
        return real(*args, block=block, **kwargs)

    monkeypatch.setattr(evaluation, "readout_accuracy", spy)
    run_dssm(DSSMConfig(data="digits", layers=layers, nps=nps, epochs=1, images_per_epoch=20, eval_every=1,
                        eval_train_size=100, eval_test_size=50, max_steps=100, progress=False, readout="svc",
                        checkpoint_every=0))
    assert seen == blocks


def test_readout_tol_reaches_the_fit_and_stops_nearer_the_minimum():
    """``readout_accuracy(tol=…)`` is liblinear's tolerance of the ``svc`` fit: a tight one takes
    more Newton iterations and ends at an objective no higher than a loose one's."""
    from dynsim.readouts import readout_accuracy

    x, y = blobs(n=800, d=12, k=4)
    loose = readout_accuracy("svc", x, y, x, y, tol=1e-1)
    tight = readout_accuracy("svc", x, y, x, y, tol=1e-10)
    assert tight["readout_iterations"] > loose["readout_iterations"]
    k = 4
    obj = lambda w: svc_objective(w.double(), x, y, k).sum()  # noqa: E731
    assert obj(tight["weights"]) <= obj(loose["weights"])
    exact = fit_svc(x, y, tol=1e-10)
    torch.testing.assert_close(tight["weights"].double(), exact.weights.double(), atol=1e-5, rtol=0)


def test_run_dssm_readout_tol_is_recorded_and_checked():
    """``--readout-tol`` is a DSSM setting (in the result's config, free to change on resume) with a
    one-line error for a non-positive value."""
    from dynsim.configs.dssm import RESUME_MAY_CHANGE, DSSMConfig

    assert DSSMConfig().readout_tol == 1e-4 and "readout_tol" in RESUME_MAY_CHANGE
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "dynsim", "run", "dssm", "--readout-tol", "-1"],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "--readout-tol must be > 0" in out.stderr and "Traceback" not in out.stderr


def test_dssm_evaluation_and_baseline_use_the_readout_tol(monkeypatch):
    """``run dssm --readout-tol`` reaches both the network's readout and the raw-pixel baseline."""
    from dynsim import evaluation
    from dynsim.pipelines import dssm
    from dynsim.pipelines.dssm import DSSMConfig, run_dssm

    seen = []
    real = evaluation.readout_accuracy

    def spy(*args, tol=1e-4, **kwargs):
        seen.append(tol)
        return real(*args, tol=tol, **kwargs)

    monkeypatch.setattr(evaluation, "readout_accuracy", spy)
    monkeypatch.setattr(dssm, "readout_accuracy", spy)
    out = run_dssm(DSSMConfig(data="digits", epochs=1, images_per_epoch=20, eval_every=1, eval_train_size=100,
                              eval_test_size=50, max_steps=100, progress=False, checkpoint_every=0, readout_tol=3e-3))
    assert seen == [3e-3, 3e-3]  # the baseline, then the one evaluation
    assert out["config"]["readout_tol"] == 3e-3
