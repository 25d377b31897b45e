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
@pytest.mark.parametrize("direction", ["hessian", "cg"])
def test_svc_reaches_liblinear_minimum(imbalance, direction):
    x, y = blobs(imbalance=imbalance)
    k = int(y.max()) + 1
    ours = fit_svc(x, y, tol=1e-8, direction=direction)
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
    for direction in ("hessian", "cg"):
        m = fit_svc(x, y, tol=1e-6, direction=direction)
        assert m.info["converged"]
        np.testing.assert_allclose(m.info["objective"], whole.info["objective"], rtol=1e-5)
        torch.testing.assert_close(m.weights, whole.weights, atol=2e-3, rtol=0)


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
