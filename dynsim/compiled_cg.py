"""Compiled (numba) Newton–CG settle for large NpS: every site's Newton solve done in cache.

A backend of :func:`dynsim.settle` for :class:`~dynsim.solvers.SiteNewtonCG` (chosen by
:mod:`dynsim.backend`): the same iteration as the torch step :func:`~dynsim.solvers.newton_cg.newton_cg_step`,
the same loop as :func:`dynsim.compiled._settle_row` (the residual ``‖F(u)‖/‖u‖`` tested first,
then a Picard start or a Newton step, NaN → 0 and the tanh box, the per-site line search of
:func:`dynsim.solvers.newton.line_search`, divergence), the same stop rules,
:class:`~dynsim.stopping.Status` codes and step counts.

Why a second kernel layout. :mod:`dynsim.compiled` keeps its arrays *site-last* ((M, M, S)), so
that the per-site M × M elimination vectorises over the S sites; that pays off up to NpS 32. At
NpS 64–100 the per-site systems are solved by conjugate gradients, and what costs is reading the
lateral blocks ``L_k`` (S·M² numbers: 7.8 MB in float32 at NpS 100, beyond the 2 MB L2 cache):
the torch path (one batched product over all sites per CG iteration) reads all of them from
memory once per CG iteration, i.e. ~15–25 times per image at batch 1. Here the arrays are
*site-first*, the layer's own layout (``W`` (S, M, K), ``L`` (S, M, M), no copies), and one
Newton step visits the sites one by one: site ``k``'s block (40 KB at NpS 100) is read from
memory once and stays in cache for its CG iterations, the step ``z``, the new field
``F_k(u_next)`` and the next step's right-hand side. Per Newton step that is one pass over ``L``
instead of one per CG iteration. With tanh (``0 ≤ f' ≤ 1``) and ``s = −1`` the site systems are
``K_k v = −h G_k``, ``K_k = I − h a_k h = (I − D_k) + h L_k h`` with ``h = D_k^{1/2}``, ``a_k = s(L_k − I)``
(positive definite for positive definite ``L_k``; :mod:`dynsim.solvers.newton_cg`).

The CG tolerance is the one of the torch step: each site reaches its equal share of the sample's
budget, ``‖r_k‖² ≤ η² ‖b‖² / S`` with ``b = −h G`` over all sites and ``η = min(forcing,
max(‖G‖/‖u‖, 50 ε, ½·T/ρ))`` (``ρ`` the relative field residual, ``T`` the stop threshold; so the
sample's ``‖r‖ ≤ η‖b‖``), and the line search is the torch step's (the energy ``Φ_k`` or
``½‖F_k‖²``, :func:`dynsim.solvers.newton.energy_line_search`); a site that meets ``pᵀKp ≤ 0`` or does not
reach its share within ``max_cg`` iterations takes the exact Newton step (Gaussian elimination
with partial pivoting of ``J_k = −I + a_k D_k``), as in the torch step.

It applies to a site-separable :class:`~dynsim.systems.HebbianLayer` on CPU in float32/float64
with symmetric lateral blocks (checked in the kernel's first pass over ``L``; the Hebbian rule
keeps ``L`` exactly symmetric), lateral distance 0, a stop rule with limits on the field
residual; for any NpS (the torch step remains the definition, the GPU path and the fallback).

Threads (``torch.get_num_threads()``, the ``--threads`` setting). Batches of ≥
2·``PARALLEL_MIN_ROWS`` rows (evaluation) are split into slices of rows on Python threads, as
:func:`dynsim.compiled.settle_layer`. Smaller batches (online training settles one image at a
time) split each pass over the sites instead: the sites are dealt to the threads in runs of
:data:`_RUN` (``numba.prange``, numba's threading layer), each thread with its own CG scratch, and
the per-site norms are summed in site order afterwards, so any thread count gives the same bits
(tests). Timings: ``benchmarks/nps100.py``, benchmarks/README.md.
"""

from __future__ import annotations

import numpy as np
import torch

