"""Large NpS on 28×28 (NpS 100: 19,600 neurons): per-site Newton, torch Newton–CG and compiled Newton–CG in one run.

For each NpS and each solver row — ``newton`` (per-site LU Newton: the compiled kernels up to NpS 32,
the torch path above; the path before issue 15), ``newton-cg:torch`` (conjugate-gradient block
solves, one batched product over all sites per CG iteration: the torch step, run with the compiled
kernels switched off, as ``--solver auto`` ran from NpS 32 before the compiled backend) and
``newton-cg`` (the same iteration in the compiled site-first kernel, ``dynsim/compiled_cg.py``,
with the compiled batch-1 Hebbian update: what ``--solver auto`` runs now) — one spawned process
(so that its peak resident memory, ``ru_maxrss``, is its own) builds the layer with the same seed,
trains it for ``--warm-images`` online images (batch 1, η = 5e-3, with newton-cg: the same weights
for every row) — or, with ``--warm-epochs E``, as a ``study nps`` cell trains (E × 1000 images,
``DSSMConfig``'s η schedule; a trained layer settles in about 3× more Newton steps, so only this
projects a real run) — then times:

* online training: ``--train-images`` images, batch 1, settle + Hebbian update, per image;
* evaluation settling: ``--eval-images`` train and test images each, batch ``--eval-batch``;
* the ``svc`` readout on those settled subsets (n = ``--eval-images``, d = 196·NpS), in the first
  row of each NpS only (the rows' settled states agree to the tolerance; ``--readout-every-row``).

All rows stop on the same per-sample test ``‖F(u)‖/‖u‖ < 1e-4``; the table reports the max
relative distance between each row's settled evaluation states and ``newton``'s. Projections: a
15-epoch run with one evaluation of all 70,000 images = 15,000 × train + 70,000 × eval settle; the
default 120-epoch run (8 evaluations) = 120,000 × train + 560,000 × eval settle; neither includes
the full-size readout (60,000 × 196·NpS), which this script does not time (it times a readout on
the subsets). ``--threads`` sets torch's threads (the compiled kernels split evaluation batches
of ≥ 128 rows over them).

Example::

    PYTHONPATH=. python benchmarks/nps100.py --nps 16,32,64,100 --out benchmarks/results/nps100_issue15.json
    PYTHONPATH=. python benchmarks/nps100.py --full-readout 64 --out runs/readout64.json  # all 70k images + svc
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import resource
import time
from pathlib import Path


def measure(args: dict) -> dict:
    """One (NpS, solver) measurement in this (spawned) process."""
    import sys

    if args.get("src"):  # a row of an older tree (--baseline-src): its dynsim, imported first
        sys.path.insert(0, args["src"])
    import numpy as np
    import torch

    torch.set_num_threads(args["threads"])
    torch.set_grad_enabled(False)
    from dynsim import compiled
    from dynsim.builders import build_layer, epoch_batches, prepare_data
    from dynsim.configs.dssm import DSSMConfig
    from dynsim.evaluation import settle_dataset
    from dynsim.plasticity import hebbian_update
    from dynsim.readouts import readout_accuracy
    from dynsim.settle import settle
    from dynsim.solvers import make_solver
    from dynsim.solvers.spec import solver_from_spec
    from dynsim.stopping import stop_rule

    cfg = DSSMConfig(data=args["data"], nps=args["nps"])
    ds, xtr, xte = prepare_data(cfg)
    layer = build_layer(cfg, ds.image_shape)
    stop = stop_rule(1e-4, 3000)
    x = torch.as_tensor(xtr)
    warm_solver = make_solver("newton-cg")
    layer_file = (args.get("load_layer") or "").format(nps=args["nps"])
    if layer_file and Path(layer_file).exists():  # the same trained layer for every row (and tree)
        layer.load_state_dict(torch.load(layer_file))
    elif args.get("warm_epochs"):  # as a `study nps` cell trains: epochs × 1000 images, DSSMConfig's η schedule
        batches = epoch_batches(x, images=cfg.images_per_epoch, batch_size=1, seed=0)
        for epoch in range(args["warm_epochs"]):
            eta = max(cfg.eta0 / (1 + cfg.eta_decay * epoch), cfg.eta_min)
            for batch in batches(epoch):
                hebbian_update(layer, batch.x, settle(layer, batch.x, solver=warm_solver, stop=stop).r, eta)
    else:
        for batch in epoch_batches(x, images=args["warm_images"], batch_size=1, seed=1)(0):
            res = settle(layer, batch.x, solver=warm_solver, stop=stop)
            hebbian_update(layer, batch.x, res.r, 5e-3)
    if layer_file and not Path(layer_file).exists():
        Path(layer_file).parent.mkdir(parents=True, exist_ok=True)
        torch.save(layer.state_dict(), layer_file)
    name, _, variant = args["solver"].partition(":")
    solver = solver_from_spec(name.replace("/", ","))
    path = compiled.disabled() if variant == "torch" else contextlib.nullcontext()  # ("base": the default path)
    with path:
        settle(layer, x[:1], solver=solver, stop=stop)  # compiles the kernels, if not cached
        t0, steps = time.perf_counter(), []
        for batch in epoch_batches(x, images=args["train_images"], batch_size=1, seed=0)(0):
            res = settle(layer, batch.x, solver=solver, stop=stop)
            hebbian_update(layer, batch.x, res.r, 5e-3)
            steps.append(int(res.steps))
        train = (time.perf_counter() - t0) / args["train_images"]
        n = args["eval_images"]
        kw = dict(solver=solver, stop=stop, batch_size=args["eval_batch"], keep_states=True)
        t0 = time.perf_counter()
        rep_tr = settle_dataset(layer, xtr[:n], **kw)
        rep_te = settle_dataset(layer, xte[:n], **kw)
        evaluate = (time.perf_counter() - t0) / (2 * n)
    probe = {"readout_seconds": float("nan"), "accuracy": float("nan")}
    if args["readout"]:
        probe = readout_accuracy("svc", rep_tr.r, ds.y_train[:n], rep_te.r, ds.y_test[:n])
    out = {
        "nps": args["nps"], "solver": args["solver"], "neurons": layer.state_size, "threads": args["threads"],
        "train_seconds_per_image": train, "train_mean_newton_steps": sum(steps) / len(steps),
        "eval_settle_seconds_per_image": evaluate, "eval_batch": args["eval_batch"],
        "eval_mean_newton_steps": float(np.mean(rep_te.steps)),
        "eval_fraction_converged": float((rep_te.status == 1).mean()),
        "readout_seconds_subset": probe["readout_seconds"], "readout_subset_accuracy": probe["accuracy"],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "projected_15_epochs_one_eval_seconds": 15_000 * train + 70_000 * evaluate,
        "projected_120_epochs_8_evals_seconds": 120_000 * train + 8 * 70_000 * evaluate,
    }
    Path(args["states"]).parent.mkdir(parents=True, exist_ok=True)
    np.save(args["states"], rep_te.u.numpy())
    return out


def full_readout(args: dict) -> dict:
    """Settle all train and test images with newton-cg (after the warm images) and time the ``svc``
    readout on them: the full-size readout cost at this NpS (n = 60,000, d = 196·NpS)."""
    import numpy as np
    import torch

    torch.set_num_threads(args["threads"])
    torch.set_grad_enabled(False)
    from dynsim.builders import build_layer, epoch_batches, prepare_data
    from dynsim.configs.dssm import DSSMConfig
    from dynsim.evaluation import settle_dataset
    from dynsim.plasticity import hebbian_update
    from dynsim.readouts import readout_accuracy
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
    settle_seconds = time.perf_counter() - t0
    probe = readout_accuracy("svc", rep_tr.r, ds.y_train, rep_te.r, ds.y_test)
    return {"nps": args["nps"], "n_train": len(xtr), "n_test": len(xte), "features": int(rep_tr.r.shape[1]),
            "settle_seconds_all_images": settle_seconds, "eval_settle_seconds_per_image": settle_seconds / (
                len(xtr) + len(xte)), "readout_seconds": probe["readout_seconds"],
            "readout_iterations": probe.get("readout_iterations"), "readout_converged": probe.get("readout_converged"),
            "test_accuracy_after_warm_images": probe["accuracy"], "mean_steps": float(np.mean(rep_te.steps)),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "load_average": os.getloadavg()}


def _tag(name: str) -> str:
    """A row's name as a file-name part."""
    return name.replace(":", "-").replace("/", "-").replace("=", "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--nps", default="16,32,64,100")
    p.add_argument("--solvers", default="newton,newton-cg:torch,newton-cg",
                   help="rows per NpS; NAME:torch runs NAME with the compiled kernels switched off, NAME:base "
                        "with the dynsim of --baseline-src; options as NAME/opt=value (e.g. newton-cg/merit=residual)")
    p.add_argument("--baseline-src", default=None, metavar="DIR",
                   help="an older tree (e.g. `git worktree add DIR REV`) for the NAME:base rows")
    p.add_argument("--reference", default="newton", help="the row the speed-ups and state distances are against")
    p.add_argument("--load-layer", default=None, metavar="PATH",
                   help="trained weights to time on, '{nps}' replaced by the NpS (saved there by the first row "
                        "that warms, if missing): every row and tree times the same layer")
    p.add_argument("--warm-images", type=int, default=200)
    p.add_argument("--warm-epochs", type=int, default=0,
                   help="instead of --warm-images: train the layer as a study cell does (EPOCHS x 1000 online "
                        "images, DSSMConfig's eta schedule) before timing: a trained layer settles in more steps")
    p.add_argument("--train-images", type=int, default=50)
    p.add_argument("--eval-images", type=int, default=200, help="train and test images each")
    p.add_argument("--eval-batch", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--readout-every-row", action="store_true",
                   help="fit the subset readout in every row (default: the first row of each NpS)")
    p.add_argument("--no-readout", action="store_true", help="time settling only (no subset readout)")
    p.add_argument("--full-readout", type=int, default=None, metavar="NPS",
                   help="instead: settle all images at this NpS with newton-cg and time the svc readout on them")
    p.add_argument("--out", default="runs/nps100.json")
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    if args.full_readout:
        job = {"data": args.data, "nps": args.full_readout, "warm_images": args.warm_images,
               "eval_batch": args.eval_batch, "threads": args.threads}
        with ctx.Pool(1, maxtasksperchild=1) as pool:
            row = pool.apply(full_readout, (job,))
        print(json.dumps(row, indent=1))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"settings": vars(args), "full_readout": row}, indent=1))
        return
    rows = []
    tmp = Path(args.out).with_suffix("")
    for nps in [int(v) for v in args.nps.split(",")]:
        for k, name in enumerate(args.solvers.split(",")):
            job = {"data": args.data, "nps": nps, "solver": name, "warm_images": args.warm_images,
                   "warm_epochs": args.warm_epochs,
                   "readout": (k == 0 or args.readout_every_row) and not args.no_readout,
                   "train_images": args.train_images, "eval_images": args.eval_images,
                   "eval_batch": args.eval_batch, "threads": args.threads, "load_layer": args.load_layer,
                   "src": args.baseline_src if name.endswith(":base") else None,
                   "states": str(tmp) + f"_states_{nps}_{_tag(name)}.npy"}
            with ctx.Pool(1, maxtasksperchild=1) as pool:
                row = pool.apply(measure, (job,))
            row["load_average"] = os.getloadavg()
            rows.append(row)
            print(json.dumps(row), flush=True)
    import numpy as np

    ref = args.reference
    for row in rows:  # each row's settled evaluation states and speed-up against the reference row's, per NpS
        base = next((r for r in rows if r["nps"] == row["nps"] and r["solver"] == ref), None)
        row["reference"] = ref
        if base is None:  # no reference row for this NpS (e.g. --solvers newton-cg)
            row["max_rel_state_distance_to_reference"] = row["train_speedup_vs_reference"] = float("nan")
            row["eval_speedup_vs_reference"] = float("nan")
            continue
        a = np.load(str(tmp) + f"_states_{row['nps']}_{_tag(ref)}.npy")
        b = np.load(str(tmp) + f"_states_{row['nps']}_{_tag(row['solver'])}.npy")
        row["max_rel_state_distance_to_reference"] = float(
            (np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)).max())
        row["train_speedup_vs_reference"] = base["train_seconds_per_image"] / row["train_seconds_per_image"]
        row["eval_speedup_vs_reference"] = base["eval_settle_seconds_per_image"] / row["eval_settle_seconds_per_image"]
    for f in tmp.parent.glob(tmp.name + "_states_*.npy"):
        f.unlink()
    head = (f"| NpS | solver | train s/img | steps | eval s/img | steps | ×train vs {ref} | ×eval | readout s (subset) "
            "| peak GiB | 15 ep + 1 eval (proj., target 15 min) | 120 ep + 8 evals (proj., target 1 h) "
            "| max state dist |")
    lines = [head, "|" + "---:|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['nps']} | {r['solver']} | {r['train_seconds_per_image']:.4f} | {r['train_mean_newton_steps']:.1f} "
            f"| {r['eval_settle_seconds_per_image']:.4f} | {r['eval_mean_newton_steps']:.1f} "
            f"| {r['train_speedup_vs_reference']:.2f} | {r['eval_speedup_vs_reference']:.2f} "
            f"| {r['readout_seconds_subset']:.1f} | {r['peak_rss_gib']:.2f} "
            f"| {r['projected_15_epochs_one_eval_seconds'] / 60:.0f} min "
            f"| {r['projected_120_epochs_8_evals_seconds'] / 3600:.1f} h "
            f"| {r['max_rel_state_distance_to_reference']:.1e} |")
    table = "\n".join(lines).replace("| nan |", "| – |").replace("| nan |", "| – |")
    print(table)
    result = {"settings": vars(args), "rows": rows, "table": table}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
