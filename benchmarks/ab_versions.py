"""Two versions of dynsim in one process, timed interleaved: did a refactoring change the speed?

On a shared machine, timings of two separate runs drift with the load by more than the few
per cent a refactoring may cost. This script imports two checkouts side by side (each
``DIR/dynsim`` copied to a temporary package ``dynsim_a`` / ``dynsim_b`` with its imports
renamed), runs the same settle/update cases on both, alternating which goes first, and
reports per case the ratio ``b / a`` of thread CPU times (min over ``--repeats``, and the
median of the paired ratios). Same layer, same inputs; solvers built from the public API
that both versions share.

Usage::

    git worktree add /tmp/old <commit>      # or any copy of an older checkout
    PYTHONPATH=. python benchmarks/ab_versions.py --a /tmp/old --b . --out runs/ab.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

_IMPORTS = re.compile(r"\bfrom dynsim\b|\bimport dynsim\b|\bdynsim\.(?=[a-z_])")


def load_as(src: Path, name: str, into: Path):
    """``src/dynsim`` as the package ``name`` (a renamed copy under ``into``)."""
    dst = into / name
    shutil.copytree(src / "dynsim", dst, ignore=shutil.ignore_patterns("__pycache__"))
    for py in dst.rglob("*.py"):
        text = py.read_text()
        text = _IMPORTS.sub(lambda m: m.group(0).replace("dynsim", name), text)
        py.write_text(text)
    return importlib.import_module(name)


def cases(xs: torch.Tensor):
    def each(n, make):
        return lambda m, layer, stop: [m.settle(layer, x[None], solver=make(m), stop=stop) for x in xs[:n]]

    return {
        "newton, compiled, batch 1": (each(40, lambda m: m.SiteNewton()), False),
        "euler (seed), compiled, batch 1": (each(20, lambda m: m.Euler()), False),
        "newton, compiled, batch 200": (
            lambda m, layer, stop: m.settle(layer, xs.repeat(5, 1), solver=m.SiteNewton(), stop=stop), False),
        "newton, torch, batch 1": (each(20, lambda m: m.SiteNewton()), True),
        "euler (seed), torch, batch 1": (each(4, lambda m: m.Euler()), True),
        "heun (dt 0.8), torch, batch 1": (each(10, lambda m: m.Heun(m.ConstantStep(0.8))), True),
        "rk4 (dt 1.0), torch, batch 1": (each(10, lambda m: m.RK4(m.ConstantStep(1.0))), True),
        "dopri5 (1e-5), torch, batch 1": (each(10, lambda m: m.Dopri5(rtol=1e-5, atol=1e-7)), True),
        "anderson (0.5), torch, batch 1": (each(20, lambda m: m.Anderson(beta=0.5)), True),
        "hebbian update, batch 1 (x40)": (
            lambda m, layer, stop: [m.plasticity.hebbian_update(layer, x[None], torch.tanh(x[None]), 1e-9)
                                    for x in xs], False),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", required=True, help="checkout directory of version a (the baseline)")
    p.add_argument("--b", required=True, help="checkout directory of version b")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default="runs/ab_versions.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="dynsim_ab_"))
    sys.path.insert(0, str(tmp))
    mods = {"a": load_as(Path(args.a), "dynsim_a", tmp), "b": load_as(Path(args.b), "dynsim_b", tmp)}
    importlib.import_module("dynsim_a.plasticity"), importlib.import_module("dynsim_b.plasticity")
    xs = torch.rand(40, 784, generator=torch.Generator().manual_seed(0))
    xs -= xs.mean(1, keepdim=True)
    setups = {}
    for key, m in mods.items():
        layer = m.HebbianLayer((1, 28, 28), nps=4)
        stop = m.RelativeChange(1e-4) | m.MaxSteps(3000)
        m.settle(layer, xs[:2], solver=m.SiteNewton(), stop=stop)  # compile or load the kernels
        m.settle(layer, xs[:2], solver=m.Euler(), stop=stop)
        m.plasticity.hebbian_update(layer, xs[:1], torch.tanh(xs[:1]), 1e-9)
        setups[key] = (m, layer, stop)
    table = cases(xs)
    times = {name: {"a": [], "b": []} for name in table}
    for r in range(args.repeats):
        for name, (fn, torch_path) in table.items():
            for key in ("a", "b") if r % 2 == 0 else ("b", "a"):
                m, layer, stop = setups[key]
                with m.compiled.disabled() if torch_path else contextlib.nullcontext():
                    t0 = time.thread_time()
                    fn(m, layer, stop)
                    times[name][key].append(time.thread_time() - t0)
    rows = {}
    print("| case | a ms (min) | b ms (min) | b/a (min) | b/a (median of paired) |")
    print("|---|---:|---:|---:|---:|")
    for name, t in times.items():
        a, b = min(t["a"]), min(t["b"])
        paired = statistics.median(tb / ta for ta, tb in zip(t["a"], t["b"], strict=True))
        rows[name] = {"a_min_s": a, "b_min_s": b, "ratio_min": b / a, "ratio_paired_median": paired}
        print(f"| {name} | {1e3 * a:.2f} | {1e3 * b:.2f} | {b / a:.3f} | {paired:.3f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"a": args.a, "b": args.b, "repeats": args.repeats, "rows": rows}, indent=2))
    print("wrote", out)
    shutil.rmtree(tmp, ignore_errors=True)
    return rows


if __name__ == "__main__":
    main()