from dynsim import compiled
from dynsim.compiled import (
    _ARMIJO_C,
    _DIVERGED,
    _MAX_HALVINGS,
    _MAX_STEPS,
    _SEARCH_AFTER,
    _SETTLED,
    _cholesky_ok,
    _drive_sites,
    _jit,
    _rate,
    _slope,
    prange,
)

_BLOCKS, _FIELD, _STEP = 0, 1, 2  # the passes of _sites_pass
_RUN = 8  # sites per run in a chunk of sites (_sites_pass): 8 float64 per-site numbers fill a cache line


def applies(layer, *tensors: torch.Tensor) -> bool:
    """The kernel handles ``layer`` (site-separable, lateral distance 0, any NpS) with these tensors
    (CPU, float32/float64, one dtype, no grad); it also needs symmetric blocks, which it checks itself."""
    if not compiled.available() or not getattr(layer, "site_separable", False):
        return False
    lat = layer.lateral.weight
    if lat.shape[-1] != layer.nps:  # lateral distance 0: one (M, M) block per site
        return False
    dtype = layer.ff.weight.dtype
    if dtype not in (torch.float32, torch.float64):
        return False
    for t in (layer.ff.weight, lat, *tensors):
        if t.dtype != dtype or t.device.type != "cpu" or t.requires_grad:
            return False
    return True  # the kernel checks that L is symmetric (else the torch path runs)


@_jit
def _matvec(lat_s, x, out):
    """``out = L_k x`` for one site's symmetric (M, M) block (the kernel checks the symmetry before
    any product), as ``Σ_j x_j L_k[j, :]``: four rows of the block per pass over ``out``, so that
    the loop over ``out`` vectorises without horizontal sums (the rate against the dot-product
    form: ``benchmarks/matvec_forms.py``)."""
    m = x.shape[0]
    j = 0
    if m >= 4:
        x0, x1, x2, x3 = x[0], x[1], x[2], x[3]
        for i in range(m):
            out[i] = x0 * lat_s[0, i] + x1 * lat_s[1, i] + x2 * lat_s[2, i] + x3 * lat_s[3, i]
        j = 4
    else:
        for i in range(m):
            out[i] = 0
    while j + 4 <= m:
        x0, x1, x2, x3 = x[j], x[j + 1], x[j + 2], x[j + 3]
        for i in range(m):
            out[i] += x0 * lat_s[j, i] + x1 * lat_s[j + 1, i] + x2 * lat_s[j + 2, i] + x3 * lat_s[j + 3, i]
        j += 4
    while j < m:
        xj = x[j]
        for i in range(m):
            out[i] += xj * lat_s[j, i]
        j += 1


@_jit
def _site_field(lat_s, sign, d_s, u_s, r_s, f_s, code, energy, eps16, phi_s):
    """One site: ``r = f(u)``, ``τF = d − u + s·(L_k r − r)``; returns ``(‖τF_k‖², ‖u_k‖², ‖h τF_k‖²)``
    and, with ``energy``, writes ``(Φ_k, its rounding scale)`` into ``phi_s`` (2,), as
    :func:`dynsim.solvers.newton.site_energy`."""
    m = d_s.shape[0]
    one = d_s.dtype.type(1)
    tiny = d_s.dtype.type(np.finfo(d_s.dtype).tiny)
    for j in range(m):
        r_s[j] = _rate(u_s[j], code)
    _matvec(lat_s, r_s, f_s)
    f2 = 0.0
    u2 = 0.0
    b2 = 0.0
    phi = 0.0
    scale = 0.0
    for i in range(m):
        v = d_s[i] - u_s[i] + sign * (f_s[i] - r_s[i])
        f_s[i] = v
        fp = max(float(_slope(u_s[i], r_s[i], code)), 0.0)
        f2 += float(v) * float(v)
        u2 += float(u_s[i]) * float(u_s[i])
        b2 += fp * float(v) * float(v)
        if energy:  # the entropy in the working precision (log1p would cost 5× more here), branch-free
            up = one + r_s[i]
            dn = one - r_s[i]
            ent = up * np.log(max(up, tiny)) + dn * np.log(max(dn, tiny))  # 0·ln 0 = 0 where tanh saturates
            ri = float(r_s[i])
            gi = float(v)
            phi += 0.5 * float(ent) - 0.5 * ri * (gi + float(u_s[i]) + float(d_s[i]))
            scale += abs(ri) * (abs(float(u_s[i])) + abs(float(d_s[i])) + abs(gi))
    if energy:
        phi_s[0] = phi
        phi_s[1] = eps16 * scale
    return f2, u2, b2


