"""Compiled (numba) CPU kernels for the site-separable Hebbian layer: settle and learn one image at a time.

Online DSSM learning settles one image, updates the weights, and moves on. With the
per-site Newton solver an image needs only ~5 steps, so the torch path spends its time
dispatching ~60 small ops per image (0.6 ms; benchmarks/README.md), not computing
(~0.1 M multiply-adds). These kernels do the same arithmetic in one compiled loop:

* :func:`settle_site_newton` — for each sample, the drive ``d = W x`` (site by site,
  ``d[s, m] = Σ_j W[s, m, j] x[index[s, j]]``), then the loop of :func:`dynsim.settle` with
  :class:`~dynsim.solvers.SiteNewton`: the residual ``‖F(u)‖/‖u‖`` of
  ``F(u) = (−u + d + s·A f(u))/τ`` (``A_k = L_k − I`` per site) is tested first, then the
  Picard start ``u₁ = d + s·A f(u₀)`` or a Newton step ``u ← u − J⁻¹(τF)`` with
  ``J_k = −I + s·A_k diag f'(u_k)`` solved per site by Gaussian elimination with partial
  pivoting, NaN → 0 and the tanh box ``|u_k| ≤ |d_k| + Σ_j |s·A_kj|``. Same stop rules
  (tolerance, cap, divergence), same status codes, step counts and fixed points as the
  torch path (tests: ``tests/test_compiled.py``).
* :func:`hebbian_update_online` — batch-1 ``W ← W + η(r xᵀ − W)``, ``L ← L + (η/2)(r rᵀ − L)``
  on the stored (structural) entries, as :func:`dynsim.plasticity.hebbian_update`.

They run on CPU tensors of float32/float64, in place, without copies. Used automatically
where they apply (:func:`applies`); ``DYNSIM_COMPILED=0`` or :func:`disabled` switch them
off (the torch path is the reference and the GPU path). Compilation takes a few seconds
once per machine (numba caches it beside this file, or under ``NUMBA_CACHE_DIR``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np
import torch

try:  # numba is a dependency, but the torch path works without it
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

MAX_NPS = 16  # above this the per-site solve is better done by LAPACK (batched torch), see benchmarks
ACTIVATION_CODES = {"tanh": 0, "linear": 1, "relu": 2}
_enabled = os.environ.get("DYNSIM_COMPILED", "1") != "0"


def available() -> bool:
    """True when numba is installed and the kernels are not switched off."""
    return numba is not None and _enabled


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the torch path inside this block (for comparisons and tests)."""
    global _enabled
    old, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = old


def applies(layer, *tensors: torch.Tensor) -> bool:
    """The kernels handle ``layer`` (a site-separable HebbianLayer, nps ≤ MAX_NPS) with these tensors
    (CPU, float32 or float64, all one dtype, no grad)."""
    if not available() or not getattr(layer, "site_separable", False) or layer.nps > MAX_NPS:
        return False
    w = layer.ff.weight
    return all(
        t.device.type == "cpu" and t.dtype == w.dtype and t.dtype in (torch.float32, torch.float64)
        and not t.requires_grad
        for t in (w, layer.lateral.weight, *tensors)
    )


def _jit(fn):
    return numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})(fn) if numba is not None else fn


@_jit
def _rate(u, code):
    if code == 0:
        return np.tanh(u)
    if code == 2:
        return u if u > 0 else u * 0
    return u


@_jit
def _slope(u, r, code):
    if code == 0:
        return 1 - r * r
    if code == 2:
        return u * 0 + 1 if u > 0 else u * 0
    return u * 0 + 1


