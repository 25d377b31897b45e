"""Deep settling cost: a 2-layer network (block solver) against one layer of the same first layer.

Issue-16 target: settling a 2-layer network to the same residual costs at most 3× settling
its first layer alone, per image, at batch 1 and at batch 1000, measured in one run.

A 2-layer network (NpS 4,4, stride 2,1, radius 4,2, feedback γ) is trained online for
``--train-images`` images with the block solver; "one layer" is that network's trained
first layer alone (the same ``HebbianLayer`` object, input ``W_1 x``). Every method settles
the same ``--inputs`` test images from rest to ‖du/ds‖/‖u‖ < T (deep: every layer's own
residual below T, the authors' test, which implies the whole state's); the table gives
ms per image (median of ``--repeats``), mean steps, the largest final residual and the ratio
to one layer. Rows:

* 1 layer, ``newton`` (default ``auto``: per-site Newton, compiled CPU loop)
* 1 layer, ``newton`` on the torch path (``DYNSIM_COMPILED=0``; the deep net's backend)
* 2 layers, ``block`` (Gauss–Seidel over layers, per-site Newton; what ``auto`` picks)
* 2 layers, ``euler`` (the seed's schedule: the only deep method before issue 16; fewer images)

    PYTHONPATH=. python benchmarks/deep_settle.py --out benchmarks/results/deep_settle_fashion.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from dynsim import compiled, settle
from dynsim.builders import build_system, epoch_batches, prepare_data
from dynsim.engine import DynamicsSettler, Engine
from dynsim.pipelines.dssm import DSSMConfig
from dynsim.plasticity.deep import DeepSimilarityMatchingRule
from dynsim.results import write_json_atomic
from dynsim.solvers import BlockNewton, Euler, SiteNewton
from dynsim.stopping import stop_rule


def timed(fn, repeats):
    """Median wall time of ``repeats`` calls after one untimed warm-up call (numba's compile/cache load)."""
    fn()
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def settle_each(system, x, solver, stop):
    """Batch 1: every image alone; returns (mean steps, max residual, all converged)."""
    steps, res, ok = [], [], True
    for i in range(x.shape[0]):
        r = settle(system, x[i : i + 1], solver=solver, stop=stop)
        steps.append(float(r.steps[0]))
        res.append(float(r.residual[0]))
        ok &= bool(r.converged.all())
    return sum(steps) / len(steps), max(res), ok


def settle_batch(system, x, solver, stop):
    r = settle(system, x, solver=solver, stop=stop)
    return float(r.steps.float().mean()), float(r.residual.max()), bool(r.converged.all())


def train_deep(config, x_train, images):
    net = build_system(config, (1, 28, 28))
    rule = DeepSimilarityMatchingRule(net, lateral_rule=config.lateral_rule)
    stop = stop_rule(config.threshold, config.max_steps)
    engine = Engine(DynamicsSettler(net, BlockNewton(), stop), [rule], progress=False)
    with torch.no_grad():
        engine.fit(epoch_batches(x_train, images=images, batch_size=1, seed=config.seed), 1)
    return net


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--gammas", default="0,0.1", help="feedback strengths to measure (0: the authors' default)")
    p.add_argument("--mult-factors", default="1,1", help="m_1,m_2 (1,1: the authors' default)")
    p.add_argument("--train-images", type=int, default=1000)
    p.add_argument("--inputs", type=int, default=100, help="test images settled at batch 1")
    p.add_argument("--batch", type=int, default=1000, help="test images settled as one batch")
    p.add_argument("--euler-inputs", type=int, default=20, help="images for the 2-layer Euler row (batch 1)")
    p.add_argument("--threshold", type=float, default=1e-4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/deep_settle.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    load = os.getloadavg()
    stop = stop_rule(a.threshold, 3000)
    mult = [float(v) for v in a.mult_factors.split(",")]
    base = DSSMConfig(data=a.data, layers=2, nps=[4, 4], stride=[2, 1], radius=[4.0, 2.0], threshold=a.threshold,
                      mult_factors=mult)
    _, x_train, x_test = prepare_data(base)
    x_train, x_test = (torch.as_tensor(v, dtype=torch.float32) for v in (x_train, x_test))
    x1, xb = x_test[: a.inputs], x_test[: a.batch]
    rows = []
    for gamma in [float(v) for v in a.gammas.split(",")]:
        config = DSSMConfig(**{**base.__dict__, "gamma": gamma})
        t0 = time.perf_counter()
        net = train_deep(config, x_train, a.train_images)
        train_s = time.perf_counter() - t0
        one = net.layers[0]  # W_1 x / m_1 is the deep net's layer-1 drive only for m_1 = 1
        if mult[0] != 1.0:
            raise SystemExit("--mult-factors: m_1 must be 1 so that the first layer alone is the same system")
        methods = [
            ("1 layer, newton (compiled)", one, SiteNewton(), None, x1),
            ("1 layer, newton (torch path)", one, SiteNewton(), "torch", x1),
            ("2 layers, block", net, BlockNewton(), None, x1),
            ("2 layers, euler (seed schedule)", net, Euler(), None, x1[: a.euler_inputs]),
        ]
        with torch.no_grad():
            for name, system, solver, path, x in methods:
                for batch in (1, a.batch):
                    xs = x if batch == 1 else xb
                    if "euler" in name and batch > 1:
                        continue
                    fn = (lambda s=system, v=xs, sv=solver: settle_each(s, v, sv, stop)) if batch == 1 else (
                        lambda s=system, v=xs, sv=solver: settle_batch(s, v, sv, stop))
                    if path == "torch":
                        with compiled.disabled():
                            sec, (steps, res, ok) = timed(fn, a.repeats)
                    else:
                        sec, (steps, res, ok) = timed(fn, a.repeats)
                    rows.append({"gamma": gamma, "method": name, "batch": batch, "images": xs.shape[0],
                                 "ms_per_image": 1e3 * sec / xs.shape[0], "mean_steps": steps,
                                 "max_residual": res, "all_converged": ok, "train_seconds": train_s})
                    print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        ref = next(q for q in rows if q["gamma"] == r["gamma"] and q["batch"] == r["batch"]
                   and q["method"].startswith("1 layer, newton (compiled)"))
        ref_t = next(q for q in rows if q["gamma"] == r["gamma"] and q["batch"] == r["batch"]
                     and q["method"].startswith("1 layer, newton (torch"))
        r["vs_one_layer_compiled"] = r["ms_per_image"] / ref["ms_per_image"]
        r["vs_one_layer_torch"] = r["ms_per_image"] / ref_t["ms_per_image"]
    print(f"\nload average {load[0]:.1f}; T = {a.threshold}; {a.train_images} training images\n")
    print("| γ | method | batch | ms/image | mean steps | max residual | × 1 layer (compiled) | × 1 layer (torch) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['gamma']:g} | {r['method']} | {r['batch']} | {r['ms_per_image']:.3f} | {r['mean_steps']:.1f} "
              f"| {r['max_residual']:.1e} | {r['vs_one_layer_compiled']:.2f} | {r['vs_one_layer_torch']:.2f} |")
    write_json_atomic(Path(a.out), {"benchmark": "deep_settle", "args": vars(a), "load_average": load,
                                    "machine": platform.machine(), "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