@_jit
def _k_times(lat_s, sign, h, p, hp, q):
    """``q = K p = p − h ∘ (s·(L_k − I)(h ∘ p))`` for one site."""
    m = p.shape[0]
    for j in range(m):
        hp[j] = h[j] * p[j]
    _matvec(lat_s, hp, q)
    for i in range(m):
        q[i] = p[i] - h[i] * (sign * (q[i] - hp[i]))


@_jit
def _site_cg(lat_s, sign, h, b, share, max_cg, v, res, p, hp, q):
    """CG on ``K v = b`` (one site) from v = 0 until ``‖b − Kv‖² ≤ share``; returns False where it met
    ``pᵀKp ≤ 0`` or ran ``max_cg`` iterations short of the share."""
    m = b.shape[0]
    rr = 0.0
    for i in range(m):
        v[i] = 0
        res[i] = b[i]
        p[i] = b[i]
        rr += float(b[i]) * float(b[i])
    it = 0
    while rr > share:
        if it >= max_cg:
            return False
        _k_times(lat_s, sign, h, p, hp, q)
        pq = 0.0
        for i in range(m):
            pq += float(p[i]) * float(q[i])
        if not pq > 0:
            return False
        alpha = rr / pq
        rr_new = 0.0
        for i in range(m):
            v[i] += alpha * p[i]
            res[i] -= alpha * q[i]
            rr_new += float(res[i]) * float(res[i])
        beta = rr_new / rr
        for i in range(m):
            p[i] = res[i] + beta * p[i]
        rr = rr_new
        it += 1
    return True


@_jit
def _exact_site_step(lat_s, sign, fp, g, jac, z):
    """``z = J_k⁻¹ g`` with ``J_k = −I + s·(L_k − I) diag(fp)`` (Gaussian elimination with partial
    pivoting, as LAPACK's getrf; a zero pivot divides by zero, as there)."""
    m = g.shape[0]
    for i in range(m):
        z[i] = g[i]
        for j in range(m):
            jac[i, j] = sign * (lat_s[i, j] - (1 if i == j else 0)) * fp[j] - (1 if i == j else 0)
    for c in range(m):
        piv = c
        best = abs(jac[c, c])
        for i in range(c + 1, m):
            if abs(jac[i, c]) > best:
                best = abs(jac[i, c])
                piv = i
        if piv != c:
            for j in range(m):
                t = jac[c, j]
                jac[c, j] = jac[piv, j]
                jac[piv, j] = t
            t = z[c]
            z[c] = z[piv]
            z[piv] = t
        pv = jac[c, c]
        for i in range(c + 1, m):
            fac = jac[i, c] / pv if pv != 0 else pv
            for j in range(c + 1, m):
                jac[i, j] -= fac * jac[c, j]
            z[i] -= fac * z[c]
    for c in range(m - 1, -1, -1):
        acc = z[c]
        for j in range(c + 1, m):
            acc -= jac[c, j] * z[j]
        z[c] = acc / jac[c, c]


@_jit
def _block_sums(lat_s, sign, row_s):
    """``row_s[i] = Σ_j |s·(L_kij − δ_ij)|`` for one site's block (rows read contiguously, so
    the sums vectorise); returns whether the block is symmetric (each pair compared once)."""
    m = row_s.shape[0]
    for i in range(m):
        acc = row_s.dtype.type(0)
        for j in range(m):
            acc += abs(lat_s[i, j])
        row_s[i] = abs(sign) * (acc - abs(lat_s[i, i]) + abs(lat_s[i, i] - 1))
    symmetric = True
    for i in range(m):
        for j in range(i + 1, m):
            symmetric &= lat_s[i, j] == lat_s[j, i]
    return symmetric