@_jit
def _settle_kernel(x, w, ff_index, n_pixels, channels, lat, sign, tau, code, picard, tol, cap, cap_first,
                   bound, big, u, r, steps, status, residual):
    """Settle every row of ``x`` (B, D_in) in place into u, r (B, N), steps, status, residual (B,)."""
    n_sites, m_per, kc = w.shape
    k_in = ff_index.shape[1]
    dt = w.dtype.type
    d = np.empty((n_sites, m_per), dtype=w.dtype)
    a = np.empty((n_sites, m_per, m_per), dtype=w.dtype)  # s·(L_k − I)
    box = np.empty((n_sites, m_per), dtype=w.dtype)
    for s in range(n_sites):
        for i in range(m_per):
            for j in range(m_per):
                a[s, i, j] = dt(sign) * (lat[s, i, j] - (1 if i == j else 0))
    xg = np.empty(kc, dtype=w.dtype)
    rr = np.empty((n_sites, m_per), dtype=w.dtype)
    fp = np.empty(m_per, dtype=w.dtype)
    fs = np.empty((n_sites, m_per), dtype=w.dtype)
    jac = np.empty((m_per, m_per), dtype=w.dtype)
    rhs = np.empty(m_per, dtype=w.dtype)
    un = np.empty((n_sites, m_per), dtype=w.dtype)
    n_evals = 0
    for b in range(x.shape[0]):
        # drive d = W x, and the tanh box |d| + Σ|s·A|
        for s in range(n_sites):
            for k in range(k_in):
                p = ff_index[s, k]
                for g in range(channels):
                    xg[k * channels + g] = 0 if p == n_pixels else x[b, g * n_pixels + p]
            for i in range(m_per):
                acc = dt(0)
                for j in range(kc):
                    acc += w[s, i, j] * xg[j]
                d[s, i] = acc
                row = dt(0)
                for j in range(m_per):
                    row += abs(a[s, i, j])
                box[s, i] = abs(acc) + row
        us = u[b].reshape(n_sites, m_per)
        n = 0
        while True:
            # F(u)·τ = d − u + s·A f(u), its norm and the state's
            f2 = 0.0
            u2 = 0.0
            for s in range(n_sites):
                for j in range(m_per):
                    rr[s, j] = _rate(us[s, j], code)
                for i in range(m_per):
                    acc = d[s, i] - us[s, i]
                    for j in range(m_per):
                        acc += a[s, i, j] * rr[s, j]
                    fs[s, i] = acc
                    f2 += float(acc) * float(acc)
                    u2 += float(us[s, i]) * float(us[s, i])
            res = np.sqrt(f2) / tau / max(np.sqrt(u2), 1e-12)
            residual[b] = res
            settled = res < tol
            capped = cap >= 0 and n >= cap
            if settled or capped:
                status[b] = 2 if capped and (cap_first or not settled) else 1
                break
            # next iterate: Picard from rest (first step), else Newton per site
            if n == 0 and picard:
                for s in range(n_sites):
                    for i in range(m_per):
                        un[s, i] = us[s, i] + fs[s, i]
            else:
                for s in range(n_sites):
                    for j in range(m_per):
                        fp[j] = _slope(us[s, j], rr[s, j], code)
                    for i in range(m_per):
                        for j in range(m_per):
                            jac[i, j] = a[s, i, j] * fp[j] - (1 if i == j else 0)
                        rhs[i] = fs[s, i]
                    _solve_in_place(jac, rhs)
                    for i in range(m_per):
                        v = us[s, i] - rhs[i]
                        if np.isnan(v):
                            v = dt(0)
                        elif v > big:
                            v = dt(big)
                        elif v < -big:
                            v = dt(-big)
                        if code == 0:
                            v = min(max(v, -box[s, i]), box[s, i])
                        un[s, i] = v
            # divergence: a non-finite residual or state, or an RMS state above the bound
            n2 = 0.0
            finite = np.isfinite(res)
            for s in range(n_sites):
                for i in range(m_per):
                    v = un[s, i]
                    finite = finite and np.isfinite(v)
                    n2 += float(v) * float(v)
            if not finite or np.sqrt(n2) > bound:
                status[b] = 3
                break
            us[:, :] = un
            n += 1
        steps[b] = n
        n_evals += n + 1
        for s in range(n_sites):
            for i in range(m_per):
                r[b, s * m_per + i] = _rate(us[s, i], code)
    return n_evals


@_jit
def _solve_in_place(a, b):
    """Solve ``a z = b`` (M × M) by Gaussian elimination with partial pivoting; ``b`` becomes ``z``.

    A zero pivot gives inf/NaN entries, as LAPACK's ``solve_ex`` does for a singular matrix."""
    m = a.shape[0]
    for c in range(m):
        p = c
        best = abs(a[c, c])
        for i in range(c + 1, m):
            if abs(a[i, c]) > best:
                best, p = abs(a[i, c]), i
        if p != c:
            for j in range(c, m):
                a[c, j], a[p, j] = a[p, j], a[c, j]
            b[c], b[p] = b[p], b[c]
        piv = a[c, c]
        for i in range(c + 1, m):
            factor = a[i, c] / piv
            if factor != 0:
                for j in range(c + 1, m):
                    a[i, j] -= factor * a[c, j]
                b[i] -= factor * b[c]
    for c in range(m - 1, -1, -1):
        acc = b[c]
        for j in range(c + 1, m):
            acc -= a[c, j] * b[j]
        b[c] = acc / a[c, c]


