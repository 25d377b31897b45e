"""Forms of the per-site product ``L_k x`` (M × M, float32) that the compiled Newton–CG kernel runs
~10,000 times an image at NpS 100, each block in cache (as in its CG iterations).

Rows, all in one run on the same blocks (196 symmetric blocks of NpS × NpS; ``--layer`` a saved
layer's ``state_dict``, else ``L = 0.3 I + G Gᵀ / (3M)`` with random ``G``, positive definite as the
Hebbian rule keeps it):

* ``dot4`` — the dot-product form (four rows of the block against ``x``, then horizontal sums):
  the kernel's product before issue 15's session 8; the baseline;
* ``axpy4`` — ``Σ_j x_j L[j, :]`` four block rows per pass over ``out``: valid because ``L_k`` is
  symmetric; :func:`dynsim.compiled_cg._matvec` (the row that must match the library);
* ``dot4-2rhs`` / ``axpy4-2rhs`` — both forms with two right-hand sides per pass: ``axpy4-2rhs``
  is :func:`dynsim.compiled_cg._matvec2`, the product of two inputs' CG in lockstep (the library's
  pairs).

Each product is repeated ``--inner`` times per block visit (CG's iterations on a block in cache);
the table gives µs per product and the rate against ``dot4``, with the max error against float64.

    PYTHONPATH=. python benchmarks/matvec_forms.py --out benchmarks/results/matvec_forms.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dynsim.compiled import _jit  # noqa: E402
from dynsim.compiled_cg import _matvec, _matvec2  # noqa: E402


@_jit
def dot4(lat_s, x, out):
    """``out = L x`` as four dot products at a time (the kernel's form before session 8)."""
    m = x.shape[0]
    zero = x.dtype.type(0)
    i = 0
    while i + 4 <= m:
        a0 = zero
        a1 = zero
        a2 = zero
        a3 = zero
        for j in range(m):
            xj = x[j]
            a0 += lat_s[i, j] * xj
            a1 += lat_s[i + 1, j] * xj
            a2 += lat_s[i + 2, j] * xj
            a3 += lat_s[i + 3, j] * xj
        out[i] = a0
        out[i + 1] = a1
        out[i + 2] = a2
        out[i + 3] = a3
        i += 4
    while i < m:
        acc = zero
        for j in range(m):
            acc += lat_s[i, j] * x[j]
        out[i] = acc
        i += 1


@_jit
def dot4_2rhs(lat_s, x, ox, y, oy):
    """:func:`dot4` for two right-hand sides, each block entry loaded once for both."""
    m = x.shape[0]
    zero = x.dtype.type(0)
    i = 0
    while i + 4 <= m:
        a0 = zero
        a1 = zero
        a2 = zero
        a3 = zero
        b0 = zero
        b1 = zero
        b2 = zero
        b3 = zero
        for j in range(m):
            xj = x[j]
            yj = y[j]
            l0 = lat_s[i, j]
            l1 = lat_s[i + 1, j]
            l2 = lat_s[i + 2, j]
            l3 = lat_s[i + 3, j]
            a0 += l0 * xj
            a1 += l1 * xj
            a2 += l2 * xj
            a3 += l3 * xj
            b0 += l0 * yj
            b1 += l1 * yj
            b2 += l2 * yj
            b3 += l3 * yj
        ox[i] = a0
        ox[i + 1] = a1
        ox[i + 2] = a2
        ox[i + 3] = a3
        oy[i] = b0
        oy[i + 1] = b1
        oy[i + 2] = b2
        oy[i + 3] = b3
        i += 4
    while i < m:
        acc = zero
        acc2 = zero
        for j in range(m):
            acc += lat_s[i, j] * x[j]
            acc2 += lat_s[i, j] * y[j]
        ox[i] = acc
        oy[i] = acc2
        i += 1


@_jit
def _sweep1(fn, lat, x, out, inner, reps):
    for _ in range(reps):
        for s in range(lat.shape[0]):
            for _k in range(inner):
                fn(lat[s], x[s], out[s])
                x[s, 0] = out[s, 1] * 1e-6  # a dependence, so no product is skipped


@_jit
def _sweep2(fn, lat, x, y, ox, oy, inner, reps):
    for _ in range(reps):
        for s in range(lat.shape[0]):
            for _k in range(inner):
                fn(lat[s], x[s], ox[s], y[s], oy[s])
                x[s, 0] = ox[s, 1] * 1e-6


def _blocks(args) -> np.ndarray:
    if args.layer:
        return np.ascontiguousarray(torch.load(args.layer)["lateral.weight"].numpy().astype(np.float32))
    rng = np.random.default_rng(0)
    g = np.tanh(rng.standard_normal((args.sites, args.nps, 3 * args.nps)))
    lat = 0.3 * np.eye(args.nps) + g @ g.transpose(0, 2, 1) / (3 * args.nps)
    return np.ascontiguousarray(((lat + lat.transpose(0, 2, 1)) / 2).astype(np.float32))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layer", default=None, help="a saved HebbianLayer state_dict (its lateral blocks)")
    p.add_argument("--nps", type=int, default=100)
    p.add_argument("--sites", type=int, default=196)
    p.add_argument("--inner", type=int, default=20, help="products per block visit")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (the table gives the median)")
    p.add_argument("--out", default="runs/matvec_forms.json")
    args = p.parse_args(argv)
    lat = _blocks(args)
    sites, m, _ = lat.shape
    rng = np.random.default_rng(1)
    x = rng.random((sites, m)).astype(np.float32)
    y = rng.random((sites, m)).astype(np.float32)
    ref = np.einsum("sij,sj->si", lat.astype(np.float64), x.astype(np.float64))
    one = {"dot4": dot4, "axpy4": _matvec}
    two = {"dot4-2rhs": dot4_2rhs, "axpy4-2rhs": _matvec2}
    times: dict[str, list[float]] = {k: [] for k in (*one, *two)}
    errors = {}
    for name, fn in one.items():  # compile, and the error against float64
        out = np.empty_like(x)
        _sweep1(fn, lat, x.copy(), out, 1, 1)
        for s in range(sites):
            fn(lat[s], x[s], out[s])
        errors[name] = float(np.abs(out - ref).max())
    for name, fn in two.items():
        ox, oy = np.empty_like(x), np.empty_like(x)
        _sweep2(fn, lat, x.copy(), y, ox, oy, 1, 1)
        for s in range(sites):
            fn(lat[s], x[s], ox[s], y[s], oy[s])
        errors[name] = float(np.abs(ox - ref).max())
    n_products = args.reps * args.inner * sites
    for _ in range(args.repeats):
        for name, fn in one.items():
            out = np.empty_like(x)
            t0 = time.perf_counter()
            _sweep1(fn, lat, x.copy(), out, args.inner, args.reps)
            times[name].append((time.perf_counter() - t0) / n_products)
        for name, fn in two.items():
            ox, oy = np.empty_like(x), np.empty_like(x)
            t0 = time.perf_counter()
            _sweep2(fn, lat, x.copy(), y, ox, oy, args.inner, args.reps)
            times[name].append((time.perf_counter() - t0) / (2 * n_products))  # per product
    base = float(np.median(times["dot4"]))
    rows = []
    for name, ts in times.items():
        med = float(np.median(ts))
        rows.append({"form": name, "us_per_product": med * 1e6, "gmac_per_s": m * m / med / 1e9,
                     "rate_vs_dot4": base / med, "max_abs_error_vs_float64": errors[name],
                     "us_per_product_each_repeat": [t * 1e6 for t in ts]})
    lines = ["| form | µs / product | GMAC/s | × dot4 | max error |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['form']} | {r['us_per_product']:.3f} | {r['gmac_per_s']:.1f} | {r['rate_vs_dot4']:.2f} "
              f"| {r['max_abs_error_vs_float64']:.1e} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    command = "PYTHONPATH=. python benchmarks/matvec_forms.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"command": command, "settings": vars(args), "blocks": [sites, m, m], "threads": 1,
              "machine": platform.platform(), "load_average": os.getloadavg(), "rows": rows, "table": table}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
