"""The `svc` readout's CG preconditioner at full size: diagonal vs block-Jacobi over sites, real features.

Issue 15: at NpS 64/100 the exact ``svc`` readout (n = 60,000, d = 196·NpS) is fitted by
Newton–CG; with the diagonal preconditioner a converged fit at d = 19,600 takes hundreds of CG
iterations. ``fit_svc(..., block=NpS)`` preconditions each class's CG with the exact Hessian's
NpS×NpS diagonal blocks (one per site) instead. This script:

``--make-features NPS``
    builds the DSSM layer at NpS (``DSSMConfig`` defaults, the seed of ``benchmarks/nps100.py``),
    trains it for ``--warm-images`` online images (batch 1, η = 5e-3, ``newton-cg``), settles all
    70,000 Fashion-MNIST images with ``newton-cg`` and saves the rates and labels as ``.npy``
    under ``--features-dir`` (``train_r_NPS.npy`` …) — real settled features, made once.
``--fit NPS``
    fits ``svc`` on those features with each ``--preconditioners`` entry in turn (each in its
    own spawned process: its own peak RSS; 1 thread) and reports seconds, Newton and CG
    iterations, CG iterations per Newton iteration, the time spent building the preconditioner,
    the objective, the largest gradient ratio, convergence and test accuracy.
    ``--max-iter`` caps every fit's Newton iterations (a capped fit reports how far it got:
    its objective and gradient ratio against liblinear's test, its CG iterations per Newton
    iteration beside the other preconditioners').

    PYTHONPATH=. python benchmarks/readout_precond.py --make-features 64
    PYTHONPATH=. python benchmarks/readout_precond.py --fit 64 --out benchmarks/results/readout_precond_64.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_features(args: dict) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(args["threads"])
    torch.set_grad_enabled(False)
    from dynsim.builders import build_layer, epoch_batches, prepare_data
    from dynsim.configs.dssm import DSSMConfig
    from dynsim.evaluation import settle_dataset
    from dynsim.plasticity import hebbian_update
    from dynsim.settle import settle
    from dynsim.solvers import make_solver
    from dynsim.stopping import stop_rule

    cfg = DSSMConfig(data=args["data"], nps=args["nps"])
    ds, xtr, xte = prepare_data(cfg)
    layer = build_layer(cfg, ds.image_shape)
    stop, solver = stop_rule(1e-4, 3000), make_solver("newton-cg")
    for batch in epoch_batches(torch.as_tensor(xtr), images=args["warm_images"], batch_size=1, seed=1)(0):
        hebbian_update(layer, batch.x, settle(layer, batch.x, solver=solver, stop=stop).r, 5e-3)
    t0 = time.perf_counter()
    rep_tr = settle_dataset(layer, xtr, solver=solver, stop=stop, batch_size=args["eval_batch"])
    rep_te = settle_dataset(layer, xte, solver=solver, stop=stop, batch_size=args["eval_batch"])
    seconds = time.perf_counter() - t0
    out = Path(args["dir"])
    out.mkdir(parents=True, exist_ok=True)
    nps = args["nps"]
    np.save(out / f"train_r_{nps}.npy", np.asarray(rep_tr.r, dtype=np.float32))
    np.save(out / f"test_r_{nps}.npy", np.asarray(rep_te.r, dtype=np.float32))
    np.save(out / f"train_y_{nps}.npy", np.asarray(ds.y_train))
    np.save(out / f"test_y_{nps}.npy", np.asarray(ds.y_test))
    return {"nps": nps, "settle_seconds_all_images": seconds, "features": int(rep_tr.r.shape[1]),
            "warm_images": args["warm_images"], "load_average": os.getloadavg()}


def fit_one(args: dict) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(args["threads"])
    from dynsim.readouts import fit_svc

    d = Path(args["dir"])
    nps = args["nps"]
    ftr = torch.from_numpy(np.load(d / f"train_r_{nps}.npy"))
    ytr = torch.from_numpy(np.load(d / f"train_y_{nps}.npy")).long()
    fte = torch.from_numpy(np.load(d / f"test_r_{nps}.npy"))
    yte = torch.from_numpy(np.load(d / f"test_y_{nps}.npy")).long()
    name, _, size = args["preconditioner"].partition(":")
    block = None if name == "diagonal" else int(size or nps)
    load = os.getloadavg()
    t0 = time.perf_counter()
    max_iter = args["max_iter"] or 1000
    model = fit_svc(ftr, ytr, n_classes=10, direction="cg", block=block, max_iter=max_iter)
    seconds = time.perf_counter() - t0
    info = model.info
    return {
        "preconditioner": args["preconditioner"], "block": block, "max_iter": max_iter,
        "n": int(ftr.shape[0]), "d": int(ftr.shape[1]),
        "seconds": seconds, "newton_iterations": info["newton_iterations"], "cg_iterations": info["cg_iterations"],
        "cg_per_newton": info["cg_per_newton"], "preconditioner_seconds": info["preconditioner_seconds"],
        "products": info["products"], "converged": info["converged"],
        "objective_sum": float(np.sum(info["objective"])), "objective": [float(v) for v in info["objective"]],
        "max_gradient_ratio": float(np.max(info["gradient_ratio"])),
        "test_accuracy": model.accuracy(fte, yte), "train_accuracy": model.accuracy(ftr, ytr),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "load_average_before": load, "load_average_after": os.getloadavg(),
    }


def run(fn, job):
    with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(fn, (job,))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--make-features", type=int, default=None, metavar="NPS")
    p.add_argument("--fit", type=int, default=None, metavar="NPS")
    p.add_argument("--features-dir", default="/work/runs/feat")
    p.add_argument("--warm-images", type=int, default=200)
    p.add_argument("--eval-batch", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--preconditioners", default="block,diagonal",
                   help="comma list of diagonal, block (block = NpS) or block:SIZE")
    p.add_argument("--max-iter", type=int, default=0,
                   help="cap every fit's Newton iterations (0: none; a capped fit is reported unconverged)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    result = {"settings": vars(args)}
    if args.make_features:
        row = run(make_features, {"data": args.data, "nps": args.make_features, "warm_images": args.warm_images,
                                  "eval_batch": args.eval_batch, "threads": args.threads, "dir": args.features_dir})
        print(json.dumps(row, indent=1), flush=True)
        result["features"] = row
    if args.fit:
        rows = []
        print(f"{'preconditioner':>14} {'seconds':>8} {'newton':>6} {'cg':>6} {'cg/newton':>24} {'prec s':>7} "
              f"{'objective':>12} {'grad ratio':>10} {'conv':>5} {'test acc':>8}", flush=True)
        for name in args.preconditioners.split(","):
            row = run(fit_one, {"nps": args.fit, "preconditioner": name, "threads": args.threads,
                                "dir": args.features_dir, "max_iter": args.max_iter})
            rows.append(row)
            if args.out:  # after every fit: a stopped run keeps the fits it finished
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps({**result, "fits": rows}, indent=1))
            print(f"{name:>14} {row['seconds']:8.1f} {row['newton_iterations']:6d} {row['cg_iterations']:6d} "
                  f"{str(row['cg_per_newton']):>24} {row['preconditioner_seconds']:7.1f} {row['objective_sum']:12.4f} "
                  f"{row['max_gradient_ratio']:10.2e} {str(row['converged']):>5} {row['test_accuracy']:8.4f}",
                  flush=True)
        result["fits"] = rows
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
