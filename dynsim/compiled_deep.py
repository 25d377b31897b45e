"""Compiled (numba) CPU backend of :func:`dynsim.settle` for the deep network: block sweeps and Euler.

The deep network of Obeid, Ramambason & Pehlevan 2019 (eq. 15;
:class:`~dynsim.systems.deep.DeepHebbianNet`) couples layer ``p`` to its neighbours only
through its external input

    b_p = W_p r_{p−1}/m_p + γ m_{p+1} W_{p+1}ᵀ r_{p+1},    τF_p(u) = −u_p + b_p + s·A_p f(g_p u_p)

(``A_p`` the per-site blocks of ``L_p − I``, ``r_0 = x``). This module computes, in one
compiled loop per sample, exactly what :func:`dynsim.settle` computes with

* :class:`~dynsim.solvers.BlockNewton` (``--solver block``): each step is a Gauss–Seidel sweep
  ``p = 1 … P``; layer ``p``'s input ``b_p`` is built from the newest rates below and the current
  rates above, then one per-site Newton step on layer ``p`` with ``b_p`` held fixed
  (:func:`_layer_newton`: ``J_k = −I + s·A_k diag(g_p f'(g_p u_k))`` solved per site by the
  elimination of :mod:`dynsim.compiled`, NaN → 0, the tanh box ``|u_k| ≤ |b_k| + Σ_j|s·A_kj|``,
  half steps from sweep ``damp_after`` on); the first sweep is the Picard sweep
  ``u_p ← b_p + s·A_p f(g_p u_p)`` for tanh;
* :class:`~dynsim.solvers.Euler` with a step cap: ``u ← u + dt_n F(u)`` on every layer at once
  (the authors' method, used for streaming input).

The per-layer pieces are the one-layer kernel's (:mod:`dynsim.compiled`: the rate function,
its slope, the per-site elimination) with the coupling drive ``b_p`` as an input; the stop test
is :func:`dynsim.settle`'s on the deep network's residual (``layer_stop="each"``:
``max_p ‖F_p‖/‖u_p‖``; ``"state"``: ``‖F‖/‖u‖``) against ``atol + tol‖u‖``, tested before each
step, with the same cap, divergence bound, :class:`~dynsim.stopping.Status` codes, step counts
and field-evaluation counts as the torch path, and the same fixed points up to float rounding
(tests: ``tests/test_compiled_deep.py``). The torch path (``dynsim.solvers.block``) is the
definition and the GPU path; this backend is chosen inside :func:`dynsim.settle` through
:mod:`dynsim.backend` and switched off with :mod:`dynsim.compiled`'s ``disabled()`` or
``DYNSIM_COMPILED=0``. Batches of ≥ 128 rows are split over ``torch.get_num_threads()`` threads.
Timings: ``benchmarks/deep_settle.py``.

Working arrays are site-last per layer, ``(M_p, S_p)``, packed one layer after the other in
flat buffers (so that every per-site loop vectorises, as in the one-layer kernel); the
per-layer weights are passed as tuples of the layers' own arrays (no copies).
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

from dynsim import compiled
from dynsim.compiled import (
    METHOD_EULER,
    METHOD_NEWTON,
    METHOD_PICARD_NEWTON,
    PARALLEL_MIN_ROWS,
    _activation_code,
    _jit,
    _rate,
    _slope,
    _solve_sites,
    _step_sizes,
)
from dynsim.stopping import Status, StopLimits

numba = compiled.numba
_SETTLED, _MAX_STEPS, _DIVERGED = int(Status.SETTLED), int(Status.MAX_STEPS), int(Status.DIVERGED)


@_jit
def _image_input(xb, w, index, n_pixels, channels, inv_m, out, xg):
    """``out[i, s] = Σ_j W_1[s, i, j] x[gather(s, j)] / m_1`` for one flat image ``xb`` (channel-major)."""
    n_sites, m_per, kc = w.shape
    k_in = index.shape[1]
    zero = w.dtype.type(0)
    for s in range(n_sites):
        for k in range(k_in):
            p = index[s, k]
            for g in range(channels):
                xg[k * channels + g] = xb[g * n_pixels + p] if p != n_pixels else zero
        for i in range(m_per):
            acc = zero
            for j in range(kc):
                acc += w[s, i, j] * xg[j]
            out[i, s] = acc * inv_m


@_jit
def _rates_input(w, index, src, inv_m, out, xg):
    """``out[i, s] = Σ_j W_p[s, i, j] r_{p−1}[gather(s, j)] / m_p``; ``src`` (G, S_in) holds the rates
    of the layer below site-last; index entries ``S_in`` are padding (they read 0)."""
    n_sites, m_per, kc = w.shape
    k_in = index.shape[1]
    g_in, s_in = src.shape
    zero = w.dtype.type(0)
    for s in range(n_sites):
        for k in range(k_in):
            q = index[s, k]
            for g in range(g_in):
                xg[k * g_in + g] = src[g, q] if q != s_in else zero
        for i in range(m_per):
            acc = zero
            for j in range(kc):
                acc += w[s, i, j] * xg[j]
            out[i, s] = acc * inv_m


@_jit
def _feedback(w_up, index_up, r_up, scale, out):
    """``out = scale · W_{p+1}ᵀ r_{p+1}``: (G, S_in) site-last, from the upper layer's rates ``r_up``
    (M, S) and its structured weights (scatter over its gather index; padding skipped)."""
    n_sites, m_per, kc = w_up.shape
    k_in = index_up.shape[1]
    g_in, s_in = out.shape
    out[:, :] = 0
    for s in range(n_sites):
        for k in range(k_in):
            q = index_up[s, k]
            if q == s_in:
                continue
            for g in range(g_in):
                acc = w_up.dtype.type(0)
                for m in range(m_per):
                    acc += w_up[s, m, k * g_in + g] * r_up[m, s]
                out[g, q] += scale * acc


@_jit
def _layer_rates(us, gain, code, rr):
    """``rr = f(g·u)`` on one layer's (M, S) state."""
    m_per, n_sites = us.shape
    dt = us.dtype.type
    for j in range(m_per):
        for s in range(n_sites):
            rr[j, s] = _rate(us[j, s] if gain == 1.0 else dt(gain) * us[j, s], code)


