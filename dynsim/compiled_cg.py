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

Pairs. A batch settles :data:`GROUP` (2) inputs at a time, each with its own Newton loop and stop
test, in shared passes over the sites: where both take a Newton step on a site, their CG
iterations run in lockstep and each product with ``L_k`` reads the block once for both
(:func:`_site_cg2`, :func:`_matvec2`; ``benchmarks/matvec_forms.py`` measures the product), with
the same bits as one input at a time (tests; this rests on the compiler rounding ``_matvec2``'s
expressions as ``_matvec``'s, which the tests check on the machine they run on).

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

GROUP = 2  # inputs settled together, their CG in lockstep per site (_settle_group_cg; 2: _site_cg2)
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
def _matvec2(lat_s, x, out, y, out2):
    """``out = L_k x`` and ``out2 = L_k y`` in one pass over the block (each entry loaded once for
    both products), each computed as :func:`_matvec` computes it."""
    m = x.shape[0]
    j = 0
    if m >= 4:
        x0, x1, x2, x3 = x[0], x[1], x[2], x[3]
        y0, y1, y2, y3 = y[0], y[1], y[2], y[3]
        for i in range(m):
            l0, l1, l2, l3 = lat_s[0, i], lat_s[1, i], lat_s[2, i], lat_s[3, i]
            out[i] = x0 * l0 + x1 * l1 + x2 * l2 + x3 * l3
            out2[i] = y0 * l0 + y1 * l1 + y2 * l2 + y3 * l3
        j = 4
    else:
        for i in range(m):
            out[i] = 0
            out2[i] = 0
    while j + 4 <= m:
        x0, x1, x2, x3 = x[j], x[j + 1], x[j + 2], x[j + 3]
        y0, y1, y2, y3 = y[j], y[j + 1], y[j + 2], y[j + 3]
        for i in range(m):
            l0, l1, l2, l3 = lat_s[j, i], lat_s[j + 1, i], lat_s[j + 2, i], lat_s[j + 3, i]
            out[i] += x0 * l0 + x1 * l1 + x2 * l2 + x3 * l3
            out2[i] += y0 * l0 + y1 * l1 + y2 * l2 + y3 * l3
        j += 4
    while j < m:
        for i in range(m):
            out[i] += x[j] * lat_s[j, i]
            out2[i] += y[j] * lat_s[j, i]
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
def _k_times2(lat_s, sign, h, p, hp, q, h2, p2, hp2, q2):
    """:func:`_k_times` for two systems of the same site (two images), one pass over the block."""
    m = p.shape[0]
    for j in range(m):
        hp[j] = h[j] * p[j]
        hp2[j] = h2[j] * p2[j]
    _matvec2(lat_s, hp, q, hp2, q2)
    for i in range(m):
        q[i] = p[i] - h[i] * (sign * (q[i] - hp[i]))
        q2[i] = p2[i] - h2[i] * (sign * (q2[i] - hp2[i]))


@_jit
def _cg_start(b, v, res, p):
    """CG from ``v = 0``: ``res = p = b``; returns ``‖b‖²``."""
    rr = 0.0
    for i in range(b.shape[0]):
        v[i] = 0
        res[i] = b[i]
        p[i] = b[i]
        rr += float(b[i]) * float(b[i])
    return rr


@_jit
def _cg_update(v, res, p, q, rr):
    """One CG iteration after the product ``q = K p``: returns ``(False, rr)`` where ``pᵀKp ≤ 0``,
    else ``(True, ‖res‖²)`` with ``v``, ``res`` and ``p`` updated."""
    m = p.shape[0]
    pq = 0.0
    for i in range(m):
        pq += float(p[i]) * float(q[i])
    if not pq > 0:
        return False, rr
    alpha = rr / pq
    rr_new = 0.0
    for i in range(m):
        v[i] += alpha * p[i]
        res[i] -= alpha * q[i]
        rr_new += float(res[i]) * float(res[i])
    beta = rr_new / rr
    for i in range(m):
        p[i] = res[i] + beta * p[i]
    return True, rr_new


@_jit
def _site_cg(lat_s, sign, h, b, share, max_cg, v, res, p, hp, q):
    """CG on ``K v = b`` (one site) from v = 0 until ``‖b − Kv‖² ≤ share``; returns False where it met
    ``pᵀKp ≤ 0`` or ran ``max_cg`` iterations short of the share."""
    rr = _cg_start(b, v, res, p)
    it = 0
    while rr > share:
        if it >= max_cg:
            return False
        _k_times(lat_s, sign, h, p, hp, q)
        ok, rr = _cg_update(v, res, p, q, rr)
        if not ok:
            return False
        it += 1
    return True


@_jit
def _site_cg2(lat_s, sign, max_cg, h, b, share, v, res, p, hp, q, h2, b2, share2, v2, res2, p2, hp2, q2):
    """:func:`_site_cg` for two images' systems on the same site, in lockstep: while both iterate,
    each product reads the block once for both (:func:`_k_times2`); each system stops on its own
    test, as alone. Returns both outcomes."""
    rr = _cg_start(b, v, res, p)
    rr2 = _cg_start(b2, v2, res2, p2)
    it = 0
    it2 = 0
    ok = True
    ok2 = True
    run = rr > share
    run2 = rr2 > share2
    while run or run2:
        if run and it >= max_cg:
            run = ok = False
        if run2 and it2 >= max_cg:
            run2 = ok2 = False
        if run and run2:
            _k_times2(lat_s, sign, h, p, hp, q, h2, p2, hp2, q2)
        elif run:
            _k_times(lat_s, sign, h, p, hp, q)
        elif run2:
            _k_times(lat_s, sign, h2, p2, hp2, q2)
        if run:
            ok, rr = _cg_update(v, res, p, q, rr)
            it += 1
            run = ok and rr > share
        if run2:
            ok2, rr2 = _cg_update(v2, res2, p2, q2, rr2)
            it2 += 1
            run2 = ok2 and rr2 > share2
    return ok, ok2


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
    """``row_s[i] = |s|·Σ_j |L_kij − δ_ij|`` for one site's block (rows read contiguously, so the
    sums vectorise); returns whether the block is symmetric (each pair compared once; NaN is not)."""
    m = row_s.shape[0]
    for i in range(m):
        acc = abs(lat_s[i, i] - 1)
        for j in range(i):
            acc += abs(lat_s[i, j])
        for j in range(i + 1, m):
            acc += abs(lat_s[i, j])
        row_s[i] = abs(sign) * acc
    symmetric = True
    for i in range(m):
        symmetric &= lat_s[i, i] == lat_s[i, i]  # a NaN on the diagonal is not symmetric either (as NaN != NaN)
        for j in range(i + 1, m):
            symmetric &= lat_s[i, j] == lat_s[j, i]
    return symmetric


@_jit
def _step_begin(s, newton, checked, energy, lat_s, sign, us, un, rs, fs, u0, p0, ls, phic, definite, chol, code,
                h, b, fpv):
    """One image's step on site ``s`` up to CG: the late Armijo test of the step that led here (on
    ``Φ_k``, or on ``½‖F_k‖²``), then the line search's step back or the Picard step, written into
    ``un[s]`` (returns ``(False, 0)``), or the Newton system's ``h = f'(u)^{1/2}``, ``b = −h τF``
    (returns ``(True, ‖b‖²)``). The image's arrays, site-first: (S, M), ``ls`` (3, S), ``phic`` (S, 2)."""
    m = us.shape[1]
    dt = us.dtype.type
    zero = dt(0)
    back = False
    if newton and checked and energy:  # the late Armijo test on the energy
        back = (phic[s, 0] > ls[0, s] + _ARMIJO_C * ls[1, s] * ls[2, s] + phic[s, 1] and ls[2, s] < 0
                and ls[1, s] > 2.0 ** -_MAX_HALVINGS)
    elif newton and checked:  # the late Armijo test of the step that led to us
        floor_ls = (16.0 * float(np.finfo(us.dtype).eps)) ** 2  # the line search's rounding level
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
        return False, 0.0
    if not newton:  # Picard start: u1 = u0 + τF(u0)
        for i in range(m):
            un[s, i] = us[s, i] + fs[s, i]
        return False, 0.0
    for i in range(m):  # z = J⁻¹ τF: CG on K v = −h τF, z = a h v − τF
        fpv[i] = _slope(us[s, i], rs[s, i], code)
        h[i] = np.sqrt(max(fpv[i], zero))
        b[i] = -h[i] * fs[s, i]
    rr0 = 0.0
    for i in range(m):
        rr0 += float(b[i]) * float(b[i])
    return True, rr0


@_jit
def _step_finish(s, solved, rr0, share, energy, lat_s, sign, us, un, rs, fs, box, u0, p0, ls, phic, code, big,
                 h, v, hp, z, fpv, jac):
    """One image's Newton step on site ``s`` after CG (``solved``: CG's ``v`` solves ``K v = b`` to
    the share; else the exact step): ``z``, the safeguarded ``un[s]`` (NaN → 0, the tanh box) and
    the step the line search checks next time (``u0``, ``p0``, ``ls``)."""
    m = us.shape[1]
    zero = us.dtype.type(0)
    if solved:
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


@_jit
def _sites_pass(start, stride, mode, active, newton, checked, share, lat, sign, d, box, row, us, un, rs, rn, fs, fn,
                code, big, max_cg, energy, eps16, scratch, jac, chol, u0, p0, ls, definite, phic, phin, sums):
    """Sites in runs ``start, start + stride, …`` of :data:`_RUN` sites (run ``j``: sites
    ``_RUN·j … _RUN·j + _RUN − 1``) of one pass of :func:`_settle_group_cg` over a group of G ≤ 2
    images (the arrays' first axis; ``active`` (G,) which of them take part). ``mode``
    :data:`_BLOCKS`: each block's row sums ``row[k, i] = Σ_j |s·(L_kij − δ_ij)|`` and
    ``sums[0, 0, k] = 0`` where ``L_k`` is symmetric (1 where not); :data:`_FIELD`: the box
    ``|d_k| + row_k`` and the field at ``us`` (into ``rs``, ``fs``, ``phic``); :data:`_STEP`: one
    step from ``us`` to ``un`` (a Picard step, a Newton step or the line search's step back;
    :func:`_step_begin`, CG, :func:`_step_finish`) and the field there (``rn``, ``fn``, ``phin``).
    Where both images take a Newton step on a site, their CG runs in lockstep (:func:`_site_cg2`:
    the block read once per product for both). The field passes write each site's ``(‖τF_k‖²,
    ‖u_k‖², ‖h τF_k‖²)`` into ``sums[g, :, k]``; ``scratch`` (G, 9, M), ``jac`` and ``chol`` are
    this call's own."""
    n_sites = d.shape[1]
    n_rows = active.shape[0]
    for run in range(start * _RUN, n_sites, stride * _RUN):  # runs of _RUN sites: few cache lines shared
        for s in range(run, min(run + _RUN, n_sites)):
            lat_s = lat[s]
            if mode == _BLOCKS:
                sums[0, 0, s] = 0.0 if _block_sums(lat_s, sign, row[s]) else 1.0
                continue
            cg0 = False
            cg1 = False
            rr0 = 0.0
            rr1 = 0.0
            ok0 = True
            ok1 = True
            if mode == _STEP:
                for g in range(n_rows):
                    if active[g]:
                        sc = scratch[g]
                        need, rr = _step_begin(s, newton[g], checked[g], energy, lat_s, sign, us[g], un[g], rs[g],
                                               fs[g], u0[g], p0[g], ls[g], phic[g], definite, chol, code, sc[0],
                                               sc[1], sc[8])
                        if g == 0:
                            cg0, rr0 = need, rr
                        else:
                            cg1, rr1 = need, rr
                if cg0 and cg1:
                    a, c = scratch[0], scratch[1]
                    ok0, ok1 = _site_cg2(lat_s, sign, max_cg, a[0], a[1], share[0], a[2], a[3], a[4], a[5], a[6],
                                         c[0], c[1], share[1], c[2], c[3], c[4], c[5], c[6])
                elif cg0 or cg1:
                    g = 0 if cg0 else 1
                    a = scratch[g]
                    ok = _site_cg(lat_s, sign, a[0], a[1], share[g], max_cg, a[2], a[3], a[4], a[5], a[6])
                    ok0 = ok if cg0 else ok0
                    ok1 = ok if cg1 else ok1
            for g in range(n_rows):
                if not active[g]:
                    continue
                if mode == _FIELD:
                    for i in range(d.shape[2]):
                        box[g, s, i] = abs(d[g, s, i]) + row[s, i]
                    a1, a2, a3 = _site_field(lat_s, sign, d[g, s], us[g, s], rs[g, s], fs[g, s], code, energy,
                                             eps16, phic[g, s])
                else:
                    if (g == 0 and cg0) or (g == 1 and cg1):
                        sc = scratch[g]
                        _step_finish(s, ok0 if g == 0 else ok1, rr0 if g == 0 else rr1, share[g], energy, lat_s,
                                     sign, us[g], un[g], rs[g], fs[g], box[g], u0[g], p0[g], ls[g], phic[g], code,
                                     big, sc[0], sc[2], sc[5], sc[7], sc[8], jac)
                    a1, a2, a3 = _site_field(lat_s, sign, d[g, s], un[g, s], rn[g, s], fn[g, s], code, energy,
                                             eps16, phin[g, s])
                sums[g, 0, s] = a1
                sums[g, 1, s] = a2
                sums[g, 2, s] = a3


@_jit
def _sites_serial(chunks, mode, active, newton, checked, share, lat, sign, d, box, row, us, un, rs, rn, fs, fn, code,
                  big, max_cg, energy, eps16, scratch, jac, chol, u0, p0, ls, definite, phic, phin, sums):
    """One pass of :func:`_sites_pass` over all sites in ``chunks`` interleaved sets (chunk ``c``:
    runs ``c, c + chunks, …``, with ``scratch[c]``, ``jac[c]``, ``chol[c]``), in this thread."""
    for c in range(chunks):
        _sites_pass(c, chunks, mode, active, newton, checked, share, lat, sign, d, box, row, us, un, rs, rn, fs, fn,
                    code, big, max_cg, energy, eps16, scratch[c], jac[c], chol[c], u0, p0, ls, definite, phic, phin,
                    sums)


@compiled._jit_parallel
def _sites_parallel(chunks, mode, active, newton, checked, share, lat, sign, d, box, row, us, un, rs, rn, fs, fn,
                    code, big, max_cg, energy, eps16, scratch, jac, chol, u0, p0, ls, definite, phic, phin, sums):
    """:func:`_sites_serial` with the chunks on numba's threads (a separate function, not the same
    one compiled twice: numba's cache would not tell the two apart). Every site's numbers depend on
    that site only, so both give the same bits."""
    for c in prange(chunks):
        _sites_pass(c, chunks, mode, active, newton, checked, share, lat, sign, d, box, row, us, un, rs, rn, fs, fn,
                    code, big, max_cg, energy, eps16, scratch[c], jac[c], chol[c], u0, p0, ls, definite, phic, phin,
                    sums)


@_jit
def _sites(chunks, mode, active, newton, checked, share, lat, sign, d, box, row, us, un, rs, rn, fs, fn, code, big,
           max_cg, energy, eps16, scratch, jac, chol, u0, p0, ls, definite, phic, phin, sums):
    """One pass over the sites (:func:`_sites_serial`), on ``chunks`` threads where ``chunks > 1``."""
    if chunks > 1:
        _sites_parallel(chunks, mode, active, newton, checked, share, lat, sign, d, box, row, us, un, rs, rn, fs, fn,
                        code, big, max_cg, energy, eps16, scratch, jac, chol, u0, p0, ls, definite, phic, phin, sums)
    else:
        _sites_serial(1, mode, active, newton, checked, share, lat, sign, d, box, row, us, un, rs, rn, fs, fn, code,
                      big, max_cg, energy, eps16, scratch, jac, chol, u0, p0, ls, definite, phic, phin, sums)


@_jit
def _site_sums(sums, g):
    """Image ``g``'s ``(‖τF‖², ‖u‖², ‖h τF‖²)``, its sites' numbers summed in site order (the same
    bits for any number of chunks)."""
    f2 = 0.0
    u2 = 0.0
    b2 = 0.0
    for s in range(sums.shape[2]):
        f2 += sums[g, 0, s]
        u2 += sums[g, 1, s]
        b2 += sums[g, 2, s]
    return f2, u2, b2


@_jit
def _settle_group_cg(n_rows, lat, sign, d, box, row, us, un, rs, rn, fs, fn, tau, code, picard, tol, atol, cap,
                     cap_first, bound, big, forcing, floor, max_cg, chunks, scratch, jac, u0, p0, ls, definite, chol,
                     energy, search_after, eps16, phic, phin, sums, steps, status, residual):
    """Settle a group of ``n_rows`` ≤ 2 inputs (site-first arrays (G, S, M): drive ``d``, box ``box``
    (written here from the blocks' row sums ``row``), state ``us``) with Newton–CG, each on the
    loop of :func:`dynsim.compiled._settle_row` and its own stop test: the residual ``‖F‖/‖u‖``
    tested first, then a Picard start or a Newton step; an image leaves the group's passes when it
    stops. Writes each image's ``(steps, status, residual)``; ``us`` holds the returned states and
    ``rs`` their rates. Each pass over the sites (:func:`_sites`) runs in ``chunks`` sets of sites
    (``scratch`` (C, G, 9, M), ``jac``, ``chol`` (C, M, M): each chunk's own), on as many threads
    where ``chunks > 1``. With the late Armijo test of :func:`dynsim.solvers.newton.line_search`
    per site: ``u0``, ``p0`` (G, S, M) the checked step's start and direction, ``ls`` (G, 3, S) its
    merit (``‖τF_k(u0)‖²``, or with ``energy`` ``Φ_k(u0)``), α and ``∇Φ_kᵀp``
    (:func:`dynsim.solvers.newton.energy_line_search`), ``definite`` (S,) whether ``I − s·(L_k − I)
    ≻ 0`` (−1: not checked yet; ``chol`` float64); the test runs from step ``search_after`` on;
    ``phic``/``phin`` (G, S, 2) ``Φ_k`` and its rounding scale at the current/next state; ``sums``
    (G, 3, S) the sites' squared norms. CG stops at
    :func:`dynsim.solvers.newton_cg.newton_cg_step`'s ``η``."""
    n_sites = d.shape[1]
    g_max = d.shape[0]
    active = np.zeros(g_max, dtype=np.bool_)
    newton = np.zeros(g_max, dtype=np.bool_)
    checked = np.zeros(g_max, dtype=np.bool_)  # a Newton step led here (the line search)
    share = np.zeros(g_max, dtype=np.float64)
    f2 = np.zeros(g_max, dtype=np.float64)
    u2 = np.zeros(g_max, dtype=np.float64)
    b2 = np.zeros(g_max, dtype=np.float64)
    res = np.zeros(g_max, dtype=np.float64)
    n = np.zeros(g_max, dtype=np.int64)
    active[:n_rows] = True
    _sites(chunks, _FIELD, active, newton, checked, share, lat, sign, d, box, row, us, un, rs, rn, fs, fn, code, big,
           max_cg, energy, eps16, scratch, jac, chol, u0, p0, ls, definite, phic, phin, sums)
    for g in range(n_rows):
        f2[g], u2[g], b2[g] = _site_sums(sums, g)
    while True:
        left = 0
        for g in range(n_rows):
            if not active[g]:
                continue
            u_norm = max(np.sqrt(u2[g]), 1e-12)
            res[g] = np.sqrt(f2[g]) / tau / u_norm
            settled = res[g] < tol + atol / u_norm  # ‖F‖ < atol + tol‖u‖ (stopping.StopLimits)
            capped = cap >= 0 and n[g] >= cap
            if settled or capped:
                steps[g] = n[g]
                status[g] = _MAX_STEPS if capped and (cap_first or not settled) else _SETTLED
                residual[g] = res[g]
                active[g] = False
                continue
            eta = max(np.sqrt(f2[g]) / u_norm, floor)
            if tol > 0 and res[g] > 0:  # no more accuracy than reaching tol needs (oversolving)
                eta = max(eta, 0.5 * tol / res[g])
            eta = min(eta, forcing)
            share[g] = eta * eta * b2[g] / n_sites
            newton[g] = not (n[g] == 0 and picard)
            left += 1
        if left == 0:
            return
        _sites(chunks, _STEP, active, newton, checked, share, lat, sign, d, box, row, us, un, rs, rn, fs, fn, code,
               big, max_cg, energy, eps16, scratch, jac, chol, u0, p0, ls, definite, phic, phin, sums)
        for g in range(n_rows):
            if not active[g]:
                continue
            f2n, u2n, b2n = _site_sums(sums, g)
            # divergence: a non-finite residual or state, or a state norm above the bound
            if not (np.isfinite(res[g]) and np.isfinite(u2n)) or np.sqrt(u2n) > bound:
                steps[g] = n[g]
                status[g] = _DIVERGED
                residual[g] = res[g]
                active[g] = False
                continue
            us[g] = un[g]
            rs[g] = rn[g]
            fs[g] = fn[g]
            phic[g] = phin[g]
            f2[g], u2[g], b2[g] = f2n, u2n, b2n
            checked[g] = newton[g] and n[g] >= search_after  # the residual's line search starts late
            n[g] += 1


@_jit
def _settle_kernel_cg(x, w, ff_index, n_pixels, channels, lat, sign, tau, code, picard, tol, atol, cap, cap_first,
                      bound, big, forcing, floor, max_cg, energy, search_after, chunks, group, u, r, steps, status,
                      residual):
    """Settle every row of ``x`` (B, D_in) in place into u, r (B, N), steps, status, residual (B,),
    ``group`` (1 or 2) rows at a time (:func:`_settle_group_cg`), each pass over the sites in
    ``chunks`` sets (on as many threads where ``chunks > 1``); returns the field evaluations (one
    per step and sample, plus the first), or −1 (nothing written) if a lateral block is not
    symmetric."""
    n_sites, m, kc = w.shape
    dtype = w.dtype
    row = np.empty((n_sites, m), dtype=dtype)  # Σ_j |s·A_kij|
    shape = (group, n_sites, m)
    d = np.empty(shape, dtype=dtype)
    box = np.empty(shape, dtype=dtype)
    us = np.empty(shape, dtype=dtype)
    un = np.empty(shape, dtype=dtype)
    rs = np.empty(shape, dtype=dtype)
    rn = np.empty(shape, dtype=dtype)
    fs = np.empty(shape, dtype=dtype)
    fn = np.empty(shape, dtype=dtype)
    u0 = np.empty(shape, dtype=dtype)  # the line search's state (_settle_group_cg)
    p0 = np.empty(shape, dtype=dtype)
    scratch = np.empty((chunks, group, 9, m), dtype=dtype)
    jac = np.empty((chunks, m, m), dtype=dtype)
    ls = np.empty((group, 3, n_sites), dtype=np.float64)
    phic = np.zeros((group, n_sites, 2), dtype=np.float64)
    phin = np.zeros((group, n_sites, 2), dtype=np.float64)
    eps16 = 16.0 * float(np.finfo(dtype).eps)
    definite = np.full(n_sites, -1, dtype=np.int8)
    chol = np.empty((chunks, m, m), dtype=np.float64)
    sums = np.empty((group, 3, n_sites), dtype=np.float64)
    xg = np.empty(kc, dtype=dtype)
    flags = np.zeros(group, dtype=np.bool_)
    flags[0] = True
    zeros = np.zeros(group, dtype=np.float64)
    _sites(chunks, _BLOCKS, flags, flags, flags, zeros, lat, dtype.type(sign), d, box, row, us, un, rs, rn, fs, fn,
           code, 0.0, max_cg, energy, eps16, scratch, jac, chol, u0, p0, ls, definite, phic, phin, sums)
    for s in range(n_sites):
        if sums[0, 0, s] > 0:
            return -1
    n_evals = 0
    for b0 in range(0, x.shape[0], group):
        n_rows = min(group, x.shape[0] - b0)
        for g in range(n_rows):
            _drive_sites(x[b0 + g], w, ff_index, n_pixels, channels, xg, d[g].T)  # d = W x, site-major via d.T
            us[g] = u[b0 + g].reshape(n_sites, m)
        _settle_group_cg(n_rows, lat, dtype.type(sign), d, box, row, us, un, rs, rn, fs, fn, tau, code, picard, tol,
                         atol, cap, cap_first, bound, big, forcing, floor, max_cg, chunks, scratch, jac, u0, p0, ls,
                         definite, chol, energy, search_after, eps16, phic, phin, sums, steps[b0:b0 + n_rows],
                         status[b0:b0 + n_rows], residual[b0:b0 + n_rows])
        for g in range(n_rows):
            u[b0 + g] = us[g].reshape(n_sites * m)
            r[b0 + g] = rs[g].reshape(n_sites * m)
            n_evals += steps[b0 + g] + 1
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
    ``--threads`` setting), at most numba's, and 1 under numba's ``workqueue`` threading layer
    (without OpenMP or TBB), which aborts when two threads enter parallel regions at once; sets
    numba's thread count (for this thread)."""
    n = max(1, min(torch.get_num_threads(), compiled.numba.config.NUMBA_NUM_THREADS))
    if n > 1:
        compiled.numba.set_num_threads(n)
        if compiled.numba.threading_layer() == "workqueue":  # unsafe for concurrent callers: stay on one
            return 1
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

    if b == 0:
        return u, r, steps, status, residual, 0
    if GROUP not in (1, 2):
        raise ValueError(f"compiled_cg.GROUP must be 1 or 2 (the pair loop), got {GROUP}")
    torch_threads = torch.get_num_threads()  # before numba's threads start (site_threads): see below
    threads = min(torch_threads, b // compiled.PARALLEL_MIN_ROWS)
    chunks = 1 if threads > 1 else site_threads()  # rows on Python threads, or each row's sites on numba's

    def rows(lo: int, hi: int) -> int:
        return _settle_kernel_cg(xs[lo:hi], w_np, ff_index, n_pixels, channels, lat_np, *loop, chunks,
                                 min(GROUP, hi - lo), *(o[lo:hi] for o in outs))

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
