"""The `svc` readout's CG on real settled features: one-level vs two-level preconditioners, live-class products.

Issue 15: at NpS 64/100 the exact ``svc`` readout (n = 60,000, d = 196·NpS) is fitted by
Newton–CG, and the fit, not settling, is what a large-NpS study cell spends most on. This script:

``--make-features NPS``
    builds the DSSM layer at NpS (``DSSMConfig`` defaults), trains it as a ``study nps`` cell
    does (``--epochs`` × 1000 online images, batch 1, ``DSSMConfig``'s η schedule,
    ``newton-cg``), settles all 70,000 Fashion-MNIST images and saves the rates and labels as
    ``.npy`` under ``--features-dir`` (``train_r_NPS.npy`` …) — real settled features, made once.
``--fit NPS``
    fits ``svc`` on those features with each ``--preconditioners`` entry in turn (each in its
    own spawned process: its own peak RSS; 1 thread): ``diagonal``, ``block`` (block-Jacobi,
    blocks of NpS) or ``block:SIZE``, each optionally ``+coarseL`` (the balancing two-level
    preconditioner with a coarse space of dimension L, ``fit_svc(coarse=L)``) and ``+allclasses``
    (the baseline before CG's products ran for the live classes only: every CG product over all k
    classes, as up to commit 3117308; the preconditioner stays per live class, so this
    understates the old cost). It reports
    seconds, Newton and CG iterations, CG iterations per Newton iteration, the rows CG ran over,
    the time spent building the preconditioner, the objective, the largest gradient ratio,
    convergence, test accuracy, and every fit's test predictions (to count the ones that differ:
    liblinear's stopping test leaves each path a little short of the minimum).
    ``--max-iter`` caps every fit's Newton iterations (a capped fit reports how far it got).
    ``--save-weights DIR`` keeps each fit's weights (``weights_NPS_<preconditioner>_<cg stop>.npy``);
    ``--warm-start FILE`` starts every fit there (e.g. with a tighter ``--tol`` and ``--max-iter``
    from a converged fit: the late, hard Newton systems alone, an A/B that costs minutes).

    PYTHONPATH=. python benchmarks/readout_precond.py --make-features 64
    PYTHONPATH=. python benchmarks/readout_precond.py --fit 64 --out benchmarks/results/readout_precond_64.json
    PYTHONPATH=. python benchmarks/readout_precond.py --fit 64 --warm-start W.npy --tol 1e-5 --max-iter 2 \
        --preconditioners block+coarse128,block+coarse128+allclasses
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
    stop, solver = stop_rule(cfg.threshold, cfg.max_steps), make_solver("newton-cg")
    batches = epoch_batches(torch.as_tensor(xtr), images=cfg.images_per_epoch, batch_size=1, seed=0)
    for epoch in range(args["epochs"]):  # a study cell's training: batch 1, η_e of DSSMConfig
        eta = max(cfg.eta0 / (1 + cfg.eta_decay * epoch), cfg.eta_min)
        for batch in batches(epoch):
            hebbian_update(layer, batch.x, settle(layer, batch.x, solver=solver, stop=stop).r, eta)
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
            "epochs": args["epochs"], "load_average": os.getloadavg()}


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
    spec, all_classes = args["preconditioner"], args["preconditioner"].endswith("+allclasses")
    if all_classes:
        import dynsim.readouts as ro

        def every_class(self, p, live):  # the product before _LiveProducts: all k classes, all rows
            return p + 2.0 * self.x.gauss_newton_product(p, self.active_cost)

        ro._LiveProducts.hessian = every_class
        spec = spec.removesuffix("+allclasses")
    spec, _, coarse = spec.partition("+coarse")
    name, _, size = spec.partition(":")
    block = None if name == "diagonal" else int(size or nps)
    coarse = int(coarse) if coarse else None
    load = os.getloadavg()
    t0 = time.perf_counter()
    max_iter = args["max_iter"] or 1000
    w0 = torch.from_numpy(np.load(args["warm_start"])) if args["warm_start"] else None
    model = fit_svc(ftr, ytr, n_classes=10, direction="cg", block=block, coarse=coarse, max_iter=max_iter,
                    tol=args["tol"], w0=w0, cg_stop=args["cg_stop"])
    seconds = time.perf_counter() - t0
    info = model.info
    if args["save_weights"]:
        Path(args["save_weights"]).mkdir(parents=True, exist_ok=True)
        name = f"weights_{nps}_{args['preconditioner']}_{args['cg_stop']}.npy"
        np.save(Path(args["save_weights"]) / name, model.weights.numpy())
    return {
        "preconditioner": args["preconditioner"], "cg_stop": args["cg_stop"], "block": block, "coarse": coarse,
        "max_iter": max_iter,
        "tol": args["tol"], "cg_rows": info["cg_rows"], "coarse_seconds": info.get("coarse_seconds"),
        "test_predictions": "".join(map(str, model.predict(fte).tolist())),
        "n": int(ftr.shape[0]), "d": int(ftr.shape[1]),
        "seconds": seconds, "newton_iterations": info["newton_iterations"], "cg_iterations": info["cg_iterations"],
        "cg_per_newton": info["cg_per_newton"], "cg_per_class": json.dumps(info["cg_per_class"]),
        "warm_start": args["warm_start"], "preconditioner_seconds": info["preconditioner_seconds"],
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
    p.add_argument("--epochs", type=int, default=15, help="training epochs of DSSMConfig's schedule before settling")
    p.add_argument("--eval-batch", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--preconditioners", default="block,block+coarse128",
                   help="comma list of diagonal, block (block = NpS) or block:SIZE, each optionally +coarseL "
                        "(the coarse space of dimension L)")
    p.add_argument("--cg-stops", default="residual",
                   help="comma list of CG stopping rules (fit_svc's cg_stop: residual, quadratic); each "
                        "preconditioner is fitted with each")
    p.add_argument("--tol", type=float, default=1e-4, help="liblinear's tol (its stopping test)")
    p.add_argument("--max-iter", type=int, default=0,
                   help="cap every fit's Newton iterations (0: none; a capped fit is reported unconverged)")
    p.add_argument("--save-weights", default=None, metavar="DIR", help="keep each fit's weights (.npy) there")
    p.add_argument("--warm-start", default=None, metavar="FILE", help="start every fit at these (d + 1, k) weights")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    for name in args.preconditioners.split(","):  # before any fit: +allclasses is recognised last only
        base, _, coarse = name.removesuffix("+allclasses").partition("+coarse")
        if "+" in base or not coarse.isdigit() and coarse or base.split(":")[0] not in ("diagonal", "block"):
            p.error(f"--preconditioners entry {name!r}: expected diagonal|block[:SIZE][+coarseL][+allclasses]")
    result = {"settings": vars(args)}
    if args.make_features:
        row = run(make_features, {"data": args.data, "nps": args.make_features, "epochs": args.epochs,
                                  "eval_batch": args.eval_batch, "threads": args.threads, "dir": args.features_dir})
        print(json.dumps(row, indent=1), flush=True)
        result["features"] = row
    if args.fit:
        rows = []
        print(f"{'preconditioner':>14} {'seconds':>8} {'newton':>6} {'cg':>6} {'cg/newton':>24} {'prec s':>7} "
              f"{'objective':>12} {'grad ratio':>10} {'conv':>5} {'test acc':>8}", flush=True)
        for name, cg_stop in [(n, c) for n in args.preconditioners.split(",") for c in args.cg_stops.split(",")]:
            row = run(fit_one, {"nps": args.fit, "preconditioner": name, "cg_stop": cg_stop, "threads": args.threads,
                                "dir": args.features_dir, "max_iter": args.max_iter, "tol": args.tol,
                                "save_weights": args.save_weights, "warm_start": args.warm_start})
            rows.append(row)
            if args.out:  # after every fit: a stopped run keeps the fits it finished
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps({**result, "fits": rows}, indent=1))
            print(f"{name + ' ' + cg_stop:>14} {row['seconds']:8.1f} {row['newton_iterations']:6d} "
                  f"{row['cg_iterations']:6d} "
                  f"{str(row['cg_per_newton']):>24} {row['preconditioner_seconds']:7.1f} {row['objective_sum']:12.4f} "
                  f"{row['max_gradient_ratio']:10.2e} {str(row['converged']):>5} {row['test_accuracy']:8.4f}",
                  flush=True)
        result["fits"] = rows
        first = rows[0]["test_predictions"]
        for row in rows[1:]:  # paths that stop at liblinear's test end a little apart
            differ = sum(a != b for a, b in zip(first, row["test_predictions"], strict=True))
            row["test_predictions_differing_from_first"] = differ
            print(f"{row['preconditioner']} {row['cg_stop']}: {row['test_predictions_differing_from_first']} test "
                  f"predictions differ from {rows[0]['preconditioner']} {rows[0]['cg_stop']}'s", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