@_jit
def _layer_field(b, us, rr, a, fs):
    """``fs = b − u + s·A f(u)`` (τF of one layer with its input ``b`` held fixed); returns
    ``(‖fs‖², ‖u‖²)`` in float64."""
    m_per, n_sites = us.shape
    f2 = 0.0
    u2 = 0.0
    for i in range(m_per):
        for s in range(n_sites):
            fs[i, s] = b[i, s] - us[i, s]
        for j in range(m_per):
            for s in range(n_sites):
                fs[i, s] += a[i, j, s] * rr[j, s]
        for s in range(n_sites):
            f2 += float(fs[i, s]) * float(fs[i, s])
            u2 += float(us[i, s]) * float(us[i, s])
    return f2, u2


@_jit
def _layer_newton(us, rr, fs, b, a, row, gain, code, tanh, half, big, jac, un):
    """One per-site Newton step on one layer with its input ``b`` held fixed: ``un = u − J⁻¹(τF)``,
    ``J_k = −I + s·A_k diag(g f'(g u_k))``; NaN → 0, ±``big``, the tanh box ``|b| + Σ|s·A|``, and
    a half step when ``half``. ``fs`` (τF at ``u`` with this ``b``) is overwritten."""
    m_per, n_sites = us.shape
    zero = us.dtype.type(0)
    for j in range(m_per):
        for s in range(n_sites):
            fp = _slope(us[j, s] if gain == 1.0 else us.dtype.type(gain) * us[j, s], rr[j, s], code)
            if gain != 1.0:
                fp = fp * us.dtype.type(gain)
            for i in range(m_per):
                jac[i, j, s] = a[i, j, s] * fp - (1 if i == j else 0)
    _solve_sites(jac, fs)
    for i in range(m_per):
        for s in range(n_sites):
            v = us[i, s] - fs[i, s]
            v = zero if np.isnan(v) else min(max(v, -big), big)
            if tanh:
                box = abs(b[i, s]) + row[i, s]
                v = min(max(v, -box), box)
            if half:
                v = us[i, s] + (v - us[i, s]) / 2
            un[i, s] = v


