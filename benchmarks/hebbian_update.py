"""The batch-1 Hebbian update: its one torch definition vs the compiled kernel, same run, same weights.

``structured_update`` (dynsim.plasticity.similarity_matching) is the definition of
``W += η (r xᵀ − W)``, ``L += (η/2)(r rᵀ − L)`` on the stored entries; ``dynsim.compiled``
computes the same formula in one numba pass for online (batch-1) learning on CPU. This script
times both on a 28×28 layer (NpS ``--nps``), checks they agree, and prints the ratio
(torch / compiled, > 1: the kernel is faster) with the cost of one online settle beside it
(per-site Newton, compiled), to show what share of an online step the update is.

Usage: PYTHONPATH=. python benchmarks/hebbian_update.py --out runs/hebbian_update.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from dynsim import HebbianLayer, MaxSteps, ResidualBelow, compiled, settle
from dynsim.plasticity import hebbian_update
from dynsim.solvers import SiteNewton


def per_call(fn, n: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean seconds per call over ``n`` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nps", type=int, default=4)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="runs/hebbian_update.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    layer = HebbianLayer((1, 28, 28), nps=args.nps, stride=2, radius=4.0)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 784, generator=gen)
    x -= x.mean()
    stop = ResidualBelow(1e-4) | MaxSteps(3000)
    r = settle(layer, x, solver=SiteNewton(), stop=stop).r
    eta = 1e-6  # tiny, so the weights barely move over thousands of calls
    hebbian_update(layer, x, r, eta)  # compile / load the kernel before timing
    w0, l0 = layer.ff.weight.clone(), layer.lateral.weight.clone()
    with compiled.disabled():
        hebbian_update(layer, x, r, 1e-3)
        w_torch, l_torch = layer.ff.weight.clone(), layer.lateral.weight.clone()
    layer.ff.weight.copy_(w0), layer.lateral.weight.copy_(l0)
    hebbian_update(layer, x, r, 1e-3)
    agree = max(float((layer.ff.weight - w_torch).abs().max()), float((layer.lateral.weight - l_torch).abs().max()))
    layer.ff.weight.copy_(w0), layer.lateral.weight.copy_(l0)

    def torch_update():
        with compiled.disabled():
            hebbian_update(layer, x, r, eta)

    t_torch = per_call(torch_update, args.calls, args.repeats)
    t_kernel = per_call(lambda: hebbian_update(layer, x, r, eta), args.calls, args.repeats)
    t_settle = per_call(lambda: settle(layer, x, solver=SiteNewton(), stop=stop), args.calls // 4, args.repeats)
    rows = {"torch_update_s": t_torch, "compiled_update_s": t_kernel, "ratio": t_torch / t_kernel,
            "compiled_newton_settle_s": t_settle, "max_abs_difference_after_one_update": agree, "nps": args.nps}
    print("batch-1 Hebbian update, 28×28, NpS", args.nps, "(1 thread)")
    print(f"{'torch (structured_update)':28s} {t_torch * 1e6:8.1f} µs")
    print(f"{'compiled kernel':28s} {t_kernel * 1e6:8.1f} µs   ratio {t_torch / t_kernel:.1f}×")
    print(f"{'(one compiled Newton settle)':28s} {t_settle * 1e6:8.1f} µs")
    print(f"weights after one update (η = 1e-3) differ by at most {agree:.1e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print("wrote", out)
    return rows


if __name__ == "__main__":
    main()
