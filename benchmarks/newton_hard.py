"""Issue 15: per-site Newton on a trained NpS 16 layer, plain (old code) against the line search (this tree).

Setup (the lead's ``hard.py``): a NpS 16 layer on Fashion-MNIST (28×28, default DSSMConfig) trained
online on ``--images`` images (batch 1, η = 5e-3, ``newton``, stop ``‖F‖/‖u‖ < 1e-4`` or 3000
steps) with the code in ``--baseline-src`` (the tree before the line search, e.g. ``git archive``
of the merge base; default: this tree), saved to ``--layer`` (reused when it exists). Then the
first ``--settle`` training images are settled, batch = all, from rest, with the same stop rule, by
each row's solver in its own process (1 thread) with that row's code:

* ``newton`` / ``newton-cg``, old (``--baseline-src``) and new (this tree), the default backend
  (the compiled kernels on CPU); ``newton:torch`` / ``newton-cg:torch`` new, with the kernels off;
* ``euler`` (the authors' step schedule, cap 3000) and ``anderson``, this tree.

Reported per row: converged fraction, steps (median / 90th percentile / max), wall seconds, and
the relative distance ``‖u − u_euler‖/‖u_euler‖`` (median / max over the images both converged
on) to Euler's settled state (Euler stops at the same relative residual; the site Jacobians'
eigenvalue nearest 0, about −0.0067 here, turns that residual into a state error of up to ~1e-2).
Also: the eigenvalues of every site's ``L``, and the largest real eigenvalue of the per-site
Jacobian of the field at Euler's and Anderson's fixed points (< 0: stable).

Example::

    git archive <base> | tar -x -C /tmp/base
    PYTHONPATH=. python benchmarks/newton_hard.py --baseline-src /tmp/base --layer runs/nps16_layer.pt \\
        --out benchmarks/results/newton_hard_issue15.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROWS = [  # (label, solver spec, code: "old" or "new", compiled kernels on)
    ("newton old", "newton", "old", True),
    ("newton new", "newton", "new", True),
    ("newton-cg old", "newton-cg", "old", True),
    ("newton-cg new", "newton-cg", "new", True),
    ("newton:torch new", "newton", "new", False),
    ("newton-cg:torch new", "newton-cg", "new", False),
    ("euler", "euler", "new", True),
    ("anderson", "anderson", "new", True),
]
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(images: int, path: str) -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    from dynsim.builders import build_layer, epoch_batches, prepare_data
    from dynsim.configs.dssm import DSSMConfig
    from dynsim.plasticity import hebbian_update
    from dynsim.settle import settle
    from dynsim.solvers import make_solver
    from dynsim.stopping import stop_rule

    cfg = DSSMConfig(data="fashion-mnist", nps=16)
    ds, xtr, _ = prepare_data(cfg)
    layer = build_layer(cfg, ds.image_shape)
    x = torch.as_tensor(xtr)
    stop, solver = stop_rule(1e-4, 3000), make_solver("newton")
    steps = []
    t0 = time.perf_counter()
    for batch in epoch_batches(x, images=images, batch_size=1, seed=0)(0):
        res = settle(layer, batch.x, solver=solver, stop=stop)
        steps.append(int(res.steps))
        hebbian_update(layer, batch.x, res.r, 5e-3)
    info = {"train_seconds": time.perf_counter() - t0,
            "train_steps_quantiles_50_90_99_100": np.percentile(steps, [50, 90, 99, 100]).tolist(),
            "train_images_over_100_steps": int(sum(s > 100 for s in steps))}
    torch.save({"layer": layer, "x": x[:2000].clone(), "info": info}, path)


def _measure(layer_path: str, spec: str, kernels: bool, n: int, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    from dynsim import compiled, settle
    from dynsim.solvers import make_solver
    from dynsim.stopping import stop_rule

    blob = torch.load(layer_path, weights_only=False)
    layer, x = blob["layer"], blob["x"][:n]
    solver, stop = make_solver(spec), stop_rule(1e-4, 3000)
    settle(layer, x[:2], solver=solver, stop=stop)  # compile / warm up
    t0 = time.perf_counter()
    if kernels:
        res = settle(layer, x, solver=solver, stop=stop)
    else:
        with compiled.disabled():
            res = settle(layer, x, solver=solver, stop=stop)
    wall = time.perf_counter() - t0
    torch.save({"u": res.u, "steps": res.steps, "status": res.status, "wall": wall}, out)


def _stability(layer_path: str, states: dict) -> dict:
    import torch

    layer = torch.load(layer_path, weights_only=False)["layer"]
    w = layer.lateral.weight.double()
    eye = torch.eye(layer.nps, dtype=torch.float64)
    ev = torch.linalg.eigvalsh(0.5 * (w + w.mT))
    a = layer.lateral_sign * (w - eye)
    out = {"L_eigenvalue_min": float(ev.min()), "L_eigenvalue_max": float(ev.max()),
           "sites_with_L_eigenvalue_below_1": int((ev.min(-1).values < 1).sum())}
    for k, u in states.items():
        us = layer.sites(u.double())
        jac = a.unsqueeze(0) * (1 - torch.tanh(us) ** 2).unsqueeze(-2) - eye
        out[f"max_real_jacobian_eigenvalue_at_{k}"] = float(torch.linalg.eigvals(jac).real.max())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000, help="online training images before the test")
    p.add_argument("--settle", type=int, default=500, help="training images settled by every row")
    p.add_argument("--layer", default="runs/newton_hard_layer.pt", help="the trained layer (made if missing)")
    p.add_argument("--baseline-src", default=None, help="source tree of the old code (default: this tree)")
    p.add_argument("--out", default="benchmarks/results/newton_hard_issue15.json")
    p.add_argument("--measure", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--train", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.train:
        return _train(args.images, args.layer)
    if args.measure:
        spec, kernels, n, out = args.measure
        return _measure(args.layer, spec, kernels == "1", int(n), out)
    import torch

    src = {"new": HERE, "old": os.path.abspath(args.baseline_src or HERE)}

    def child(code: str, *extra: str) -> None:
        env = dict(os.environ, PYTHONPATH=src[code], OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, os.path.abspath(__file__), "--layer", args.layer, "--images",
                        str(args.images), *extra], env=env, check=True, cwd=src[code])

    if not os.path.exists(args.layer):
        os.makedirs(os.path.dirname(os.path.abspath(args.layer)), exist_ok=True)
        child("old", "--train")
    rows, states = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, spec, code, kernels in ROWS:
            path = os.path.join(tmp, f"{len(rows)}.pt")
            child(code, "--measure", spec, "1" if kernels else "0", str(args.settle), path)
            got = torch.load(path, weights_only=False)
            states[label] = got
            st = got["steps"].numpy()
            rows.append({"row": label, "solver": spec, "code": code, "compiled": kernels, "wall_s": got["wall"],
                         "converged": float((got["status"] == 1).float().mean()),
                         "steps_median_90_max": np.percentile(st, [50, 90, 100]).tolist()})
            print(f"{label:22s} {got['wall']:7.2f} s  converged {rows[-1]['converged']:.3f}  steps median/90/max "
                  f"{rows[-1]['steps_median_90_max']}", flush=True)
    ref = states["euler"]
    for row in rows:
        got = states[row["row"]]
        both = (got["status"] == 1) & (ref["status"] == 1)
        dist = torch.linalg.vector_norm(got["u"] - ref["u"], dim=1) / torch.linalg.vector_norm(ref["u"], dim=1)
        row["rel_dist_to_euler_median_max"] = [float(dist[both].median()), float(dist[both].max())]
        row["rel_dist_to_euler_unconverged_max"] = float(dist[~both].max()) if bool((~both).any()) else None
    print(f"{'row':22s} {'wall s':>8s} {'conv':>6s} {'steps med/90/max':>20s} {'dist to euler med/max':>24s}")
    for row in rows:
        s = row["steps_median_90_max"]
        d = row["rel_dist_to_euler_median_max"]
        print(f"{row['row']:22s} {row['wall_s']:8.2f} {row['converged']:6.3f} {s[0]:6.0f} {s[1]:6.0f} {s[2]:6.0f} "
              f"{d[0]:11.2e} {d[1]:11.2e}")
    stability = _stability(args.layer, {"euler": ref["u"], "anderson": states["anderson"]["u"]})
    print(stability)
    info = torch.load(args.layer, weights_only=False).get("info")
    result = {"args": vars(args), "rows": rows, "stability": stability, "training": info,
              "load_average": os.getloadavg(), "note": "one layer, one seed; wall on a shared 2-core machine"}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