@_jit
def _deep_kernel(x, ws, idxs, lats, n_pixels, channels, dims, gains, mults, gamma, sign, tau, code, method, dts,
                 damp_after, inner_tol, inner_max, each, tol, atol, cap, cap_first, bound, big, from_rest, u, r, steps,
                 status, residual):
    """Settle every row of ``x`` (B, D_in) in place into u, r (B, N), steps, status, residual (B,).

    ``ws[p]`` (S_p, M_p, K_p·G_p), ``idxs[p]`` (S_p, K_p), ``lats[p]`` (S_p, M_p, M_p): layer p's
    weights, gather index and lateral blocks; ``dims[p] = (M_p, S_p)``; u and r are site-major per
    layer, layer after layer (the torch layout); ``from_rest``: u holds zeros."""
    n_layers = dims.shape[0]
    dt = ws[0].dtype.type
    off = np.zeros(n_layers + 1, dtype=np.int64)  # flat offsets of (M_p, S_p) blocks
    joff = np.zeros(n_layers + 1, dtype=np.int64)  # ... and of (M_p, M_p, S_p) blocks
    kmax = 1
    for p in range(n_layers):
        off[p + 1] = off[p] + dims[p, 0] * dims[p, 1]
        joff[p + 1] = joff[p] + dims[p, 0] * dims[p, 0] * dims[p, 1]
        kmax = max(kmax, ws[p].shape[2])
    n_all = off[n_layers]
    a_all = np.empty(joff[n_layers], dtype=ws[0].dtype)  # s·(L_k − I), site-last
    row_all = np.zeros(n_all, dtype=ws[0].dtype)  # Σ_j |s·A_kij|
    for p in range(n_layers):
        m_per, n_sites = dims[p, 0], dims[p, 1]
        a = a_all[joff[p]:joff[p + 1]].reshape((m_per, m_per, n_sites))
        row = row_all[off[p]:off[p + 1]].reshape((m_per, n_sites))
        lat = lats[p]
        for s in range(n_sites):
            for i in range(m_per):
                for j in range(m_per):
                    v = dt(sign) * (lat[s, i, j] - (1 if i == j else 0))
                    a[i, j, s] = v
                    row[i, s] += abs(v)
    us_all = np.empty(n_all, dtype=ws[0].dtype)
    un_all = np.empty(n_all, dtype=ws[0].dtype)
    rr_all = np.empty(n_all, dtype=ws[0].dtype)
    fs_all = np.empty(n_all, dtype=ws[0].dtype)
    ff_all = np.empty(n_all, dtype=ws[0].dtype)  # W_p r_{p−1}/m_p at the current state
    fb_all = np.zeros(n_all, dtype=ws[0].dtype)  # γ m_{p+1} W_{p+1}ᵀ r_{p+1} at the current state
    bb_all = np.empty(n_all, dtype=ws[0].dtype)  # b_p of the sweep
    jac_all = np.empty(joff[n_layers], dtype=ws[0].dtype)
    wk_all = np.empty(n_all, dtype=ws[0].dtype)  # an inner Newton step's result
    f2s = np.zeros(n_layers)
    u2s = np.zeros(n_layers)
    xg = np.empty(kmax, dtype=ws[0].dtype)
    tanh = code == 0 or code == 3
    n_evals = 0
    inner = inner_tol > 0
    for b in range(x.shape[0]):
        for p in range(n_layers):  # load the state (site-major -> site-last) and its rates
            m_per, n_sites = dims[p, 0], dims[p, 1]
            us = us_all[off[p]:off[p + 1]].reshape((m_per, n_sites))
            for s in range(n_sites):
                for i in range(m_per):
                    us[i, s] = u[b, off[p] + s * m_per + i]
            _layer_rates(us, gains[p], code, rr_all[off[p]:off[p + 1]].reshape((m_per, n_sites)))
        _image_input(x[b], ws[0], idxs[0], n_pixels, channels, dt(1.0 / mults[0]),
                     ff_all[off[0]:off[1]].reshape((dims[0, 0], dims[0, 1])), xg)
        for p in range(1, n_layers):
            if from_rest:  # f(0) = 0 for every rate function: the maps of zero rates are zero
                ff_all[off[p]:off[p + 1]] = 0
                continue
            _rates_input(ws[p], idxs[p], rr_all[off[p - 1]:off[p]].reshape((dims[p - 1, 0], dims[p - 1, 1])),
                         dt(1.0 / mults[p]), ff_all[off[p]:off[p + 1]].reshape((dims[p, 0], dims[p, 1])), xg)
        n = 0
        while True:
            # τF_p(u) of every layer, feedback from the current rates above
            for p in range(n_layers):
                m_per, n_sites = dims[p, 0], dims[p, 1]
                fb = fb_all[off[p]:off[p + 1]].reshape((m_per, n_sites))
                if gamma != 0.0 and p + 1 < n_layers:
                    _feedback(ws[p + 1], idxs[p + 1],
                              rr_all[off[p + 1]:off[p + 2]].reshape((dims[p + 1, 0], dims[p + 1, 1])),
                              dt(gamma * mults[p + 1]), fb)
                bb = bb_all[off[p]:off[p + 1]].reshape((m_per, n_sites))
                ff = ff_all[off[p]:off[p + 1]].reshape((m_per, n_sites))
                for i in range(m_per):
                    for s in range(n_sites):
                        bb[i, s] = ff[i, s] + fb[i, s]
                f2s[p], u2s[p] = _layer_field(bb, us_all[off[p]:off[p + 1]].reshape((m_per, n_sites)),
                                              rr_all[off[p]:off[p + 1]].reshape((m_per, n_sites)),
                                              a_all[joff[p]:joff[p + 1]].reshape((m_per, m_per, n_sites)),
                                              fs_all[off[p]:off[p + 1]].reshape((m_per, n_sites)))
            u_norm = max(np.sqrt(u2s.sum()), 1e-12)
            if each and n_layers > 1:
                res = 0.0
                for p in range(n_layers):
                    res = max(res, np.sqrt(f2s[p]) / tau / max(np.sqrt(u2s[p]), 1e-12))
                    if np.isnan(f2s[p]):
                        res = np.nan
                        break
            else:
                res = np.sqrt(f2s.sum()) / tau / u_norm
            residual[b] = res
            settled = res < tol + atol / u_norm  # ‖F‖ < atol + tol‖u‖ (stopping.StopLimits)
            capped = cap >= 0 and n >= cap
            if settled or capped:  # (the torch loop evaluates this last step too: one evaluation)
                status[b] = _MAX_STEPS if capped and (cap_first or not settled) else _SETTLED
                n_evals += 1
                break
            sweep_evals = 1
            if method == METHOD_EULER:  # u ← u + dt_n F(u) on every layer, then the inputs at the new state
                dtn = dts[n]
                for k in range(n_all):
                    un_all[k] = us_all[k] + dtn * (fs_all[k] if tau == 1.0 else fs_all[k] / dt(tau))
                for p in range(n_layers):
                    _layer_rates(un_all[off[p]:off[p + 1]].reshape((dims[p, 0], dims[p, 1])), gains[p], code,
                                 rr_all[off[p]:off[p + 1]].reshape((dims[p, 0], dims[p, 1])))
                for p in range(1, n_layers):
                    _rates_input(ws[p], idxs[p],
                                 rr_all[off[p - 1]:off[p]].reshape((dims[p - 1, 0], dims[p - 1, 1])),
                                 dt(1.0 / mults[p]), ff_all[off[p]:off[p + 1]].reshape((dims[p, 0], dims[p, 1])), xg)
            else:  # one Gauss–Seidel sweep: b_p from the new rates below and the current rates above
                picard = n == 0 and method == METHOD_PICARD_NEWTON
                for p in range(n_layers):
                    m_per, n_sites = dims[p, 0], dims[p, 1]
                    us = us_all[off[p]:off[p + 1]].reshape((m_per, n_sites))
                    rr = rr_all[off[p]:off[p + 1]].reshape((m_per, n_sites))
                    fs = fs_all[off[p]:off[p + 1]].reshape((m_per, n_sites))
                    bb = bb_all[off[p]:off[p + 1]].reshape((m_per, n_sites))
                    un = un_all[off[p]:off[p + 1]].reshape((m_per, n_sites))
                    a = a_all[joff[p]:joff[p + 1]].reshape((m_per, m_per, n_sites))
                    row = row_all[off[p]:off[p + 1]].reshape((m_per, n_sites))
                    jac = jac_all[joff[p]:joff[p + 1]].reshape((m_per, m_per, n_sites))
                    f2, u2 = f2s[p], u2s[p]
                    if p > 0:  # the layer below has moved: its new feed-forward input (kept for the next test)
                        ff = ff_all[off[p]:off[p + 1]].reshape((m_per, n_sites))
                        _rates_input(ws[p], idxs[p], rr_all[off[p - 1]:off[p]].reshape((dims[p - 1, 0],
                                     dims[p - 1, 1])), dt(1.0 / mults[p]), ff, xg)
                        fb = fb_all[off[p]:off[p + 1]].reshape((m_per, n_sites))
                        for i in range(m_per):
                            for s in range(n_sites):
                                bb[i, s] = ff[i, s] + fb[i, s]
                        f2, u2 = _layer_field(bb, us, rr, a, fs)
                    if not inner:  # one step per layer and sweep
                        if picard:  # u_p ← u_p + τF_p = b_p + s·A_p f(u_p)
                            for i in range(m_per):
                                for s in range(n_sites):
                                    un[i, s] = us[i, s] + fs[i, s]
                        else:
                            _layer_newton(us, rr, fs, bb, a, row, gains[p], code, tanh, n >= damp_after, big, jac, un)
                    else:  # Newton steps on this layer (b_p fixed) until ‖F_p‖/‖u_p‖ < inner_tol or inner_max
                        wk = wk_all[off[p]:off[p + 1]].reshape((m_per, n_sites))
                        un[:, :] = us
                        used = 0
                        for j in range(inner_max):
                            if j > 0:  # τF_p at the inner iterate (its rates are in rr)
                                f2, u2 = _layer_field(bb, un, rr, a, fs)
                            used += 1
                            if np.sqrt(f2) / tau / max(np.sqrt(u2), 1e-12) < inner_tol:
                                break
                            if picard and j == 0:
                                for i in range(m_per):
                                    for s in range(n_sites):
                                        un[i, s] = un[i, s] + fs[i, s]
                            else:
                                _layer_newton(un, rr, fs, bb, a, row, gains[p], code, tanh,
                                              n >= damp_after or j >= damp_after, big, jac, wk)
                                un[:, :] = wk
                            _layer_rates(un, gains[p], code, rr)
                        sweep_evals = max(sweep_evals, used)
                    _layer_rates(un, gains[p], code, rr)  # the new rates feed the layer above
            # divergence: a non-finite residual or state, or a state norm above the bound
            n2 = 0.0
            for k in range(n_all):
                n2 += float(un_all[k]) * float(un_all[k])
            n_evals += sweep_evals
            if not (np.isfinite(res) and np.isfinite(n2)) or np.sqrt(n2) > bound:
                status[b] = _DIVERGED
                break
            us_all[:] = un_all
            n += 1
        steps[b] = n
        for p in range(n_layers):  # the returned state and its rates f(g_p u_p)
            m_per, n_sites = dims[p, 0], dims[p, 1]
            us = us_all[off[p]:off[p + 1]].reshape((m_per, n_sites))
            rr = rr_all[off[p]:off[p + 1]].reshape((m_per, n_sites))
            _layer_rates(us, gains[p], code, rr)
            for s in range(n_sites):
                for i in range(m_per):
                    u[b, off[p] + s * m_per + i] = us[i, s]
                    r[b, off[p] + s * m_per + i] = rr[i, s]
    return n_evals