@_jit
def _sites_pass(start, stride, mode, newton, checked, lat, sign, d, box, row, us, un, rs, rn, fs, fn, code, big, share,
                max_cg, energy, eps16, scratch, jac, chol, u0, p0, ls, definite, phic, phin, sums):
    """Sites in runs ``start, start + stride, …`` of :data:`_RUN` sites (run ``j``: sites
    ``_RUN·j … _RUN·j + _RUN − 1``) of one pass of :func:`_settle_row_cg`. ``mode``
    :data:`_BLOCKS`: each block's row sums ``row[k, i] = Σ_j |s·(L_kij − δ_ij)|`` and
    ``sums[0, k] = 0`` where ``L_k`` is symmetric (1 where not); :data:`_FIELD`: the box
    ``|d_k| + row_k`` and the field at ``us`` (into ``rs``, ``fs``, ``phic``); :data:`_STEP`: one
    step from ``us`` to ``un`` (a Picard step, a Newton step or the line search's step back) and
    the field there (``rn``, ``fn``, ``phin``). The field passes write each site's ``(‖τF_k‖²,
    ‖u_k‖², ‖h τF_k‖²)`` into ``sums[:, k]``; ``scratch``, ``jac`` and ``chol`` are this call's own."""
    m = d.shape[1]
    dt = d.dtype.type
    zero = dt(0)
    h, b, v, res, p, hp, q, z, fpv = (scratch[0], scratch[1], scratch[2], scratch[3], scratch[4], scratch[5],
                                      scratch[6], scratch[7], scratch[8])
    floor_ls = (16.0 * float(np.finfo(d.dtype).eps)) ** 2  # the line search's rounding level
    n_sites = d.shape[0]
    for run in range(start * _RUN, n_sites, stride * _RUN):  # runs of _RUN sites: few cache lines shared
        for s in range(run, min(run + _RUN, n_sites)):
            lat_s = lat[s]
            if mode == _BLOCKS:
                sums[0, s] = 0.0 if _block_sums(lat_s, sign, row[s]) else 1.0
                sums[1, s] = 0.0
                sums[2, s] = 0.0
                continue
            if mode == _FIELD:
                for i in range(m):
                    box[s, i] = abs(d[s, i]) + row[s, i]
                a1, a2, a3 = _site_field(lat_s, sign, d[s], us[s], rs[s], fs[s], code, energy, eps16, phic[s])
                sums[0, s] = a1
                sums[1, s] = a2
                sums[2, s] = a3
                continue
            back = False
            if newton and checked and energy:  # the late Armijo test on the energy
                back = (phic[s, 0] > ls[0, s] + _ARMIJO_C * ls[1, s] * ls[2, s] + phic[s, 1] and ls[2, s] < 0
                        and ls[1, s] > 2.0 ** -_MAX_HALVINGS)
            elif newton and checked:  # the late Armijo test of the step that led to us
                g2 = 0.0
                q2 = 1.0
                for i in range(m):
                    g2 += float(fs[s, i]) * float(fs[s, i])
                    q2 += float(us[s, i]) * float(us[s, i])
                back = (g2 > (1.0 - 2.0 * _ARMIJO_C * ls[1, s]) * ls[0, s] and g2 > floor_ls * q2
                        and ls[1, s] > 2.0 ** -_MAX_HALVINGS)
            if newton and checked:
                if back and definite[s] < 0:  # only I − s·(L_k − I) ≻ 0 guarantees the search
                    for i in range(m):
                        for j in range(m):
                            eye = 1.0 if i == j else 0.0
                            chol[i, j] = eye - float(sign) * (float(lat_s[i, j]) - eye)
                    definite[s] = 1 if _cholesky_ok(chol) else 0
                back = back and definite[s] == 1
            if back:  # go back to u0 + (α/2) p0
                ls[1, s] *= 0.5
                for i in range(m):
                    un[s, i] = u0[s, i] + dt(ls[1, s]) * p0[s, i]
            elif newton:  # z = J⁻¹ τF: CG on K v = −h τF, z = a h v − τF
                for i in range(m):
                    fpv[i] = _slope(us[s, i], rs[s, i], code)
                    h[i] = np.sqrt(max(fpv[i], zero))
                    b[i] = -h[i] * fs[s, i]
                rr0 = 0.0
                for i in range(m):
                    rr0 += float(b[i]) * float(b[i])
                if _site_cg(lat_s, sign, h, b, share, max_cg, v, res, p, hp, q):
                    for j in range(m):
                        hp[j] = h[j] * v[j]
                    _matvec(lat_s, hp, z)
                    for i in range(m):
                        z[i] = sign * (z[i] - hp[i]) - fs[s, i]
                else:
                    _exact_site_step(lat_s, sign, fpv, fs[s], jac, z)
                for i in range(m):
                    w = us[s, i] - z[i]
                    w = zero if np.isnan(w) else min(max(w, -big), big)  # as torch.nan_to_num
                    if code == 0 or code == 3:  # tanh: the box that holds every fixed point
                        w = min(max(w, -box[s, i]), box[s, i])
                    un[s, i] = w
                g2 = 0.0
                slope = 0.0
                for i in range(m):  # the step to check next time
                    u0[s, i] = us[s, i]
                    p0[s, i] = un[s, i] - us[s, i]
                    g2 += float(fs[s, i]) * float(fs[s, i])
                    if energy:
                        ri = float(rs[s, i])
                        slope -= (1.0 - ri * ri) * float(fs[s, i]) * float(p0[s, i])
                if energy:  # every step is a descent direction of Φ_k: all are checked
                    ls[0, s] = phic[s, 0]
                    ls[1, s] = 1.0
                    ls[2, s] = slope
                else:
                    ls[0, s] = g2
                    ls[1, s] = 0.0 if rr0 <= share else 1.0  # within its share: z = −τF, not checked
            else:  # Picard start: u1 = u0 + τF(u0)
                for i in range(m):
                    un[s, i] = us[s, i] + fs[s, i]
            a1, a2, a3 = _site_field(lat_s, sign, d[s], un[s], rn[s], fn[s], code, energy, eps16, phin[s])
            sums[0, s] = a1
            sums[1, s] = a2
            sums[2, s] = a3


