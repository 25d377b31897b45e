"""Two versions of dynsim in one process, timed interleaved: did a refactoring change the speed?

On a shared machine, timings of two separate runs drift with the load by more than the few
per cent a refactoring may cost. This script imports two checkouts side by side (each
``DIR/dynsim`` copied to a temporary package ``dynsim_a`` / ``dynsim_b`` with its imports
renamed), runs the same settle/update cases on both, alternating which goes first, and
reports per case the ratio ``b / a`` of thread CPU times (min over ``--repeats``, and the
median of the paired ratios). Same layer (b gets a's weights), same inputs; solvers built from
the public API that both versions share. Each settle case also says whether the two versions
gave the same numbers (states bit for bit, steps, statuses, evaluation counts).

``--deep`` adds a 2-layer :class:`~dynsim.systems.deep.DeepHebbianNet` (NpS 4,4, stride 2,1,
radius 4,2, γ = 0 and γ = 0.2; the compiled deep loop, ``dynsim.compiled_deep``) beside the
one-layer cases; ``--only`` keeps the cases whose name contains one of its comma-separated words.

Usage::

    git worktree add /tmp/old <commit>      # or any copy of an older checkout
    PYTHONPATH=. python benchmarks/ab_versions.py --a /tmp/old --b . --out runs/ab.json
    PYTHONPATH=. python benchmarks/ab_versions.py --a /tmp/old --b . --deep --only "compiled, batch" \
        --out runs/ab_deep.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
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


def cases(xs: torch.Tensor, deep: bool = False):
    def each(n, make, system="one"):
        return lambda m, s, stop: [m.settle(s[system], x[None], solver=make(m), stop=stop) for x in xs[:n]]

    def block(m):
        return m.solvers.BlockNewton(inner_tol=1e-4)

    table = {
        "newton, compiled, batch 1": (each(40, lambda m: m.SiteNewton()), False),
        "euler (seed), compiled, batch 1": (each(20, lambda m: m.Euler()), False),
        "newton, compiled, batch 200": (
            lambda m, s, stop: m.settle(s["one"], xs.repeat(5, 1), solver=m.SiteNewton(), stop=stop), False),
        "newton, torch, batch 1": (each(20, lambda m: m.SiteNewton()), True),
        "euler (seed), torch, batch 1": (each(4, lambda m: m.Euler()), True),
        "heun (dt 0.8), torch, batch 1": (each(10, lambda m: m.Heun(m.ConstantStep(0.8))), True),
        "rk4 (dt 1.0), torch, batch 1": (each(10, lambda m: m.RK4(m.ConstantStep(1.0))), True),
        "dopri5 (1e-5), torch, batch 1": (each(10, lambda m: m.Dopri5(rtol=1e-5, atol=1e-7)), True),
        "anderson (0.5), torch, batch 1": (each(20, lambda m: m.Anderson(beta=0.5)), True),
        "hebbian update, batch 1 (x40)": (
            lambda m, s, stop: [m.plasticity.hebbian_update(s["one"], x[None], torch.tanh(x[None]), 1e-9)
                                for x in xs], False),
    }
    if deep:
        table.update({
            "2 layers, block inner_tol=T, compiled, batch 1": (each(40, block, "deep"), False),
            "2 layers γ 0.2, block inner_tol=T, compiled, batch 1": (each(40, block, "deep_fb"), False),
            "2 layers, block one step per sweep, compiled, batch 1": (
                each(40, lambda m: m.solvers.BlockNewton(), "deep"), False),
            "2 layers, euler (seed), compiled, batch 1": (each(10, lambda m: m.Euler(), "deep"), False),
            "2 layers g 1,0.7 m 1,5 γ 0.1, block inner_tol=T, compiled, batch 1": (each(20, block, "deep_gm"), False),
            "2 layers γ 0.2, block inner_tol=T, compiled, batch 200": (
                lambda m, s, stop: m.settle(s["deep_fb"], xs.repeat(5, 1), solver=block(m), stop=stop), False),
        })
    return table


def systems(m, deep: bool) -> dict:
    """The systems the cases settle, built with torch's seed 0: ``one`` (a 28×28 NpS-4 layer) and,
    with ``deep``, three 2-layer networks (γ 0, γ 0.2, and γ 0.1 with gains 1, 0.7 and mult
    factors 1, 5)."""
    torch.manual_seed(0)
    out = {"one": m.HebbianLayer((1, 28, 28), nps=4)}
    if deep:
        d = importlib.import_module(m.__name__ + ".systems.deep")
        specs = [d.LayerSpec(nps=4, stride=2, radius=4.0), d.LayerSpec(nps=4, stride=1, radius=2.0)]
        out["deep"] = d.DeepHebbianNet((1, 28, 28), specs, gamma=0.0)
        out["deep_fb"] = d.DeepHebbianNet((1, 28, 28), specs, gamma=0.2)
        out["deep_gm"] = d.DeepHebbianNet((1, 28, 28), specs, gamma=0.1, gains=[1.0, 0.7], mult_factors=[1.0, 5.0])
    return out


def _numbers(out) -> list | None:
    """A settle case's numbers (per call: u, steps, status, n_evals), or None for other cases."""
    calls = out if isinstance(out, list) else [out]
    if not calls or not hasattr(calls[0], "steps"):
        return None
    return [(c.u, c.steps, c.status, c.n_evals) for c in calls]