def _deep_chunks(x, ws, idxs, lats, n_pixels, channels, dims, gains, mults, gamma, sign, tau, code, method, dts,
                 damp_after, inner_tol, inner_max, each, tol, atol, cap, cap_first, bound, big, from_rest, u, r, steps,
                 status, residual, n_chunks):
    """:func:`_deep_kernel` on ``n_chunks`` contiguous slices of the batch, in parallel threads."""
    b = x.shape[0]
    evals = np.zeros(n_chunks, dtype=np.int64)
    for c in numba.prange(n_chunks):
        lo = c * b // n_chunks
        hi = (c + 1) * b // n_chunks
        evals[c] = _deep_kernel(x[lo:hi], ws, idxs, lats, n_pixels, channels, dims, gains, mults, gamma, sign, tau,
                                code, method, dts, damp_after, inner_tol, inner_max, each, tol, atol, cap, cap_first,
                                bound, big, from_rest, u[lo:hi], r[lo:hi], steps[lo:hi], status[lo:hi],
                                residual[lo:hi])
    return evals.sum()


if numba is not None:
    _deep_chunks = numba.njit(cache=True, nogil=True, parallel=True, error_model="numpy")(_deep_chunks)


def can_settle(system, x: torch.Tensor, u0) -> bool:
    """The kernel applies: a deep network (``layers``, ``mult_factors``, ``gains``) whose every layer
    the one-layer kernels accept (site-separable, nps ≤ ``MAX_NPS``, CPU float32/float64, no grad,
    one dtype), a tanh/linear/relu rate, and inputs of the right shape (a finite ``u0``)."""
    layers = getattr(system, "layers", None)
    if layers is None or not hasattr(system, "mult_factors") or not hasattr(system, "layer_stop"):
        return False
    if u0 is not None and not isinstance(u0, torch.Tensor):
        return False
    tensors = (x,) if u0 is None else (x, u0)
    if system.activation not in compiled.ACTIVATION_CODES or not all(compiled.applies(lay, *tensors) for lay in layers):
        return False
    if len({lay.ff.weight.dtype for lay in layers}) != 1:
        return False
    if x.shape[1] != system.input_size or (u0 is not None and tuple(u0.shape) != (x.shape[0], system.state_size)):
        return False
    return u0 is None or bool(torch.isfinite(u0).all())