@_jit
def _sites_serial(chunks, mode, newton, checked, lat, sign, d, box, row, us, un, rs, rn, fs, fn, code, big, share,
                  max_cg, energy, eps16, scratch, jac, chol, u0, p0, ls, definite, phic, phin, sums):
    """One pass of :func:`_sites_pass` over all sites in ``chunks`` interleaved sets (chunk ``c``:
    sites ``c, c + chunks, …``, with ``scratch[c]``, ``jac[c]``, ``chol[c]``), in this thread."""
    for c in range(chunks):
        _sites_pass(c, chunks, mode, newton, checked, lat, sign, d, box, row,
                    us, un, rs, rn, fs, fn, code, big, share, max_cg, energy, eps16, scratch[c], jac[c], chol[c],
                    u0, p0, ls, definite, phic, phin, sums)


@compiled._jit_parallel
def _sites_parallel(chunks, mode, newton, checked, lat, sign, d, box, row, us, un, rs, rn, fs, fn, code, big, share,
                    max_cg, energy, eps16, scratch, jac, chol, u0, p0, ls, definite, phic, phin, sums):
    """:func:`_sites_serial` with the chunks on numba's threads (a separate function, not the same
    one compiled twice: numba's cache would not tell the two apart). Every site's numbers depend on
    that site only, so both give the same bits."""
    for c in prange(chunks):
        _sites_pass(c, chunks, mode, newton, checked, lat, sign, d, box, row,
                    us, un, rs, rn, fs, fn, code, big, share, max_cg, energy, eps16, scratch[c], jac[c], chol[c],
                    u0, p0, ls, definite, phic, phin, sums)


