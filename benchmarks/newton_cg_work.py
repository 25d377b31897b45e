"""Issue 15: where Newton–CG's work goes on a *trained* large-NpS layer — Newton steps and CG iterations per image.

Settles ``--images`` test images (batch = all, stop ``‖F‖/‖u‖ < 1e-4``, cap 3000) on a layer saved by
``nps100.py --warm-epochs 15 --load-layer PATH`` (trained as a ``study nps`` cell trains), with the
torch Newton–CG step (compiled kernels off: the same iteration as the kernel, but instrumented),
for each variant of the three choices this session measured:

* ``merit``: ``residual`` (the line search on ``½‖F_k‖²`` from step 12) or ``energy`` (on ``Φ_k``,
  every step; :func:`dynsim.solvers.newton.energy_line_search`);
* ``start``: ``picard`` (one Picard step first) or ``rest`` (Newton from ``u = 0``);
* ``guard``: CG's tolerance with or without the oversolving guard ``η ≥ ½·T/ρ``
  (:func:`dynsim.solvers.newton_cg.newton_cg_step`'s ``target``).

Reported per variant: Newton steps (mean / max), converged fraction, **CG iterations per image summed
over sites** (``site_cg``'s per-site counts: the compiled kernel's per-site matrix–vector products
beyond one field evaluation per step; an upper bound of the kernel's, since the torch step also
runs CG for the sites its line search then sends back, which the kernel skips), seconds of the
torch path (not the kernel's; the kernel's seconds are ``nps100.py``'s), and the largest relative
distance of the settled states to the first variant's.

Example::

    PYTHONPATH=. python benchmarks/nps100.py --nps 100 --solvers newton-cg --warm-epochs 15 --no-readout \\
        --load-layer runs/layer{nps}_e15.pt --out runs/nps100_trained.json   # trains and saves the layer once
    PYTHONPATH=. python benchmarks/newton_cg_work.py --nps 100 --layer runs/layer100_e15.pt \\
        --out benchmarks/results/newton_cg_work_100.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

VARIANTS = "residual:picard:noguard,residual:picard:guard,energy:picard:guard,residual:rest:guard,energy:rest:guard"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nps", type=int, default=100)
    p.add_argument("--layer", required=True, help="a state_dict saved by nps100.py --load-layer")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--variants", default=VARIANTS, help="MERIT:START:GUARD, comma-separated")
    p.add_argument("--out", default="runs/newton_cg_work.json")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    from dynsim import compiled, settle, stop_rule
    from dynsim.builders import build_layer, prepare_data
    from dynsim.configs.dssm import DSSMConfig
    from dynsim.solvers import SiteNewtonCG
    from dynsim.solvers import newton_cg as ncg

    if not Path(args.layer).exists():
        raise SystemExit(f"--layer {args.layer}: no such file (save one with nps100.py --load-layer)")
    cfg = DSSMConfig(data=args.data, nps=args.nps)
    ds, _, xte = prepare_data(cfg)
    layer = build_layer(cfg, ds.image_shape)
    layer.load_state_dict(torch.load(args.layer))
    x = torch.as_tensor(xte[: args.images])
    count = {"cg": 0}
    real_cg, real_step = ncg.site_cg, ncg.newton_cg_step

    def counting_cg(*a, **k):
        v, iters, failed = real_cg(*a, **k)
        count["cg"] += int(iters.sum())
        return v, iters, failed

    rows, first = [], None
    for spec in args.variants.split(","):
        merit, start, guard = spec.split(":")
        if merit not in ("residual", "energy") or start not in ("picard", "rest") or guard not in ("guard", "noguard"):
            raise SystemExit(f"bad variant {spec!r}: MERIT (residual|energy):START (picard|rest):GUARD (guard|noguard)")
        ncg.site_cg = counting_cg
        ncg.newton_cg_step = real_step if guard == "guard" else (
            lambda *a, **k: real_step(*a, **{**k, "target": None}))
        count["cg"] = 0
        t0 = time.perf_counter()
        with compiled.disabled():
            res = settle(layer, x, solver=SiteNewtonCG(picard_start=start == "picard", merit=merit),
                         stop=stop_rule(1e-4, 3000))
        seconds = time.perf_counter() - t0
        ncg.site_cg, ncg.newton_cg_step = real_cg, real_step
        first = res.u if first is None else first
        dist = (torch.linalg.vector_norm(res.u - first, dim=1) / torch.linalg.vector_norm(first, dim=1)).max()
        steps = res.steps.double()
        row = {"variant": spec, "mean_steps": float(steps.mean()), "max_steps": int(steps.max()),
               "converged": float((res.status == 1).double().mean()), "cg_iterations_per_image": count["cg"] / len(x),
               "torch_seconds_per_image": seconds / len(x), "max_rel_state_distance_to_first": float(dist)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    head = ("| merit:start:guard | Newton steps (mean / max) | converged | CG iterations / image | torch s / image "
            "| max state dist |")
    lines = [head, "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['mean_steps']:.2f} / {r['max_steps']} | {r['converged']:.2f} "
                     f"| {r['cg_iterations_per_image']:.0f} | {r['torch_seconds_per_image']:.4f} "
                     f"| {r['max_rel_state_distance_to_first']:.1e} |")
    table = "\n".join(lines)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "load_average": os.getloadavg(), "rows": rows,
                                          "table": table}, indent=1) + "\n")


if __name__ == "__main__":
    main()