@_jit
def _hebbian_kernel(x, r, w, ff_index, n_pixels, channels, lat, lat_index, rate_ff, rate_lat):
    """``W ← W + η_ff (r xᵀ − W)``, ``L ← L + η_lat (r rᵀ − L)`` on stored entries (one sample)."""
    n_sites, m_per, kc = w.shape
    k_in = ff_index.shape[1]
    k_lat = lat_index.shape[1]
    pre = np.empty(kc, dtype=w.dtype)
    pre_l = np.empty(lat.shape[2], dtype=w.dtype)
    for s in range(n_sites):
        for k in range(k_in):  # presynaptic pixels of the site (padding reads 0, its weight stays 0)
            p = ff_index[s, k]
            for g in range(channels):
                pre[k * channels + g] = x[g * n_pixels + p] if p != n_pixels else 0
        for k in range(k_lat):  # presynaptic rates of the neighbouring sites
            q = lat_index[s, k]
            for g in range(m_per):
                pre_l[k * m_per + g] = r[q * m_per + g] if q != n_sites else 0
        for i in range(m_per):
            post = r[s * m_per + i]
            for j in range(kc):
                w[s, i, j] += rate_ff * (post * pre[j] - w[s, i, j])
            for j in range(pre_l.size):
                lat[s, i, j] += rate_lat * (post * pre_l[j] - lat[s, i, j])


def settle_site_newton(layer, x: torch.Tensor, u0: torch.Tensor | None, *, tol: float | None, cap: int | None,
                       cap_first: bool, picard_start: bool, bound: float):
    """Settle ``x`` (B, D_in) with the compiled per-site Newton loop (see module docstring).

    ``tol``/``cap``: the stop rule's tolerance on the field residual and step cap (``None``:
    absent); ``cap_first``: the cap's status wins when both fire on the same step; ``bound``:
    the divergence bound on ``‖u‖``. Returns ``(u, r, steps, status, residual, n_evals)``.
    """
    w, lat = layer.ff.weight, layer.lateral.weight
    dtype = w.dtype
    b = x.shape[0]
    u = torch.zeros(b, layer.state_size, dtype=dtype) if u0 is None else u0.clone()
    r = torch.empty_like(u)
    steps = torch.empty(b, dtype=torch.long)
    status = torch.empty(b, dtype=torch.int8)
    residual = torch.empty(b, dtype=dtype)
    npt = np.float32 if dtype == torch.float32 else np.float64
    n_evals = _settle_kernel(
        x.detach().contiguous().numpy(), w.numpy(), layer.ff.index.numpy(),
        layer.input_size // layer.input_shape[0], layer.input_shape[0], lat.numpy(),
        npt(layer.lateral_sign), float(layer.tau), ACTIVATION_CODES[layer.activation],
        bool(picard_start and layer.activation == "tanh"), -1.0 if tol is None else float(tol),
        -1 if cap is None else int(cap), bool(cap_first), float(bound), float(torch.finfo(dtype).max),
        u.numpy(), r.numpy(), steps.numpy(), status.numpy(), residual.numpy(),
    )
    return u, r, steps, status, residual, int(n_evals)


def hebbian_update_online(layer, x: torch.Tensor, r: torch.Tensor, rate_ff: float, rate_lat: float) -> None:
    """In place: one sample's ``W ← W + rate_ff (r xᵀ − W)``, ``L ← L + rate_lat (r rᵀ − L)``.

    Shapes: x (1, D_in) or (D_in,), r (1, N) or (N,). Bumps the weights' version counters, as
    an in-place torch op would, so that caches keyed on them (Newton's lateral blocks) see the change."""
    w, lat = layer.ff.weight, layer.lateral.weight
    npt = np.float32 if w.dtype == torch.float32 else np.float64
    _hebbian_kernel(
        x.reshape(-1).contiguous().numpy(), r.reshape(-1).contiguous().numpy(), w.numpy(),
        layer.ff.index.numpy(), layer.input_size // layer.input_shape[0], layer.input_shape[0],
        lat.numpy(), layer.lateral.index.numpy(), npt(rate_ff), npt(rate_lat),
    )
    torch.autograd.graph.increment_version((w, lat))