@_jit
def _sites(chunks, mode, newton, checked, lat, sign, d, box, row, us, un, rs, rn, fs, fn, code, big, share, max_cg,
           energy, eps16, scratch, jac, chol, u0, p0, ls, definite, phic, phin, sums):
    """One pass over the sites (:func:`_sites_serial`), on ``chunks`` threads where ``chunks > 1``;
    returns ``(‖τF‖², ‖u‖², ‖h τF‖²)`` summed in site order (the same bits for any ``chunks``)."""
    if chunks > 1:
        _sites_parallel(chunks, mode, newton, checked, lat, sign, d, box, row, us, un, rs, rn, fs, fn, code, big, share,
                        max_cg, energy, eps16, scratch, jac, chol, u0, p0, ls, definite, phic, phin, sums)
    else:
        _sites_serial(1, mode, newton, checked, lat, sign, d, box, row, us, un, rs, rn, fs, fn, code, big,
                      share, max_cg, energy, eps16, scratch, jac, chol, u0, p0, ls, definite, phic, phin, sums)
    f2 = 0.0
    u2 = 0.0
    b2 = 0.0
    for s in range(d.shape[0]):
        f2 += sums[0, s]
        u2 += sums[1, s]
        b2 += sums[2, s]
    return f2, u2, b2


@_jit
def _settle_row_cg(lat, sign, d, box, row, us, un, rs, rn, fs, fn, tau, code, picard, tol, atol, cap, cap_first, bound,
                   big, forcing, floor, max_cg, chunks, scratch, jac, u0, p0, ls, definite, chol, energy,
                   search_after, eps16, phic, phin, sums):
    """Settle one input (site-first arrays (S, M): drive ``d``, box ``box`` (written here from the
    blocks' row sums ``row``), state ``us``) with
    Newton–CG; the loop of :func:`dynsim.compiled._settle_row`. Returns ``(steps, status,
    residual)``; ``us`` holds the returned state and ``rs`` its rates. Each pass over the sites
    (:func:`_sites`) runs in ``chunks`` ranges of sites (``scratch`` (C, 9, M), ``jac``, ``chol``
    (C, M, M): each chunk's own), on as many threads where ``chunks > 1``. With the late Armijo test of
    :func:`dynsim.solvers.newton.line_search` per site: ``u0``, ``p0`` (S, M) the checked step's
    start and direction, ``ls`` (3, S) its merit (``‖τF_k(u0)‖²``, or with ``energy`` ``Φ_k(u0)``),
    α and ``∇Φ_kᵀp`` (:func:`dynsim.solvers.newton.energy_line_search`), ``definite`` (S,) whether
    ``I − s·(L_k − I) ≻ 0`` (−1: not checked yet; ``chol`` float64); the test runs
    from step ``search_after`` on; ``phic``/``phin`` (S, 2) ``Φ_k`` and its rounding scale at the
    current/next state; ``sums`` (3, S) the sites' squared norms. CG stops at
    :func:`dynsim.solvers.newton_cg.newton_cg_step`'s ``η``."""
    n_sites = d.shape[0]
    f2, u2, b2 = _sites(chunks, _FIELD, False, False, lat, sign, d, box, row, us, un, rs, rn, fs, fn, code, big,
                        0.0, max_cg, energy, eps16, scratch, jac, chol, u0, p0, ls, definite, phic, phin, sums)
    checked = False  # a Newton step led here (the line search)
    n = 0
    while True:
        u_norm = max(np.sqrt(u2), 1e-12)
        res_n = np.sqrt(f2) / tau / u_norm
        settled = res_n < tol + atol / u_norm  # ‖F‖ < atol + tol‖u‖ (stopping.StopLimits)
        capped = cap >= 0 and n >= cap
        if settled or capped:
            return n, (_MAX_STEPS if capped and (cap_first or not settled) else _SETTLED), res_n
        eta = max(np.sqrt(f2) / u_norm, floor)
        if tol > 0 and res_n > 0:  # no more accuracy than reaching tol needs (oversolving)
            eta = max(eta, 0.5 * tol / res_n)
        eta = min(eta, forcing)
        share = eta * eta * b2 / n_sites
        newton = not (n == 0 and picard)
        f2n, u2n, b2n = _sites(chunks, _STEP, newton, checked, lat, sign, d, box, row, us, un, rs, rn, fs, fn, code,
                               big, share, max_cg, energy, eps16, scratch, jac, chol, u0, p0, ls, definite, phic, phin,
                               sums)
        # divergence: a non-finite residual or state, or a state norm above the bound
        if not (np.isfinite(res_n) and np.isfinite(u2n)) or np.sqrt(u2n) > bound:
            return n, _DIVERGED, res_n
        us[:, :] = un
        rs[:, :] = rn
        fs[:, :] = fn
        phic[:, :] = phin
        f2, u2, b2 = f2n, u2n, b2n
        checked = newton and n >= search_after  # the residual's line search starts late (SEARCH_AFTER)
        n += 1