def _arrays(system) -> tuple:
    """Tuples of the layers' weight / index / lateral arrays (NumPy views, no copies) and dims."""
    ws, idxs, lats, dims = [], [], [], []
    for layer in system.layers:
        w_np, ff_index, n_pixels, channels, lat_np, _ = compiled._arrays(layer)
        ws.append(w_np)
        idxs.append(ff_index)
        lats.append(lat_np)
        dims.append((layer.nps, layer.n_sites))
    first = system.layers[0]
    c = first.input_shape[0]
    return tuple(ws), tuple(idxs), tuple(lats), first.input_size // c, c, np.array(dims, dtype=np.int64)


def settle_deep(system, x: torch.Tensor, u0: torch.Tensor | None, *, method: str, tol: float | None, cap: int | None,
                cap_first: bool, max_state_norm: float, picard_start: bool = True, damp_after: int = 20,
                inner_tol: float | None = None, inner_max: int = 50, dts: np.ndarray | None = None, atol: float = 0.0):
    """Settle ``x`` (B, D_in) through the deep network with the compiled loop (module docstring).

    ``method``: ``"block"`` (:class:`~dynsim.solvers.BlockNewton`'s sweeps; ``picard_start``,
    ``damp_after``, ``inner_tol``, ``inner_max`` as there)
    or ``"euler"`` (``dts`` holds at least ``cap`` step sizes). The other
    arguments as :func:`dynsim.compiled.settle_layer`. Call it where :func:`can_settle` holds.
    Returns ``(u, r, steps, status, residual, n_evals)``.
    """
    if method == "euler":
        if cap is None or dts is None or len(dts) < cap:
            raise ValueError("the compiled Euler loop needs a step cap and one step size per step")
        code = METHOD_EULER
    elif method == "block":
        code = METHOD_PICARD_NEWTON if picard_start and system.activation == "tanh" else METHOD_NEWTON
    else:
        raise ValueError(f"unknown compiled method {method!r}")
    ws, idxs, lats, n_pixels, channels, dims = _arrays(system)
    dtype = system.layers[0].ff.weight.dtype
    b = x.shape[0]
    u = torch.zeros(b, system.state_size, dtype=dtype) if u0 is None else u0.to(dtype).clone()
    r = torch.empty_like(u)
    steps = torch.empty(b, dtype=torch.long)
    status = torch.empty(b, dtype=torch.int8)
    residual = torch.empty(b, dtype=dtype)
    npt = np.float32 if dtype == torch.float32 else np.float64
    dts = np.zeros(1, dtype=npt) if dts is None else np.asarray(dts, dtype=npt)
    args = (
        x.detach().to(dtype).contiguous().numpy(), ws, idxs, lats, n_pixels, channels, dims,
        np.asarray(system.gains, dtype=np.float64), np.asarray(system.mult_factors, dtype=np.float64),
        float(system.gamma), npt(system.lateral_sign), float(system.tau), _activation_code(system.activation, dtype),
        code, dts, int(damp_after), -1.0 if inner_tol is None else float(inner_tol), int(inner_max),
        system.layer_stop == "each",
        -1.0 if tol is None else float(tol), 0.0 if tol is None else float(atol),
        -1 if cap is None else int(cap), bool(cap_first), float(max_state_norm * math.sqrt(system.state_size)),
        float(torch.finfo(dtype).max), u0 is None,
        u.numpy(), r.numpy(), steps.numpy(), status.numpy(), residual.numpy(),
    )
    threads = min(torch.get_num_threads(), b // PARALLEL_MIN_ROWS)
    if threads > 1 and threading.current_thread() is threading.main_thread():  # as compiled.settle_layer
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        n_evals = _deep_chunks(*args, threads)
    else:
        n_evals = _deep_kernel(*args)
    return u, r, steps, status, residual, int(n_evals)


def settle_backend(system, x: torch.Tensor, u0: torch.Tensor | None, solver, limits: StopLimits | None,
                   max_state_norm: float):
    """:func:`dynsim.settle` of a deep network on the compiled loop, or ``None`` where it does not apply.

    It applies to :class:`~dynsim.solvers.BlockNewton` and to :class:`~dynsim.solvers.Euler` with a
    step cap, a stop rule with limits on the field residual and a cap > 0, and a network and
    tensors that :func:`can_settle` accepts.
    """
    from dynsim.solvers import BlockNewton, Euler

    if limits is None or limits.on != "field" or limits.cap == 0:
        return None
    kind = type(solver)
    if kind is Euler:
        if limits.cap is None or limits.cap > 10_000_000:
            return None
        method, extra = "euler", {}
    elif kind is BlockNewton:
        method, extra = "block", {"picard_start": solver.picard_start, "damp_after": solver.damp_after,
                                  "inner_tol": solver.inner_tol, "inner_max": solver.inner_max}
    else:
        return None
    if not can_settle(system, x, u0):
        return None
    if method == "euler":
        extra["dts"] = _step_sizes(solver.schedule, limits.cap)
    return settle_deep(system, x, u0, method=method, tol=limits.rtol, atol=limits.atol, cap=limits.cap,
                       cap_first=limits.cap_first, max_state_norm=max_state_norm, **extra)
