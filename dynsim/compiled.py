"""Compiled (numba) CPU kernels for the site-separable Hebbian layer: settle and learn one image at a time.

A backend of :func:`dynsim.settle` and of the batch-1 Hebbian update, chosen by
:mod:`dynsim.backend`; nothing else imports this module. Online DSSM learning settles one
image, updates the weights, and moves on. With the per-site Newton solver an image needs a
handful of steps, so the torch path spends its time dispatching dozens of small ops per
image rather than computing (~0.1 M multiply-adds). These kernels do the same arithmetic in
one compiled loop (timings: benchmarks/README.md, ``compiled_kernels.py``):

* :func:`settle_layer` — for each sample, the drive ``d = W x`` (site by site,
  ``d[s, m] = Σ_j W[s, m, j] x[index[s, j]]``), then the loop of :func:`dynsim.settle` with
  :class:`~dynsim.solvers.SiteNewton`: the residual ``‖F(u)‖/‖u‖`` of
  ``F(u) = (−u + d + s·A f(u))/τ`` (``A_k = L_k − I`` per site) is tested first, then the
  Picard start ``u₁ = d + s·A f(u₀)`` or a Newton step ``u ← u − J⁻¹(τF)`` with
  ``J_k = −I + s·A_k diag f'(u_k)`` solved per site by Gaussian elimination with partial
  pivoting, NaN → 0 and the tanh box ``|u_k| ≤ |d_k| + Σ_j |s·A_kj|``, damped per site by the
  late Armijo test of :func:`dynsim.solvers.newton.line_search` (:func:`_armijo_check`). Same stop rules
  (``‖F‖ < atol + tol‖u‖``, cap, divergence), the :class:`~dynsim.stopping.Status` codes and
  the step counts of the torch path, and the same fixed points up to float rounding (tests:
  ``tests/test_compiled.py`` and the solver conformance table). Float32
  tanh is a rational approximation within 1 ulp (see ``_tanh_rational``). Batches of
  ≥ 128 rows are split over ``torch.get_num_threads()`` threads (the ``--threads`` setting):
  Python threads, each running the kernel (it releases the GIL) on its slice, so that no
  OpenMP pool of numba's competes with torch's (numba's ``parallel=True`` chunks did, with
  both pools spinning: benchmarks/README.md, issue 14 item 3). The one ``parallel=True`` loop
  is :mod:`dynsim.compiled_cg`'s, over the sites of a single image, where there are no rows
  to split (:func:`_jit_parallel`).
  Forward Euler with a step schedule (``u ← u + dt_n F(u)``, the seed's method) runs in the
  same loop (:class:`~dynsim.solvers.Euler` with a step cap; :func:`settle_backend`).
  The loop's per-site pieces (the drive, the lateral blocks, the rates, the field, the Newton
  and Euler steps, the stop and divergence tests; :func:`_settle_row`) are also the deep
  network's (:mod:`dynsim.compiled_deep` runs them on each layer, with the coupling input in
  place of the drive), and so are the outputs (:func:`loop_outputs`) and the threads
  (:func:`in_threads`).
* :func:`hebbian_update_online` — batch-1 ``W ← W + η(r xᵀ − W)``, ``L ← L + (η/2)(r rᵀ − L)``
  on the stored (structural) entries, site-first and so at any NpS: the formula of
  :func:`dynsim.plasticity.similarity_matching.structured_update`, tested for parity with it.

They run on CPU tensors of float32/float64, in place, without copies. Used automatically
where they apply (:func:`applies`); ``DYNSIM_COMPILED=0`` or :func:`disabled` switch them
off (the torch path is the reference and the GPU path). Compilation happens once per machine
(numba caches it beside this file, or under ``NUMBA_CACHE_DIR``; compile and load times:
``compiled_kernels.py`` row 5).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from dynsim.solvers import Euler, SiteNewton
from dynsim.solvers.newton import ARMIJO_C, MAX_HALVINGS, SEARCH_AFTER
from dynsim.stopping import Status, StopLimits

try:  # numba is a dependency, but the torch path works without it
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

PARALLEL_MIN_ROWS = 64  # rows per thread below which a batch settles in one thread
# Above this the torch path (batched LAPACK) wins: the kernel's elimination is O(M³) per site in
# scalar code, LAPACK's is blocked (crossover measured by benchmarks/compiled_kernels.py row 9).
# Newton–CG has its own site-first kernel for any NpS (dynsim/compiled_cg.py), and the batch-1
# Hebbian update below applies at any NpS.
MAX_NPS = 32
_DTYPES = (torch.float32, torch.float64)
METHOD_NEWTON, METHOD_PICARD_NEWTON, METHOD_EULER = 0, 1, 2
ACTIVATION_CODES = {"tanh": 0, "linear": 1, "relu": 2}
_enabled = os.environ.get("DYNSIM_COMPILED", "1") != "0"
# status codes written by the kernel: the Status enum's values (numba freezes these globals)
_SETTLED, _MAX_STEPS, _DIVERGED = int(Status.SETTLED), int(Status.MAX_STEPS), int(Status.DIVERGED)
_ARMIJO_C, _MAX_HALVINGS, _SEARCH_AFTER = ARMIJO_C, MAX_HALVINGS, SEARCH_AFTER  # the Newton line search's


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


def applies(layer, *tensors: torch.Tensor, max_nps: int | None = MAX_NPS) -> bool:
    """The kernels handle ``layer`` (a site-separable HebbianLayer, nps ≤ ``max_nps``: the settle
    kernels' limit; the Hebbian update takes any, ``None``) with these tensors (CPU, float32 or
    float64, all one dtype, no grad)."""
    if numba is None or not _enabled or not getattr(layer, "site_separable", False):
        return False
    if max_nps is not None and layer.nps > max_nps:
        return False
    w = layer.ff.weight
    dtype = w.dtype
    if dtype not in _DTYPES:
        return False
    for t in (w, layer.lateral.weight, *tensors):
        if t.dtype != dtype or t.device.type != "cpu" or t.requires_grad:
            return False
    return True


def _jit(fn):
    # error_model="numpy": x / 0 gives inf/NaN (as in torch) instead of raising ZeroDivisionError, so a
    # singular block reaches the NaN/box safeguard; it also lets divisions vectorise
    if numba is None:
        return fn
    return numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "contract"})(fn)


def _jit_parallel(fn):
    """:func:`_jit` with ``parallel=True``: ``numba.prange`` loops run on numba's threads (its
    threading layer; the number set by ``numba.set_num_threads``)."""
    if numba is None:
        return fn
    return numba.njit(cache=True, nogil=True, parallel=True, error_model="numpy",
                      fastmath={"reassoc", "contract"})(fn)


prange = range if numba is None else numba.prange


# tanh(x) ≈ x·P(x²)/Q(x²) on |x| ≤ 9 (±1 beyond, where float32 rounds tanh to ±1): a (4, 4)
# rational fit to tanh(x)/x, relative error 2.2e-8, evaluated in float64 and rounded once, so
# float32 results are within 1 ulp of libm's (as libm's tanhf; tests). Unlike a tanh call it
# vectorises, which is what makes it faster (benchmarks/compiled_kernels.py row 8).
_TANH_P = (9.99999981e-01, 1.33816708e-01, 3.49634665e-03, 2.06213811e-05, 1.33713948e-08)
_TANH_Q = (1.0, 4.67149872e-01, 2.58798861e-02, 3.28686631e-04, 7.78347625e-07)


@_jit
def _tanh_rational(u):
    x = min(max(float(u), -9.0), 9.0)
    z = x * x
    p = (((_TANH_P[4] * z + _TANH_P[3]) * z + _TANH_P[2]) * z + _TANH_P[1]) * z + _TANH_P[0]
    q = (((_TANH_Q[4] * z + _TANH_Q[3]) * z + _TANH_Q[2]) * z + _TANH_Q[1]) * z + _TANH_Q[0]
    return x * p / q


@_jit
def _rate(u, code):
    if code == 3:  # tanh of a float32 state
        return np.float32(_tanh_rational(u))
    if code == 0:
        return np.tanh(u)
    if code == 2:
        return u if u > 0 else u * 0
    return u


@_jit
def _slope(u, r, code):
    if code == 0 or code == 3:
        return 1 - r * r
    if code == 2:
        return u * 0 + 1 if u > 0 else u * 0
    return u * 0 + 1


@_jit
def _settle_kernel(x, w, ff_index, n_pixels, channels, lat, sign, tau, code, method, dts, tol, atol, cap, cap_first,
                   bound, big, u, r, steps, status, residual):
    """Settle every row of ``x`` (B, D_in) in place into u, r (B, N), steps, status, residual (B,).

    Per row: the drive (:func:`_drive_sites`), then :func:`_settle_row`. Working arrays are
    *site-last* (M, S) / (M, M, S) so that every per-site operation, the M × M elimination
    included, is a loop over the sites that the compiler vectorises (against site by site:
    benchmarks/compiled_kernels.py row 4)."""
    n_sites, m_per, kc = w.shape
    work = _site_work(m_per, n_sites, w.dtype)
    a, row, d, box, us = work[0], work[1], work[2], work[3], work[4]
    rr = work[6]
    _lateral_blocks(lat, sign, a, row)
    xg = np.empty(kc, dtype=w.dtype)
    n_evals = 0
    for b in range(x.shape[0]):
        _drive_sites(x[b], w, ff_index, n_pixels, channels, xg, d)
        for s in range(n_sites):
            for i in range(m_per):
                box[i, s] = abs(d[i, s]) + row[i, s]
                us[i, s] = u[b, s * m_per + i]
        n, code_b, res = _settle_row(work, tau, code, method, dts, tol, atol, cap, cap_first, bound, big)
        steps[b] = n
        status[b] = code_b
        residual[b] = res
        n_evals += n + 1
        for s in range(n_sites):  # rr holds f(us) from the last residual test
            for i in range(m_per):
                u[b, s * m_per + i] = us[i, s]
                r[b, s * m_per + i] = rr[i, s]
    return n_evals


@_jit
def _site_work(m_per, n_sites, dtype):
    """The site-last working arrays of :func:`_settle_row`: ``(a, row, d, box, us, un, rr, fs, fp,
    jac, piv, best, fac, u0, p0, ls, fail, definite, chol)``; ``row`` zeroed, ``definite`` −1 (to be
    reset whenever ``a`` changes), the rest uninitialised."""
    a = np.empty((m_per, m_per, n_sites), dtype=dtype)  # s·(L_k − I)
    row = np.zeros((m_per, n_sites), dtype=dtype)  # Σ_j |s·A_kij|
    d = np.empty((m_per, n_sites), dtype=dtype)
    box = np.empty((m_per, n_sites), dtype=dtype)
    us = np.empty((m_per, n_sites), dtype=dtype)
    un = np.empty((m_per, n_sites), dtype=dtype)
    rr = np.empty((m_per, n_sites), dtype=dtype)
    fs = np.empty((m_per, n_sites), dtype=dtype)
    fp = np.empty((m_per, n_sites), dtype=dtype)
    jac = np.empty((m_per, m_per, n_sites), dtype=dtype)
    piv = np.empty(n_sites, dtype=np.int64)
    best = np.empty(n_sites, dtype=dtype)
    fac = np.empty(n_sites, dtype=dtype)
    # the line search (dynsim.solvers.newton.line_search): the checked step's start and direction,
    # per-site merit ‖τF_k‖², α, this step's merit, rounding floor and verdict, I − a_k ≻ 0
    u0 = np.empty((m_per, n_sites), dtype=dtype)
    p0 = np.empty((m_per, n_sites), dtype=dtype)
    ls = np.empty((4, n_sites), dtype=np.float64)  # rows: merit at u0, α, merit now, floor now
    fail = np.zeros(n_sites, dtype=np.bool_)
    definite = np.full(n_sites, -1, dtype=np.int8)  # 1 yes, 0 no, −1 not checked (reset when a changes)
    chol = np.empty((m_per, m_per), dtype=np.float64)
    return a, row, d, box, us, un, rr, fs, fp, jac, piv, best, fac, u0, p0, ls, fail, definite, chol


@_jit
def _drive_sites(xb, w, ff_index, n_pixels, channels, xg, d):
    """``d[i, s] = Σ_j W[s, i, j] x[index[s, j]]`` for one input ``xb`` (D_in,) (padding reads 0)."""
    n_sites, m_per, kc = w.shape
    k_in = ff_index.shape[1]
    zero = w.dtype.type(0)
    for s in range(n_sites):
        if channels == 1:
            for k in range(k_in):
                p = ff_index[s, k]
                xg[k] = xb[p] if p != n_pixels else zero
        else:
            for k in range(k_in):
                p = ff_index[s, k]
                for g in range(channels):
                    xg[k * channels + g] = xb[g * n_pixels + p] if p != n_pixels else zero
        for i in range(m_per):
            acc = zero
            for j in range(kc):
                acc += w[s, i, j] * xg[j]
            d[i, s] = acc


@_jit
def _lateral_blocks(lat, sign, a, row):
    """The site-last blocks ``a[i, j, s] = s·(L_k − I)_ij`` of a layer's lateral weights ``lat``
    (S, M, M), and ``row[i, s] += Σ_j |a[i, j, s]|`` (the tanh box's lateral part; ``row`` comes zeroed)."""
    n_sites, m_per, _ = lat.shape
    for s in range(n_sites):
        for i in range(m_per):
            for j in range(m_per):
                v = a.dtype.type(sign) * (lat[s, i, j] - (1 if i == j else 0))
                a[i, j, s] = v
                row[i, s] += abs(v)


@_jit
def _site_rates(us, gain, code, rr):
    """``rr = f(g·u)`` on a site-last (M, S) state (gain ``g``; 1 for a single layer)."""
    m_per, n_sites = us.shape
    dt = us.dtype.type
    for j in range(m_per):
        for s in range(n_sites):
            rr[j, s] = _rate(us[j, s] if gain == 1.0 else dt(gain) * us[j, s], code)


@_jit
def _site_field(d, us, rr, a, fs):
    """``fs = d − u + s·A f(u)`` (τF with the input ``d`` held fixed; ``rr`` = f(u)) on site-last
    (M, S) arrays; returns ``(‖fs‖², ‖u‖²)`` in float64."""
    m_per, n_sites = us.shape
    f2 = 0.0
    u2 = 0.0
    for i in range(m_per):
        for s in range(n_sites):
            fs[i, s] = d[i, s] - us[i, s]
        for j in range(m_per):
            for s in range(n_sites):
                fs[i, s] += a[i, j, s] * rr[j, s]
        for s in range(n_sites):
            f2 += float(fs[i, s]) * float(fs[i, s])
            u2 += float(us[i, s]) * float(us[i, s])
    return f2, u2


@_jit
def _stop_status(res, u_norm, tol, atol, n, cap, cap_first):
    """The stop rule after ``n`` steps at residual ``res``: −1 (go on), or the
    :class:`~dynsim.stopping.Status` code (``‖F‖ < atol + tol‖u‖``; the cap's code wins with
    ``cap_first`` or when not settled)."""
    settled = res < tol + atol / u_norm  # ‖F‖ < atol + tol‖u‖ (stopping.StopLimits)
    capped = cap >= 0 and n >= cap
    if settled or capped:
        return _MAX_STEPS if capped and (cap_first or not settled) else _SETTLED
    return -1


@_jit
def _euler_sites(us, fs, dtn, tau, un):
    """``un = u + dt_n F(u)``, ``F = τF/τ`` as the torch field computes it."""
    m_per, n_sites = us.shape
    dt = us.dtype.type
    for i in range(m_per):
        for s in range(n_sites):
            un[i, s] = us[i, s] + dtn * (fs[i, s] if tau == 1.0 else fs[i, s] / dt(tau))


@_jit
def _newton_sites(us, rr, fs, a, box, gain, code, big, fp, jac, piv, best, fac, un):
    """One per-site Newton step with the input held fixed: ``un = u − J⁻¹(τF)``, ``J_k = −I +
    s·A_k diag(g f'(g u_k))`` solved by :func:`_eliminate`; NaN → 0, ±``big`` (as
    ``torch.nan_to_num``), and for tanh the box ``|u| ≤ box`` that holds every fixed point
    (``box = |d| + Σ_j |s·A_kj|``). ``fs`` (τF at ``u``) is overwritten; ``fp``, ``jac``, ``piv``,
    ``best``, ``fac`` are scratch."""
    m_per, n_sites = us.shape
    dt = us.dtype.type
    zero = dt(0)
    for j in range(m_per):
        for s in range(n_sites):
            if gain == 1.0:
                fp[j, s] = _slope(us[j, s], rr[j, s], code)
            else:
                fp[j, s] = _slope(dt(gain) * us[j, s], rr[j, s], code) * dt(gain)
    for i in range(m_per):
        for j in range(m_per):
            for s in range(n_sites):
                jac[i, j, s] = a[i, j, s] * fp[j, s] - (1 if i == j else 0)
    _eliminate(jac, fs, piv, best, fac)
    for i in range(m_per):
        for s in range(n_sites):
            v = us[i, s] - fs[i, s]
            v = zero if np.isnan(v) else min(max(v, -big), big)  # as torch.nan_to_num
            if code == 0 or code == 3:  # tanh
                v = min(max(v, -box[i, s]), box[i, s])
            un[i, s] = v


@_jit
def _diverged(res, un, bound):
    """A non-finite residual or state, or a state norm above ``bound``."""
    n2 = 0.0
    for i in range(un.shape[0]):
        for s in range(un.shape[1]):
            n2 += float(un[i, s]) * float(un[i, s])
    return not (np.isfinite(res) and np.isfinite(n2)) or np.sqrt(n2) > bound


@_jit
def _settle_row(work, tau, code, method, dts, tol, atol, cap, cap_first, bound, big):
    """Settle one input from ``us`` with drive ``d``, blocks ``a`` and box ``box`` (in ``work``, see
    :func:`_site_work`); the loop of :func:`dynsim.settle`: test the residual ``‖F(u)‖/‖u‖`` of
    ``τF(u) = d − u + s·A f(u)`` first, then take a Picard start, a Newton step (NaN → 0, the tanh
    box) or an Euler step. Returns ``(steps, status, residual)``; ``us`` holds the returned state
    and ``rr`` its rates."""
    a, _, d, box, us, un, rr, fs, fp, jac, piv, best, fac, u0, p0, ls, fail, definite, chol = work
    m_per, n_sites = d.shape
    dt = d.dtype.type
    floor = (16.0 * float(np.finfo(d.dtype).eps)) ** 2
    checked = False  # a Newton step to check (the line search)
    n = 0
    while True:
        # τF(u) = d − u + s·A f(u), its norm and the state's
        _site_rates(us, 1.0, code, rr)
        f2, u2 = _site_field(d, us, rr, a, fs)
        u_norm = max(np.sqrt(u2), 1e-12)
        res = np.sqrt(f2) / tau / u_norm
        stop = _stop_status(res, u_norm, tol, atol, n, cap, cap_first)
        if stop >= 0:
            return n, stop, res
        if method == METHOD_EULER:  # u ← u + dt_n F(u)
            _euler_sites(us, fs, dts[n], tau, un)
        elif n == 0 and method == METHOD_PICARD_NEWTON:  # Picard start: u1 = u0 + τF(u0)
            for i in range(m_per):
                for s in range(n_sites):
                    un[i, s] = us[i, s] + fs[i, s]
        else:  # Newton: solve J z = τF per site, J = −I + s·A diag f'(u); u ← u − z
            back = _armijo_check(a, us, fs, ls, fail, definite, chol, floor, checked)
            _newton_sites(us, rr, fs, a, box, 1.0, code, big, fp, jac, piv, best, fac, un)
            for i in range(m_per):  # a failed site goes back to u0 + (α/2)p; the others start a step
                for s in range(n_sites):
                    if back and fail[s]:
                        un[i, s] = u0[i, s] + dt(0.5 * ls[1, s]) * p0[i, s]
                    else:
                        u0[i, s] = us[i, s]
                        p0[i, s] = un[i, s] - us[i, s]
            for s in range(n_sites):
                if back and fail[s]:
                    ls[1, s] *= 0.5
                else:
                    ls[0, s] = ls[2, s]
                    ls[1, s] = 1.0
            checked = n >= _SEARCH_AFTER  # the line search starts late (SEARCH_AFTER)
        if _diverged(res, un, bound):
            return n, _DIVERGED, res
        us[:, :] = un
        n += 1


@_jit
def _armijo_check(a, us, fs, ls, fail, definite, chol, floor, checked):
    """The late Armijo test of :func:`dynsim.solvers.newton.line_search` at ``us`` (``fs`` = τF(us)):
    ``ls[2]`` ← ‖τF_k‖², and (``checked``: a Newton step led here) ``fail[k]`` ← the site's step
    from ``u0`` failed ``‖τF_k‖² ≤ (1 − 2cα)·ls[0]`` and rounding level, with α = ``ls[1]`` >
    2^−10 and ``I − a_k ≻ 0`` (``definite``, factorised when first needed). Returns whether any
    site failed."""
    m_per, n_sites = us.shape
    for s in range(n_sites):
        ls[2, s] = 0.0
        ls[3, s] = 1.0
    for i in range(m_per):
        for s in range(n_sites):
            ls[2, s] += float(fs[i, s]) * float(fs[i, s])
            ls[3, s] += float(us[i, s]) * float(us[i, s])
    anyfail = False
    for s in range(n_sites):
        bad = (checked and ls[2, s] > (1.0 - 2.0 * _ARMIJO_C * ls[1, s]) * ls[0, s]
               and ls[2, s] > floor * ls[3, s] and ls[1, s] > 2.0 ** -_MAX_HALVINGS)
        if bad and definite[s] < 0:
            definite[s] = 1 if _definite_site(a, s, chol) else 0
        fail[s] = bad and definite[s] == 1
        anyfail = anyfail or fail[s]
    return anyfail


@_jit
def _definite_site(a, s, chol):
    """Whether ``I − ½(a_k + a_kᵀ)`` (site ``s`` of the site-last ``a``) is positive definite (float64)."""
    m = chol.shape[0]
    for i in range(m):
        for j in range(m):
            chol[i, j] = (1.0 if i == j else 0.0) - 0.5 * (float(a[i, j, s]) + float(a[j, i, s]))
    return _cholesky_ok(chol)


@_jit
def _cholesky_ok(chol):
    """Cholesky-factorise the symmetric ``chol`` (M, M) in place (lower triangle); False if it is not
    positive definite."""
    m = chol.shape[0]
    for j in range(m):
        v = chol[j, j]
        for k in range(j):
            v -= chol[j, k] * chol[j, k]
        if not v > 0:
            return False
        v = np.sqrt(v)
        chol[j, j] = v
        for i in range(j + 1, m):
            w = chol[i, j]
            for k in range(j):
                w -= chol[i, k] * chol[j, k]
            chol[i, j] = w / v
    return True


@_jit
def _solve_sites(a, b):
    """Solve ``a[:, :, s] z = b[:, s]`` for every site ``s`` (see :func:`_eliminate`); ``a`` (M, M, S)
    is overwritten, ``b`` (M, S) becomes ``z``."""
    n_sites = a.shape[2]
    _eliminate(a, b, np.empty(n_sites, dtype=np.int64), np.empty(n_sites, dtype=a.dtype),
               np.empty(n_sites, dtype=a.dtype))


@_jit
def _eliminate(a, b, piv, best, fac):
    """Gaussian elimination with partial pivoting (as LAPACK's getrf) of every site's system at
    once: ``a`` (M, M, S) is overwritten, ``b`` (M, S) becomes the solution; ``piv``, ``best``,
    ``fac`` (S,) are scratch. Every loop runs over the sites innermost and the row swaps are
    selects, so the compiler vectorises them (site by site, with a branch per swap, it did not:
    benchmarks/online_fused.py).

    A zero pivot is handled as LAPACK's getf2 does (its column is not eliminated; back
    substitution then divides by zero), so a singular matrix gives the same inf/NaN pattern as
    ``torch.linalg.solve_ex``: ±inf where the right-hand side is non-zero, which the caller's
    box projection turns into a usable restart, NaN where it is 0/0."""
    m, _, n_sites = a.shape
    for c in range(m):
        for s in range(n_sites):  # pivot row of column c: the first largest |a[i, c]|, i ≥ c
            piv[s] = c
            best[s] = abs(a[c, c, s])
        for i in range(c + 1, m):
            for s in range(n_sites):
                v = abs(a[i, c, s])
                take = v > best[s]
                best[s] = v if take else best[s]
                piv[s] = i if take else piv[s]
        for i in range(c + 1, m):  # swap rows c and piv (a select per site)
            for j in range(c, m):
                for s in range(n_sites):
                    top = a[c, j, s]
                    other = a[i, j, s]
                    swap = piv[s] == i
                    a[c, j, s] = other if swap else top
                    a[i, j, s] = top if swap else other
            for s in range(n_sites):
                top = b[c, s]
                other = b[i, s]
                swap = piv[s] == i
                b[c, s] = other if swap else top
                b[i, s] = top if swap else other
        for i in range(c + 1, m):
            for s in range(n_sites):
                p = a[c, c, s]
                fac[s] = a[i, c, s] / p if p != 0 else p  # LAPACK skips a zero pivot's column
            for j in range(c + 1, m):
                for s in range(n_sites):
                    a[i, j, s] -= fac[s] * a[c, j, s]
            for s in range(n_sites):
                b[i, s] -= fac[s] * b[c, s]
    for c in range(m - 1, -1, -1):
        for j in range(c + 1, m):
            for s in range(n_sites):
                b[c, s] -= a[c, j, s] * b[j, s]
        for s in range(n_sites):
            b[c, s] = b[c, s] / a[c, c, s]


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


@_jit
def _train_online(x, order, w, ff_index, n_pixels, channels, lat, sign, tau, code, method, dts, tol, atol, cap,
                  cap_first, bound, big, rate_ff, rate_lat, learn, stop_on_divergence, carry_u, u, r, steps, status,
                  residual, n_evals):
    """Online learning, batch 1, in one call: for t = 0 … k−1 settle ``x[order[t]]`` (from u = 0, or
    from the carried state with ``carry_u``) with :func:`_settle_row`, then (``learn``, the input
    not diverged) apply ``W ← W + rate_ff (r xᵀ − W)``, ``L ← L + rate_lat (r rᵀ − L)`` (the
    formula of :func:`_hebbian_kernel`; lateral distance 0). Per-input numbers go into ``steps,
    status, residual, n_evals`` (k,); ``u``, ``r`` (1, N) get the last input's state and rates.

    ``W`` and ``L`` are copied once per call into site-last arrays (K, S) / (M, M, S) and back at
    the end, so that the drive, the blocks ``s·(L − I)`` and both updates are loops over the sites
    that the compiler vectorises; the gathered input (K, S) serves the drive and the update.
    Returns the number of inputs done: k, or (``stop_on_divergence``) the position of the first
    input that diverged (its numbers written, its update not applied)."""
    n_sites, m_per, kc = w.shape
    k_in = ff_index.shape[1]
    dtype = w.dtype
    zero = dtype.type(0)
    wt = np.empty((m_per, kc, n_sites), dtype=dtype)
    lt = np.empty((m_per, m_per, n_sites), dtype=dtype)
    gi = np.empty((kc, n_sites), dtype=np.int64)  # where each site's presynaptic value sits in xpad
    pad = channels * n_pixels
    for s in range(n_sites):
        for i in range(m_per):
            for j in range(kc):
                wt[i, j, s] = w[s, i, j]
            for j in range(m_per):
                lt[i, j, s] = lat[s, i, j]
        for k in range(k_in):
            p = ff_index[s, k]
            for g in range(channels):
                gi[k * channels + g, s] = g * n_pixels + p if p != n_pixels else pad
    xpad = np.zeros(pad + 1, dtype=dtype)
    xg = np.empty((kc, n_sites), dtype=dtype)
    work = _site_work(m_per, n_sites, dtype)
    a, row, d, box, us, rr, definite = work[0], work[1], work[2], work[3], work[4], work[6], work[17]
    for s in range(n_sites):
        for i in range(m_per):
            us[i, s] = u[0, s * m_per + i] if carry_u else zero
    done = order.shape[0]
    for t in range(order.shape[0]):
        xi = x[order[t]]
        for p in range(pad):
            xpad[p] = xi[p]
        for j in range(kc):
            for s in range(n_sites):
                xg[j, s] = xpad[gi[j, s]]
        for i in range(m_per):  # drive d = W x, the blocks s·(L − I) and the tanh box
            for s in range(n_sites):
                d[i, s] = zero
                row[i, s] = zero
            for j in range(kc):
                for s in range(n_sites):
                    d[i, s] += wt[i, j, s] * xg[j, s]
            for j in range(m_per):
                for s in range(n_sites):
                    v = dtype.type(sign) * (lt[i, j, s] - (1 if i == j else 0))
                    a[i, j, s] = v
                    row[i, s] += abs(v)
            for s in range(n_sites):
                box[i, s] = abs(d[i, s]) + row[i, s]
        definite[:] = -1  # the blocks changed with the last update
        if not carry_u:
            us[:, :] = zero
        n, code_t, res = _settle_row(work, tau, code, method, dts, tol, atol, cap, cap_first, bound, big)
        steps[t] = n
        status[t] = code_t
        residual[t] = res
        n_evals[t] = n + 1
        if code_t == _DIVERGED:
            if stop_on_divergence:
                done = t
                break
            continue
        if learn:
            for i in range(m_per):
                for j in range(kc):
                    for s in range(n_sites):
                        wt[i, j, s] += rate_ff * (rr[i, s] * xg[j, s] - wt[i, j, s])
                for j in range(m_per):
                    for s in range(n_sites):
                        lt[i, j, s] += rate_lat * (rr[i, s] * rr[j, s] - lt[i, j, s])
    if learn:
        for s in range(n_sites):
            for i in range(m_per):
                for j in range(kc):
                    w[s, i, j] = wt[i, j, s]
                for j in range(m_per):
                    lat[s, i, j] = lt[i, j, s]
    for s in range(n_sites):
        for i in range(m_per):
            u[0, s * m_per + i] = us[i, s]
            r[0, s * m_per + i] = rr[i, s]
    return done


def _activation_code(activation: str, dtype: torch.dtype) -> int:
    """The kernels' rate code: float32 tanh takes the vectorisable rational (code 3)."""
    code = ACTIVATION_CODES[activation]
    return 3 if code == 0 and dtype == torch.float32 else code


def _arrays(layer) -> tuple:
    """NumPy views (no copies) of the layer's weights and indices, cached until the weights are
    replaced (``.to()``, ``.double()``): ``(W, ff_index, pixels per channel, channels, L, lateral_index)``."""
    w, lat = layer.ff.weight, layer.lateral.weight
    key = (w.data_ptr(), lat.data_ptr(), w.dtype)
    cached = layer.__dict__.get("_compiled_arrays")
    if cached is None or cached[0] != key:
        c = layer.input_shape[0]
        views = (w.numpy(), layer.ff.index.numpy(), layer.input_size // c, c, lat.numpy(),
                 layer.lateral.index.numpy())
        layer.__dict__["_compiled_arrays"] = cached = (key, views)
    return cached[1]


def can_settle(system, x: torch.Tensor, u0) -> bool:
    """The kernels apply to ``system`` with these arguments (else :func:`dynsim.settle`'s torch loop
    runs, and raises its own errors for bad shapes or a non-finite ``u0``)."""
    if u0 is not None and not isinstance(u0, torch.Tensor):
        return False
    if not applies(system, *((x,) if u0 is None else (x, u0))):
        return False
    return inputs_fit(system, x, u0)


def inputs_fit(system, x: torch.Tensor, u0: torch.Tensor | None) -> bool:
    """``x`` is (B, system.input_size) and ``u0`` None or a finite (B, system.state_size) tensor."""
    if x.shape[1] != system.input_size or (u0 is not None and tuple(u0.shape) != (x.shape[0], system.state_size)):
        return False
    return u0 is None or bool(torch.isfinite(u0).all())


def settle_layer(layer, x: torch.Tensor, u0: torch.Tensor | None, *, method: str, tol: float | None,
                 cap: int | None, cap_first: bool, max_state_norm: float, picard_start: bool = True,
                 dts: np.ndarray | None = None, atol: float = 0.0):
    """Settle ``x`` (B, D_in) with the compiled loop (see module docstring).

    ``method``: ``"newton"`` (per-site Newton; ``picard_start`` as :class:`~dynsim.solvers.SiteNewton`)
    or ``"euler"`` (forward Euler, ``u ← u + dts[n]·F(u)``; ``dts`` holds at least ``cap`` step
    sizes). ``tol``/``atol``/``cap``: the stop rule's tolerances on the field residual
    (``‖F‖ < atol + tol‖u‖``) and step cap (``None``: absent; Euler needs a cap);
    ``cap_first``: the cap's status wins when both fire on the same step; ``max_state_norm``:
    ``settle``'s RMS divergence bound. Call it where :func:`can_settle` holds.
    Returns ``(u, r, steps, status, residual, n_evals)``.
    """
    loop = loop_arguments(layer, method=method, tol=tol, cap=cap, cap_first=cap_first, max_state_norm=max_state_norm,
                          picard_start=picard_start, dts=dts, atol=atol)
    w_np, ff_index, n_pixels, channels, lat_np, _ = _arrays(layer)
    xs = x.detach().contiguous().numpy()
    weights = (w_np, ff_index, n_pixels, channels, lat_np)
    outs = loop_outputs(x.shape[0], layer.state_size, layer.ff.weight.dtype, u0)
    arrays = [o.numpy() for o in outs]

    def rows(lo: int, hi: int) -> int:
        return _settle_kernel(xs[lo:hi], *weights, *loop, *(o[lo:hi] for o in arrays))

    return (*outs, in_threads(rows, x.shape[0]))


def loop_outputs(b: int, n: int, dtype: torch.dtype, u0: torch.Tensor | None) -> tuple:
    """The compiled loops' outputs, written in place: ``u`` (B, N) (zeros, or a copy of ``u0``),
    ``r`` (B, N), ``steps`` (B,) int64, ``status`` (B,) int8, ``residual`` (B,)."""
    u = torch.zeros(b, n, dtype=dtype) if u0 is None else u0.to(dtype).clone()
    return (u, torch.empty_like(u), torch.empty(b, dtype=torch.long), torch.empty(b, dtype=torch.int8),
            torch.empty(b, dtype=dtype))


def in_threads(rows, b: int) -> int:
    """``rows(lo, hi)`` (a kernel call on rows ``lo:hi`` that releases the GIL, returning its
    evaluation count) over a batch of ``b``: in this thread, or for large batches (evaluation) in
    ``torch.get_num_threads()`` contiguous slices on :func:`_pool`'s threads; the summed count."""
    threads = min(torch.get_num_threads(), b // PARALLEL_MIN_ROWS)
    if threads > 1:
        cut = [c * b // threads for c in range(threads + 1)]
        return int(sum(_pool(threads).map(rows, cut[:-1], cut[1:])))
    return int(rows(0, b))


_POOL: list = [None, 0]


def _pool(threads: int) -> ThreadPoolExecutor:
    """A process-wide pool of at least ``threads`` worker threads for :func:`settle_layer`."""
    with _POOL_LOCK:
        if _POOL[1] < threads:
            if _POOL[0] is not None:
                _POOL[0].shutdown(wait=False)
            _POOL[0], _POOL[1] = ThreadPoolExecutor(threads, thread_name_prefix="dynsim-settle"), threads
        return _POOL[0]


_POOL_LOCK = threading.Lock()


def loop_arguments(layer, *, method: str, tol: float | None, cap: int | None, cap_first: bool,
                   max_state_norm: float, picard_start: bool = True, dts: np.ndarray | None = None,
                   atol: float = 0.0) -> tuple:
    """The arguments of :func:`_settle_kernel` between the weights and the outputs (``sign`` …
    ``big``) for these settings (see :func:`settle_layer`); shared with the fused online loop
    (:mod:`dynsim.fused`), so both settle with the same method and stop rule."""
    code = method_code(method, "newton", picard_start=picard_start, activation=layer.activation, cap=cap, dts=dts)
    dtype = layer.ff.weight.dtype
    npt = np.float32 if dtype == torch.float32 else np.float64
    dts = np.zeros(1, dtype=npt) if dts is None else np.asarray(dts, dtype=npt)
    return (npt(layer.lateral_sign), float(layer.tau), _activation_code(layer.activation, dtype), code, dts,
            -1.0 if tol is None else float(tol), 0.0 if tol is None else float(atol),
            -1 if cap is None else int(cap), bool(cap_first), float(max_state_norm * math.sqrt(layer.state_size)),
            float(torch.finfo(dtype).max))


def method_code(method: str, newton: str, *, picard_start: bool, activation: str, cap: int | None,
                dts: np.ndarray | None) -> int:
    """The loops' method code: ``"euler"`` (needs a cap and ``cap`` step sizes) or the loop's Newton
    method named ``newton`` (with a Picard start for tanh when ``picard_start``)."""
    if method == "euler":
        if cap is None or dts is None or len(dts) < cap:
            raise ValueError("the compiled Euler loop needs a step cap and one step size per step")
        return METHOD_EULER
    if method == newton:
        return METHOD_PICARD_NEWTON if picard_start and activation == "tanh" else METHOD_NEWTON
    raise ValueError(f"unknown compiled method {method!r}")


def _site_newton(solver) -> dict:
    return {"method": "newton", "picard_start": solver.picard_start}


def kernel_settings(solver, limits: StopLimits | None, max_state_norm: float, newton=(SiteNewton, _site_newton)
                    ) -> dict | None:
    """The keyword settings of :func:`settle_layer` for ``solver`` and a stop rule's ``limits``, or
    ``None`` where the compiled loop does not implement them.

    It implements :class:`~dynsim.solvers.SiteNewton` (``newton``: the Newton solver class of a loop
    and its settings, ``solver -> dict``; :mod:`dynsim.compiled_deep` gives its block solver) and
    :class:`~dynsim.solvers.Euler` with a step cap (its step sizes ``dt_0 .. dt_{cap-1}`` tabulated
    once per schedule and cap), and a stop rule with limits on the field residual and a cap > 0."""
    if limits is None or limits.on != "field" or limits.cap == 0:
        return None
    kind = type(solver)
    if kind is Euler:
        if limits.cap is None or limits.cap > 10_000_000:
            return None
        extra = {"method": "euler", "dts": _step_sizes(solver.schedule, limits.cap)}
    elif kind is newton[0]:
        extra = newton[1](solver)
    else:
        return None
    return {"tol": limits.rtol, "atol": limits.atol, "cap": limits.cap, "cap_first": limits.cap_first,
            "max_state_norm": max_state_norm, **extra}


def settle_backend(system, x: torch.Tensor, u0: torch.Tensor | None, solver, limits: StopLimits | None,
                   max_state_norm: float):
    """:func:`dynsim.settle` on the compiled kernels, or ``None`` where they do not apply
    (:func:`kernel_settings`, :func:`can_settle`). Returns ``SettleResult``'s fields ``(u, r,
    steps, status, residual, n_evals)`` exactly as the torch loop would give them.
    """
    settings = kernel_settings(solver, limits, max_state_norm)
    if settings is None or not can_settle(system, x, u0):
        return None
    return settle_layer(system, x, u0, **settings)


_DTS_CACHE: dict = {}


def _step_sizes(schedule, cap: int) -> np.ndarray:
    """``[schedule(0), ..., schedule(cap − 1)]`` (float64), kept for the last few (schedule, cap) pairs."""
    try:
        key = (schedule, cap)
        hit = _DTS_CACHE.get(key)
    except TypeError:  # an unhashable user schedule: no cache
        return np.array([schedule(n) for n in range(cap)], dtype=np.float64)
    if hit is None:
        if len(_DTS_CACHE) >= 8:
            _DTS_CACHE.pop(next(iter(_DTS_CACHE)))
        hit = _DTS_CACHE[key] = np.array([schedule(n) for n in range(cap)], dtype=np.float64)
    return hit


def hebbian_update_online(layer, x: torch.Tensor, r: torch.Tensor, rate_ff: float, rate_lat: float) -> None:
    """In place: one sample's ``W ← W + rate_ff (r xᵀ − W)``, ``L ← L + rate_lat (r rᵀ − L)``.

    Shapes: x (1, D_in) or (D_in,), r (1, N) or (N,). Bumps the weights' version counters, as
    an in-place torch op would, so that caches keyed on them (Newton's lateral blocks) see the change."""
    w_np, ff_index, n_pixels, channels, lat_np, lat_index = _arrays(layer)
    npt = w_np.dtype.type
    _hebbian_kernel(x.reshape(-1).contiguous().numpy(), r.reshape(-1).contiguous().numpy(), w_np, ff_index,
                    n_pixels, channels, lat_np, lat_index, npt(rate_ff), npt(rate_lat))
    torch.autograd.graph.increment_version((layer.ff.weight, layer.lateral.weight))