@_jit
def _settle_kernel_cg(x, w, ff_index, n_pixels, channels, lat, sign, tau, code, picard, tol, atol, cap, cap_first,
                      bound, big, forcing, floor, max_cg, energy, search_after, chunks, u, r, steps, status, residual):
    """Settle every row of ``x`` (B, D_in) in place into u, r (B, N), steps, status, residual (B,),
    each row's passes over the sites in ``chunks`` ranges (on as many threads where ``chunks > 1``);
    returns the field evaluations (one per step and sample, plus the first), or −1 (nothing
    written) if a lateral block is not symmetric."""
    n_sites, m, kc = w.shape
    dtype = w.dtype
    row = np.empty((n_sites, m), dtype=dtype)  # Σ_j |s·A_kij|
    d = np.empty((n_sites, m), dtype=dtype)
    box = np.empty((n_sites, m), dtype=dtype)
    un = np.empty((n_sites, m), dtype=dtype)
    rn = np.empty((n_sites, m), dtype=dtype)
    fs = np.empty((n_sites, m), dtype=dtype)
    fn = np.empty((n_sites, m), dtype=dtype)
    scratch = np.empty((chunks, 9, m), dtype=dtype)
    jac = np.empty((chunks, m, m), dtype=dtype)
    u0 = np.empty((n_sites, m), dtype=dtype)  # the line search's state (_settle_row_cg)
    p0 = np.empty((n_sites, m), dtype=dtype)
    ls = np.empty((3, n_sites), dtype=np.float64)
    phic = np.zeros((n_sites, 2), dtype=np.float64)
    phin = np.zeros((n_sites, 2), dtype=np.float64)
    eps16 = 16.0 * float(np.finfo(dtype).eps)
    definite = np.full(n_sites, -1, dtype=np.int8)
    chol = np.empty((chunks, m, m), dtype=np.float64)
    sums = np.empty((3, n_sites), dtype=np.float64)
    xg = np.empty(kc, dtype=dtype)
    asymmetric, _, _ = _sites(chunks, _BLOCKS, False, False, lat, dtype.type(sign), d, box, row, un, un, rn, rn, fs,
                              fn, code, 0.0, 0.0, max_cg, energy, eps16, scratch, jac, chol, u0, p0, ls, definite,
                              phic, phin, sums)
    if asymmetric > 0:
        return -1
    n_evals = 0
    for bi in range(x.shape[0]):
        xb = x[bi]
        _drive_sites(xb, w, ff_index, n_pixels, channels, xg, d.T)  # d = W x, written site-major through d.T
        us = u[bi].reshape(n_sites, m)  # views: the state is site-major
        rs = r[bi].reshape(n_sites, m)
        nb, code_b, res = _settle_row_cg(lat, dtype.type(sign), d, box, row, us, un, rs, rn, fs, fn, tau, code, picard,
                                         tol, atol, cap, cap_first, bound, big, forcing, floor, max_cg, chunks, scratch,
                                         jac, u0, p0, ls, definite, chol, energy, search_after, eps16, phic, phin,
                                         sums)
        steps[bi] = nb
        status[bi] = code_b
        residual[bi] = res
        n_evals += nb + 1
    return n_evals


def kernel_settings(solver, limits, max_state_norm: float) -> dict | None:
    """The settings of :func:`settle_layer` for a :class:`~dynsim.solvers.SiteNewtonCG` and a stop
    rule's ``limits``, or ``None`` where this kernel does not implement them."""
    from dynsim.solvers import SiteNewtonCG

    if type(solver) is not SiteNewtonCG or limits is None or limits.on != "field" or limits.cap == 0:
        return None
    return {"tol": limits.rtol, "atol": limits.atol, "cap": limits.cap, "cap_first": limits.cap_first,
            "max_state_norm": max_state_norm, "picard_start": solver.picard_start, "forcing": solver.forcing,
            "max_cg": solver.max_cg, "merit": solver.merit}