def same_numbers(a: list | None, b: list | None) -> bool | None:
    """Whether two versions' numbers of one case are identical (states bit for bit)."""
    if a is None or b is None:
        return None
    return len(a) == len(b) and all(torch.equal(ua, ub) and torch.equal(sa, sb) and torch.equal(ta, tb) and ea == eb
                                    for (ua, sa, ta, ea), (ub, sb, tb, eb) in zip(a, b, strict=True))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", required=True, help="checkout directory of version a (the baseline)")
    p.add_argument("--b", required=True, help="checkout directory of version b")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--deep", action="store_true", help="add the 2-layer network's cases")
    p.add_argument("--only", default="", help="comma-separated words: keep the cases whose name holds one")
    p.add_argument("--out", default="runs/ab_versions.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="dynsim_ab_"))
    sys.path.insert(0, str(tmp))
    mods = {"a": load_as(Path(args.a), "dynsim_a", tmp), "b": load_as(Path(args.b), "dynsim_b", tmp)}
    importlib.import_module("dynsim_a.plasticity"), importlib.import_module("dynsim_b.plasticity")
    xs = torch.rand(40, 784, generator=torch.Generator().manual_seed(0))
    xs -= xs.mean(1, keepdim=True)
    setups, initial = {}, {}
    for key, m in mods.items():
        s = systems(m, args.deep)
        if key == "a":  # the same weights in both versions (before the warm-up's Hebbian update)
            initial = {name: {k: v.clone() for k, v in system.state_dict().items()} for name, system in s.items()}
        else:
            for name, system in s.items():
                system.load_state_dict(initial[name])
        stop = m.RelativeChange(1e-4) | m.MaxSteps(3000)
        m.settle(s["one"], xs[:2], solver=m.SiteNewton(), stop=stop)  # compile or load the kernels
        m.settle(s["one"], xs[:2], solver=m.Euler(), stop=stop)
        m.plasticity.hebbian_update(s["one"], xs[:1], torch.tanh(xs[:1]), 1e-9)
        if args.deep:
            m.settle(s["deep"], xs[:2], solver=m.solvers.BlockNewton(inner_tol=1e-4), stop=stop)
            m.settle(s["deep"], xs[:2], solver=m.Euler(), stop=stop)
        setups[key] = (m, s, stop)
    words = [w.strip() for w in args.only.split(",") if w.strip()]
    table = {k: v for k, v in cases(xs, args.deep).items() if not words or any(w in k for w in words)}
    times = {name: {"a": [], "b": []} for name in table}
    numbers = {name: {} for name in table}
    for r in range(args.repeats):
        for name, (fn, torch_path) in table.items():
            for key in ("a", "b") if r % 2 == 0 else ("b", "a"):
                m, s, stop = setups[key]
                with m.compiled.disabled() if torch_path else contextlib.nullcontext():
                    t0 = time.thread_time()
                    out = fn(m, s, stop)
                    times[name][key].append(time.thread_time() - t0)
                if r == 0:
                    numbers[name][key] = _numbers(out)
    rows = {}
    print("| case | a ms (min) | b ms (min) | b/a (min) | b/a (median of paired) | same numbers |")
    print("|---|---:|---:|---:|---:|---|")
    for name, t in times.items():
        a, b = min(t["a"]), min(t["b"])
        paired = statistics.median(tb / ta for ta, tb in zip(t["a"], t["b"], strict=True))
        same = same_numbers(numbers[name]["a"], numbers[name]["b"])
        rows[name] = {"a_min_s": a, "b_min_s": b, "ratio_min": b / a, "ratio_paired_median": paired,
                      "same_numbers": same}
        print(f"| {name} | {1e3 * a:.2f} | {1e3 * b:.2f} | {b / a:.3f} | {paired:.3f} | "
              f"{'–' if same is None else 'yes' if same else 'NO'} |")
    load = os.getloadavg()
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"a": args.a, "b": args.b, "repeats": args.repeats, "deep": args.deep,
                               "load_average": load, "rows": rows}, indent=2))
    print("wrote", out)
    shutil.rmtree(tmp, ignore_errors=True)
    return rows


if __name__ == "__main__":
    main()
