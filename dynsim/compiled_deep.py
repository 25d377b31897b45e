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
  (``J_k = −I + s·A_k diag(g_p f'(g_p u_k))`` solved per site, NaN → 0, the tanh box
  ``|u_k| ≤ |b_k| + Σ_j|s·A_kj|``: the one-layer loop's step, :func:`dynsim.compiled._newton_sites`;
  half steps from sweep ``damp_after`` on); the first sweep is the Picard sweep
  ``u_p ← b_p + s·A_p f(g_p u_p)`` for tanh;
* :class:`~dynsim.solvers.Euler` with a step cap: ``u ← u + dt_n F(u)`` on every layer at once
  (the authors' method, used for streaming input).

A deep layer is a backend of the one-layer loop: every per-layer piece is the one-layer
kernel's (:mod:`dynsim.compiled`: the drive ``W x`` — here of the image or of the rates
below —, the lateral blocks, the rates, the field, the Newton and Euler steps, the stop and
divergence tests, the outputs and the threads) with the coupling input ``b_p`` in place of the
drive; what is the deep loop's own is the sweep over layers, the feedback ``γ m_{p+1} W_{p+1}ᵀ
r_{p+1}`` and BlockNewton's damping (half steps) in place of the one-layer Newton's line search.
The stop test is :func:`dynsim.settle`'s on the deep network's residual (``layer_stop="each"``:
``max_p ‖F_p‖/‖u_p‖``; ``"state"``: ``‖F‖/‖u‖``) against ``atol + tol‖u‖``, tested before each
step, with the same cap, divergence bound, :class:`~dynsim.stopping.Status` codes, step counts
and field-evaluation counts as the torch path, and the same fixed points up to float rounding
(tests: ``tests/test_compiled_deep.py``). The torch path (``dynsim.solvers.block``) is the
definition and the GPU path; this backend is chosen inside :func:`dynsim.settle` through
:mod:`dynsim.backend` and switched off with :mod:`dynsim.compiled`'s ``disabled()`` or
``DYNSIM_COMPILED=0``. Batches of ≥ 128 rows are split over ``torch.get_num_threads()`` threads
(:func:`dynsim.compiled.in_threads`, the one-layer loop's thread pool).
Timings: ``benchmarks/deep_settle.py``.

Working arrays are site-last per layer, ``(M_p, S_p)``, packed one layer after the other in
flat buffers (so that every per-site loop vectorises, as in the one-layer kernel); the
per-layer weights are passed as tuples of the layers' own arrays (no copies).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dynsim import compiled
from dynsim.compiled import (
    METHOD_EULER,
    METHOD_PICARD_NEWTON,
    _activation_code,
    _diverged,
    _drive_sites,
    _euler_sites,
    _jit,
    _lateral_blocks,
    _newton_sites,
    _site_field,
    _site_rates,
    _stop_status,
    in_threads,
    kernel_settings,
    loop_outputs,
    method_code,
)
from dynsim.stopping import Status, StopLimits

_DIVERGED = int(Status.DIVERGED)


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
def _layer_input(src, w, index, n_in, channels, inv_m, xg, out):
    """``out[i, s] = Σ_j W_p[s, i, j] src[gather(s, j)] / m_p``: the one-layer drive
    (:func:`dynsim.compiled._drive_sites`) of layer p's input ``src`` (flat, channel-major: the image
    for p = 1, the (M_{p−1}, S_{p−1}) rates below, site-last, for p > 1; index entries ``n_in`` are
    padding and read 0), scaled by ``1/m_p``."""
    _drive_sites(src, w, index, n_in, channels, xg, out)
    if inv_m != 1:
        m_per, n_sites = out.shape
        for i in range(m_per):
            for s in range(n_sites):
                out[i, s] = out[i, s] * inv_m


@_jit
def _deep_kernel(x, ws, idxs, lats, n_pixels, channels, dims, gains, mults, gamma, sign, tau, code, method, dts,
                 damp_after, inner_tol, inner_max, each, tol, atol, cap, cap_first, bound, big, from_rest, u, r, steps,
                 status, residual):
    """Settle every row of ``x`` (B, D_in) in place into u, r (B, N), steps, status, residual (B,).

    ``ws[p]`` (S_p, M_p, K_p·G_p), ``idxs[p]`` (S_p, K_p), ``lats[p]`` (S_p, M_p, M_p): layer p's
    weights, gather index and lateral blocks; ``dims[p] = (M_p, S_p)``; u and r are site-major per
    layer, layer after layer (the torch layout); ``from_rest``: u holds zeros. Each layer's field,
    rates, Newton step, Euler step and the stop and divergence tests are the one-layer loop's
    (:mod:`dynsim.compiled`), on that layer's slice of the flat buffers."""
    n_layers = dims.shape[0]
    dtype = ws[0].dtype
    dt = dtype.type
    off = np.zeros(n_layers + 1, dtype=np.int64)  # flat offsets of (M_p, S_p) blocks
    joff = np.zeros(n_layers + 1, dtype=np.int64)  # ... and of (M_p, M_p, S_p) blocks
    kmax = 1
    smax = 1
    for p in range(n_layers):
        off[p + 1] = off[p] + dims[p, 0] * dims[p, 1]
        joff[p + 1] = joff[p] + dims[p, 0] * dims[p, 0] * dims[p, 1]
        kmax = max(kmax, ws[p].shape[2])
        smax = max(smax, dims[p, 1])
    n_all = off[n_layers]
    a_all = np.empty(joff[n_layers], dtype=dtype)  # s·(L_k − I), site-last
    row_all = np.zeros(n_all, dtype=dtype)  # Σ_j |s·A_kij|
    for p in range(n_layers):
        m_per, n_sites = dims[p, 0], dims[p, 1]
        _lateral_blocks(lats[p], sign, a_all[joff[p]:joff[p + 1]].reshape((m_per, m_per, n_sites)),
                        row_all[off[p]:off[p + 1]].reshape((m_per, n_sites)))
    us_all = np.empty(n_all, dtype=dtype)
    un_all = np.empty(n_all, dtype=dtype)
    rr_all = np.empty(n_all, dtype=dtype)
    fs_all = np.empty(n_all, dtype=dtype)
    ff_all = np.empty(n_all, dtype=dtype)  # W_p r_{p−1}/m_p at the current state
    fb_all = np.zeros(n_all, dtype=dtype)  # γ m_{p+1} W_{p+1}ᵀ r_{p+1} at the current state
    bb_all = np.empty(n_all, dtype=dtype)  # b_p of the sweep
    box_all = np.empty(n_all, dtype=dtype)  # the tanh box |b_p| + Σ_j |s·A_kij| of the sweep
    fp_all = np.empty(n_all, dtype=np.float64)  # scratch of the Newton step: g f'(g u), kept in float64
    jac_all = np.empty(joff[n_layers], dtype=dtype)
    wk_all = np.empty(n_all, dtype=dtype)  # an inner Newton step's result
    piv = np.empty(smax, dtype=np.int64)  # scratch of the elimination
    best = np.empty(smax, dtype=dtype)
    fac = np.empty(smax, dtype=dtype)
    f2s = np.zeros(n_layers)
    u2s = np.zeros(n_layers)
    xg = np.empty(kmax, dtype=dtype)
    n_evals = 0
    inner = inner_tol > 0
    for b in range(x.shape[0]):
        for p in range(n_layers):  # load the state (site-major -> site-last) and its rates
            m_per, n_sites = dims[p, 0], dims[p, 1]
            us = us_all[off[p]:off[p + 1]].reshape((m_per, n_sites))
            for s in range(n_sites):
                for i in range(m_per):
                    us[i, s] = u[b, off[p] + s * m_per + i]
            _site_rates(us, gains[p], code, rr_all[off[p]:off[p + 1]].reshape((m_per, n_sites)))
        _layer_input(x[b], ws[0], idxs[0], n_pixels, channels, dt(1.0 / mults[0]), xg,
                     ff_all[off[0]:off[1]].reshape((dims[0, 0], dims[0, 1])))
        for p in range(1, n_layers):
            if from_rest:  # f(0) = 0 for every rate function: the maps of zero rates are zero
                ff_all[off[p]:off[p + 1]] = 0
                continue
            _layer_input(rr_all[off[p - 1]:off[p]], ws[p], idxs[p], dims[p - 1, 1], dims[p - 1, 0],
                         dt(1.0 / mults[p]), xg, ff_all[off[p]:off[p + 1]].reshape((dims[p, 0], dims[p, 1])))
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
                _add(ff, fb, bb)
                f2s[p], u2s[p] = _site_field(bb, us_all[off[p]:off[p + 1]].reshape((m_per, n_sites)),
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
            stop = _stop_status(res, u_norm, tol, atol, n, cap, cap_first)
            if stop >= 0:  # (the torch loop evaluates this last step too: one evaluation)
                status[b] = stop
                n_evals += 1
                break
            sweep_evals = 1
            if method == METHOD_EULER:  # u ← u + dt_n F(u) on every layer, then the inputs at the new state
                _euler_sites(us_all.reshape((1, n_all)), fs_all.reshape((1, n_all)), dts[n], tau,
                             un_all.reshape((1, n_all)))
                for p in range(n_layers):
                    _site_rates(un_all[off[p]:off[p + 1]].reshape((dims[p, 0], dims[p, 1])), gains[p], code,
                                rr_all[off[p]:off[p + 1]].reshape((dims[p, 0], dims[p, 1])))
                for p in range(1, n_layers):
                    _layer_input(rr_all[off[p - 1]:off[p]], ws[p], idxs[p], dims[p - 1, 1], dims[p - 1, 0],
                                 dt(1.0 / mults[p]), xg, ff_all[off[p]:off[p + 1]].reshape((dims[p, 0], dims[p, 1])))
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
                    box = box_all[off[p]:off[p + 1]].reshape((m_per, n_sites))
                    fp = fp_all[off[p]:off[p + 1]].reshape((m_per, n_sites))
                    jac = jac_all[joff[p]:joff[p + 1]].reshape((m_per, m_per, n_sites))
                    f2, u2 = f2s[p], u2s[p]
                    if p > 0:  # the layer below has moved: its new feed-forward input (kept for the next test)
                        ff = ff_all[off[p]:off[p + 1]].reshape((m_per, n_sites))
                        _layer_input(rr_all[off[p - 1]:off[p]], ws[p], idxs[p], dims[p - 1, 1], dims[p - 1, 0],
                                     dt(1.0 / mults[p]), xg, ff)
                        fb = fb_all[off[p]:off[p + 1]].reshape((m_per, n_sites))
                        _add(ff, fb, bb)
                        f2, u2 = _site_field(bb, us, rr, a, fs)
                    for i in range(m_per):  # the tanh box of this layer's input b_p
                        for s in range(n_sites):
                            box[i, s] = abs(bb[i, s]) + row[i, s]
                    # Newton steps on this layer (b_p fixed): one per sweep, or (inner) until
                    # ‖F_p‖/‖u_p‖ < inner_tol or inner_max; the first sweep's first step is Picard's
                    # u_p ← u_p + τF_p = b_p + s·A_p f(u_p)
                    wk = wk_all[off[p]:off[p + 1]].reshape((m_per, n_sites))
                    un[:, :] = us
                    used = 0
                    n_inner = inner_max if inner else 1
                    for j in range(n_inner):
                        if j > 0:  # τF_p at the inner iterate (its rates are in rr)
                            f2, u2 = _site_field(bb, un, rr, a, fs)
                        used += 1
                        if inner and np.sqrt(f2) / tau / max(np.sqrt(u2), 1e-12) < inner_tol:
                            break
                        if picard and j == 0:
                            for i in range(m_per):
                                for s in range(n_sites):
                                    un[i, s] = un[i, s] + fs[i, s]
                        else:
                            _newton_sites(un, rr, fs, a, box, gains[p], code, big, fp, jac, piv[:n_sites],
                                          best[:n_sites], fac[:n_sites], wk)
                            if n >= damp_after or j >= damp_after:
                                _half_step(un, wk)
                            un[:, :] = wk
                        if j + 1 < n_inner:
                            _site_rates(un, gains[p], code, rr)
                    sweep_evals = max(sweep_evals, used)
                    _site_rates(un, gains[p], code, rr)  # the new rates feed the layer above
            n_evals += sweep_evals
            if _diverged(res, un_all.reshape((1, n_all)), bound):
                status[b] = _DIVERGED
                break
            us_all[:] = un_all
            n += 1
        steps[b] = n
        for p in range(n_layers):  # the returned state and its rates f(g_p u_p)
            m_per, n_sites = dims[p, 0], dims[p, 1]
            us = us_all[off[p]:off[p + 1]].reshape((m_per, n_sites))
            rr = rr_all[off[p]:off[p + 1]].reshape((m_per, n_sites))
            _site_rates(us, gains[p], code, rr)
            for s in range(n_sites):
                for i in range(m_per):
                    u[b, off[p] + s * m_per + i] = us[i, s]
                    r[b, off[p] + s * m_per + i] = rr[i, s]
    return n_evals


@_jit
def _add(ff, fb, bb):
    """``b_p = ff + fb``: layer p's input from below and from above."""
    for i in range(ff.shape[0]):
        for s in range(ff.shape[1]):
            bb[i, s] = ff[i, s] + fb[i, s]


@_jit
def _half_step(us, un):
    """``un ← u + (un − u)/2``: the damped Newton step of :class:`~dynsim.solvers.BlockNewton`
    (the difference in float64, rounded once)."""
    for i in range(us.shape[0]):
        for s in range(us.shape[1]):
            un[i, s] = us[i, s] + (float(un[i, s]) - us[i, s]) / 2


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
    return compiled.inputs_fit(system, x, u0)


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
    code = method_code(method, "block", picard_start=picard_start, activation=system.activation, cap=cap, dts=dts)
    ws, idxs, lats, n_pixels, channels, dims = _arrays(system)
    dtype = system.layers[0].ff.weight.dtype
    npt = np.float32 if dtype == torch.float32 else np.float64
    dts = np.zeros(1, dtype=npt) if dts is None else np.asarray(dts, dtype=npt)
    xs = x.detach().to(dtype).contiguous().numpy()
    loop = (
        ws, idxs, lats, n_pixels, channels, dims,
        np.asarray(system.gains, dtype=np.float64), np.asarray(system.mult_factors, dtype=np.float64),
        float(system.gamma), npt(system.lateral_sign), float(system.tau), _activation_code(system.activation, dtype),
        code, dts, int(damp_after), -1.0 if inner_tol is None else float(inner_tol), int(inner_max),
        system.layer_stop == "each",
        -1.0 if tol is None else float(tol), 0.0 if tol is None else float(atol),
        -1 if cap is None else int(cap), bool(cap_first), float(max_state_norm * math.sqrt(system.state_size)),
        float(torch.finfo(dtype).max), u0 is None,
    )
    outs = loop_outputs(x.shape[0], system.state_size, dtype, u0)
    arrays = [o.numpy() for o in outs]

    def rows(lo: int, hi: int) -> int:
        return _deep_kernel(xs[lo:hi], *loop, *(o[lo:hi] for o in arrays))

    return (*outs, in_threads(rows, x.shape[0]))


def _block(solver) -> dict:
    return {"method": "block", "picard_start": solver.picard_start, "damp_after": solver.damp_after,
            "inner_tol": solver.inner_tol, "inner_max": solver.inner_max}


def settle_backend(system, x: torch.Tensor, u0: torch.Tensor | None, solver, limits: StopLimits | None,
                   max_state_norm: float):
    """:func:`dynsim.settle` of a deep network on the compiled loop, or ``None`` where it does not apply.

    It applies to :class:`~dynsim.solvers.BlockNewton` and to :class:`~dynsim.solvers.Euler` with a
    step cap, a stop rule with limits on the field residual and a cap > 0 (the one-layer loop's
    :func:`dynsim.compiled.kernel_settings`), and a network and tensors that :func:`can_settle` accepts.
    """
    from dynsim.solvers import BlockNewton

    settings = kernel_settings(solver, limits, max_state_norm, newton=(BlockNewton, _block))
    if settings is None or not can_settle(system, x, u0):
        return None
    return settle_deep(system, x, u0, **settings)