def site_threads() -> int:
    """The threads a small batch's rows split their sites over: ``torch.get_num_threads()`` (the
    ``--threads`` setting), at most numba's; sets numba's thread count (for this thread) to it."""
    n = max(1, min(torch.get_num_threads(), compiled.numba.config.NUMBA_NUM_THREADS))
    if n > 1:
        compiled.numba.set_num_threads(n)
    return n


def settle_layer(layer, x: torch.Tensor, u0: torch.Tensor | None, *, tol: float | None, atol: float,
                 cap: int | None, cap_first: bool, max_state_norm: float, picard_start: bool, forcing: float,
                 max_cg: int, merit: str = "energy"):
    """Settle ``x`` (B, D_in) with the compiled Newton–CG loop; returns ``(u, r, steps, status,
    residual, n_evals)`` as :func:`dynsim.compiled.settle_layer`, or ``None`` if a lateral block
    is not symmetric."""
    w_np, ff_index, n_pixels, channels, lat_np, _ = compiled._arrays(layer)
    dtype = layer.ff.weight.dtype
    npt = w_np.dtype.type
    loop = (npt(layer.lateral_sign), float(layer.tau), compiled._activation_code(layer.activation, dtype),
            bool(picard_start and layer.activation == "tanh"), -1.0 if tol is None else float(tol),
            0.0 if tol is None else float(atol), -1 if cap is None else int(cap), bool(cap_first),
            float(max_state_norm * np.sqrt(layer.state_size)), float(torch.finfo(dtype).max), float(forcing),
            float(50 * torch.finfo(dtype).eps), int(max_cg or layer.nps))
    energy = merit == "energy" and layer.activation == "tanh"  # as SiteNewtonCG.step
    loop = (*loop, energy, 0 if energy else _SEARCH_AFTER)
    b = x.shape[0]
    u = torch.zeros(b, layer.state_size, dtype=dtype) if u0 is None else u0.clone()
    r = torch.empty_like(u)
    steps = torch.empty(b, dtype=torch.long)
    status = torch.empty(b, dtype=torch.int8)
    residual = torch.empty(b, dtype=dtype)
    xs = x.detach().contiguous().numpy()
    outs = (u.numpy(), r.numpy(), steps.numpy(), status.numpy(), residual.numpy())

    threads = min(torch.get_num_threads(), b // compiled.PARALLEL_MIN_ROWS)
    chunks = 1 if threads > 1 else site_threads()  # rows on Python threads, or each row's sites on numba's

    def rows(lo: int, hi: int) -> int:
        return _settle_kernel_cg(xs[lo:hi], w_np, ff_index, n_pixels, channels, lat_np, *loop, chunks,
                                 *(o[lo:hi] for o in outs))

    torch_threads = torch.get_num_threads()
    if threads > 1:
        cut = [c * b // threads for c in range(threads + 1)]
        counts = list(compiled._pool(threads).map(rows, cut[:-1], cut[1:]))
    else:
        counts = [rows(0, b)]
    if torch.get_num_threads() != torch_threads:  # numba's thread launch (at the first call) can set
        torch.set_num_threads(torch_threads)  # OpenMP's count, which torch reads as its own: keep --threads
    if min(counts) < 0:  # a non-symmetric block: CG does not apply (the torch step takes exact steps)
        return None
    return u, r, steps, status, residual, int(sum(counts))


def settle_backend(system, x: torch.Tensor, u0: torch.Tensor | None, solver, limits, max_state_norm: float):
    """:func:`dynsim.settle` on this kernel, or ``None`` where it does not apply."""
    settings = kernel_settings(solver, limits, max_state_norm)
    if settings is None:
        return None
    if u0 is not None and (not isinstance(u0, torch.Tensor) or tuple(u0.shape) != (x.shape[0], system.state_size)
                           or not bool(torch.isfinite(u0).all())):
        return None
    if not applies(system, *((x,) if u0 is None else (x, u0))) or x.shape[1] != system.input_size:
        return None
    return settle_layer(system, x, u0, **settings)
