"""DSSM speed: dynsim against the plain dense batch-1 loop, measured in the same run.

Prints a table and writes JSON (``--out``). All ratios are reference time / dynsim time
(> 1: dynsim is faster), each timing the median of ``--repeats`` runs, on the same
images and the same initial weights. Sections:

(a) settle ``--settle-inputs`` fixed test images one by one on trained-ish weights (after
    one epoch), at equal residual ‖du/ds‖/‖u‖ < T: reference (dense Euler), dynsim Euler,
    dynsim per-site Newton; threads 1 and 2.
(b) the first ``--epochs`` (2) training epochs (batch 1, online), reference vs dynsim
    (Newton), the distance between the two runs' weights, and (``--acc-size``) both weight
    sets read out the same way (settle with Newton to the same residual, probe) on the
    same images: the accuracy comparison at matched settings.
(c) the full default run (120 epochs × 1000 images, readout every 15): dynsim measured
    with ``--full`` or read from ``--full-result`` (a ``dynsim run dssm`` result JSON of the
    default configuration, run separately on this machine); else extrapolated from (b) and
    (d). The reference is extrapolated (it would take hours).
(d) evaluation: settle all train + test images (dynsim: batch ``--eval-batch``) and fit the
    readout (probe; LinearSVC with ``--svc``); the reference's settling extrapolated from (a).

Example::

    PYTHONPATH=. python benchmarks/dssm_speed.py --data fashion-mnist --out runs/dssm_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_loop import dense_masks, load_dense, reference_settle, reference_train  # noqa: E402

from dynsim import settle  # noqa: E402
from dynsim.evaluation import settle_dataset  # noqa: E402
from dynsim.pipelines.dssm import DSSMConfig, build_layer, prepare_data, run_dssm  # noqa: E402
from dynsim.plasticity import SimilarityMatchingRule  # noqa: E402
from dynsim.readouts import readout_accuracy  # noqa: E402
from dynsim.solvers import Euler, SiteNewton  # noqa: E402
from dynsim.stopping import stop_rule  # noqa: E402


def median_time(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def dynsim_train(layer, x_train, *, epochs, images, seed=0, start_epoch=0):
    """Online training with the Newton solver through the engine (as ``run_dssm`` does)."""
    from dynsim.engine import DynamicsSettler, Engine
    from dynsim.pipelines.dssm import epoch_batches

    stop = stop_rule(1e-4, 3000)
    rule = SimilarityMatchingRule(layer)
    engine = Engine(DynamicsSettler(layer, SiteNewton(), stop), [rule], progress=False)
    batches = epoch_batches(x_train, images=images, batch_size=1, seed=seed)
    with torch.no_grad():
        engine.fit(batches, epochs, start_epoch=start_epoch)
    return engine.history


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--settle-inputs", type=int, default=30)
    p.add_argument("--train-images", type=int, default=1000, help="images per epoch in (b)")
    p.add_argument("--eval-batch", type=int, default=1000)
    p.add_argument("--eval-size", type=int, default=None, help="settle only this many train and test images in (d)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--svc", action="store_true", help="also time LinearSVC in (d)")
    p.add_argument("--full", action="store_true", help="run the full default config in (c) (else extrapolate)")
    p.add_argument("--full-result", default=None, help="(c) from this run_dssm result JSON of the default config")
    p.add_argument("--epochs", type=int, default=2, help="training epochs in (b)")
    p.add_argument("--acc-size", type=int, default=0,
                   help="(b) read out both runs' weights on this many train and test images (0: skip; -1: all)")
    p.add_argument("--threads", default="1,2", help="thread counts for (a) and (d), e.g. 1 or 1,2")
    p.add_argument("--out", default="runs/dssm_speed.json")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    cfg = DSSMConfig(data=args.data)
    ds, xtr, xte = prepare_data(cfg)
    x_train = torch.as_tensor(xtr)
    layer0 = build_layer(cfg, ds.image_shape)
    stop = stop_rule(1e-4, 3000)
    out = {"data": args.data, "args": vars(args), "torch": torch.__version__, "sections": {}}
    rows = []

    # numba compiles dynsim's kernels once per machine (then loads them from its cache in
    # ~0.35 s): do it before any timing, and report it
    import copy

    t0 = time.perf_counter()
    dynsim_train(copy.deepcopy(layer0), x_train, epochs=1, images=2)
    settle(copy.deepcopy(layer0), torch.as_tensor(xte[:300]), solver=SiteNewton(), stop=stop)
    out["compile_or_cache_load_seconds"] = time.perf_counter() - t0
    print(f"kernels compiled or loaded in {out['compile_or_cache_load_seconds']:.2f} s (not in any timing)", flush=True)

    # (b) first two epochs: reference vs dynsim from the same initial weights
    layer = copy.deepcopy(layer0)
    W, L = layer0.dense_weights()
    mw, ml = dense_masks(layer0)
    t0 = time.perf_counter()
    ref_hist = reference_train(W, L, mw, ml, x_train, epochs=args.epochs, images=args.train_images)
    t_ref2 = time.perf_counter() - t0
    t0 = time.perf_counter()
    dyn_hist = dynsim_train(layer, x_train, epochs=args.epochs, images=args.train_images)
    t_dyn2 = time.perf_counter() - t0
    wd, ld = layer.dense_weights()
    dw = float((wd - W).norm() / W.norm())
    dl = float((ld - L).norm() / L.norm())
    print(f"(b) reference {t_ref2:.1f} s, dynsim {t_dyn2:.1f} s", flush=True)
    out["sections"]["b_two_epochs"] = {
        "images_per_epoch": args.train_images, "reference_seconds": t_ref2, "dynsim_seconds": t_dyn2,
        "ratio": t_ref2 / t_dyn2, "reference_history": ref_hist, "dynsim_history": dyn_hist,
        "relative_weight_difference": {"W": dw, "L": dl},
    }
    rows.append((f"(b) {args.epochs} epochs × {args.train_images} img, batch 1", t_ref2, t_dyn2))
    if args.acc_size:  # matched settings: both weight sets read out identically
        n_acc = len(xtr) if args.acc_size < 0 else args.acc_size
        n_acc_te = min(n_acc, len(xte))
        ref_layer = load_dense(copy.deepcopy(layer0), W, L)
        acc = {}
        for name, lay in (("reference", ref_layer), ("dynsim", layer)):
            kw = dict(solver=SiteNewton(), stop=stop, batch_size=args.eval_batch)
            rtr = settle_dataset(lay, xtr[:n_acc], **kw)
            rte = settle_dataset(lay, xte[:n_acc_te], **kw)
            pr = readout_accuracy("svc", rtr.r, ds.y_train[:n_acc], rte.r, ds.y_test[:n_acc_te])
            pr.pop("weights")
            acc[name] = {**pr, "fraction_converged": float(np.mean(np.concatenate([rtr.status, rte.status]) == 1))}
        out["sections"]["b_two_epochs"]["matched_accuracy"] = {"n_train": n_acc, "n_test": n_acc_te, **acc}
        print(f"(b) test accuracy after {args.epochs} epochs: reference {acc['reference']['accuracy']:.4f}, "
              f"dynsim {acc['dynsim']['accuracy']:.4f}", flush=True)

    # (a) settle fixed inputs on the trained weights (after 2 epochs), threads 1 and 2
    xs = torch.as_tensor(xte[: args.settle_inputs])
    sec_a = {}
    threads_list = [int(t) for t in args.threads.split(",")]
    for threads in threads_list:
        torch.set_num_threads(threads)
        t_ref, ref_res = median_time(lambda: [reference_settle(wd, ld, x) for x in xs], args.repeats)
        t_eul, eul = median_time(lambda: [settle(layer, x[None], solver=Euler(), stop=stop) for x in xs],
                                 args.repeats)
        t_new, new = median_time(lambda: [settle(layer, x[None], solver=SiteNewton(), stop=stop) for x in xs],
                                 args.repeats)
        r_ref = torch.stack([torch.tanh(u) for u, *_ in ref_res])
        r_new = torch.cat([res.r for res in new])
        sec_a[f"threads_{threads}"] = {
            "reference_s_per_input": t_ref / len(xs), "euler_s_per_input": t_eul / len(xs),
            "newton_s_per_input": t_new / len(xs),
            "ratio_euler": t_ref / t_eul, "ratio_newton": t_ref / t_new,
            "reference_mean_steps": float(np.mean([n for _, n, _, _ in ref_res])),
            "euler_mean_steps": float(np.mean([int(r.steps) for r in eul])),
            "newton_mean_steps": float(np.mean([int(r.steps) for r in new])),
            "max_residual": {"reference": max(res for *_, res in ref_res),
                             "euler": max(float(r.residual) for r in eul),
                             "newton": max(float(r.residual) for r in new)},
            "max_relative_rate_difference_newton_vs_reference": float(
                ((r_new - r_ref).norm(dim=1) / r_ref.norm(dim=1)).max()),
        }
        print(f"(a) threads {threads}: ref {t_ref:.2f} s, euler {t_eul:.2f} s, newton {t_new:.2f} s", flush=True)
        rows.append((f"(a) settle/input, Euler, {threads} thr", t_ref / len(xs), t_eul / len(xs)))
        rows.append((f"(a) settle/input, Newton, {threads} thr", t_ref / len(xs), t_new / len(xs)))
    torch.set_num_threads(1)
    out["sections"]["a_settle"] = sec_a
    ref_per_input = sec_a["threads_1"]["reference_s_per_input"]

    # (d) evaluation: settle all images in large batches + readout, threads 1 and 2
    n_tr = len(xtr) if args.eval_size is None else args.eval_size
    n_te = len(xte) if args.eval_size is None else min(args.eval_size, len(xte))
    sec_d = {}
    for threads in threads_list:
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        kw = dict(solver=SiteNewton(), stop=stop, batch_size=args.eval_batch)
        rep_tr = settle_dataset(layer, xtr[:n_tr], **kw)
        rep_te = settle_dataset(layer, xte[:n_te], **kw)
        t_settle = time.perf_counter() - t0
        probe = readout_accuracy("svc", rep_tr.r, ds.y_train[:n_tr], rep_te.r, ds.y_test[:n_te])
        probe.pop("weights")
        sec_d[f"threads_{threads}"] = {
            "settle_seconds": t_settle, "n_images": n_tr + n_te,
            "mean_steps": float(np.mean(np.concatenate([rep_tr.steps, rep_te.steps]))),
            "fraction_converged": float(np.mean(np.concatenate([rep_tr.status, rep_te.status]) == 1)),
            "probe": probe, "total_seconds": t_settle + probe["readout_seconds"],
        }
    torch.set_num_threads(1)
    best = min(sec_d.values(), key=lambda v: v["total_seconds"])
    if args.svc:
        svc = readout_accuracy("liblinear", rep_tr.r, ds.y_train[:n_tr], rep_te.r, ds.y_test[:n_te])
        sec_d["svc"] = svc
    ref_eval = ref_per_input * (n_tr + n_te) + sec_d.get("svc", {}).get("readout_seconds", 0.0)
    sec_d["reference_extrapolated_seconds"] = ref_eval
    out["sections"]["d_eval"] = sec_d
    rows.append((f"(d) eval {n_tr + n_te} img settle+probe (ref extrap.)", ref_eval, best["total_seconds"]))

    # (c) full default run: 120 epochs × 1000 images, readout every 15 (8 readouts)
    per_img_dyn = t_dyn2 / (args.epochs * args.train_images)
    eval_full = best["total_seconds"] * (70000 / (n_tr + n_te))
    dyn_full = 120 * 1000 * per_img_dyn + 8 * eval_full
    ref_full = 120 * 1000 * ref_per_input + 8 * ref_per_input * 70000
    sec_c = {"dynsim_extrapolated_seconds": dyn_full, "reference_extrapolated_seconds": ref_full,
             "note": "dynsim: per-image time of (b) × 120k + 8 × eval of (d); reference: per-input settle "
                     "time on trained weights of (a) × (120k + 8 × 70k), readout time not included"}
    full = None
    if args.full:  # the default configuration (solver auto = newton) with the probe readout
        full = run_dssm(DSSMConfig(data=args.data, readout="probe", progress=False))
    elif args.full_result:
        full = json.loads(Path(args.full_result).read_text())
    if full is not None:
        sec_c["dynsim_measured"] = full["final"]
        sec_c["dynsim_measured_seconds"] = full["final"]["total_seconds"]
        sec_c["source"] = "run in this benchmark" if args.full else args.full_result
        dyn_full = full["final"]["total_seconds"]
    out["sections"]["c_full"] = sec_c
    rows.append(("(c) full default run" + ("" if full is not None else " (extrapolated)"), ref_full, dyn_full))

    out["table"] = [{"what": w, "reference_s": r, "dynsim_s": d, "ratio": r / d} for w, r, d in rows]
    print(f"{'what':48s} {'reference s':>12s} {'dynsim s':>10s} {'ratio':>8s}")
    for w, r, d in rows:
        print(f"{w:48s} {r:12.4g} {d:10.4g} {r / d:8.1f}")
    print(f"(b) weights after {args.epochs} epochs: |ΔW|/|W| = {dw:.2e}, |ΔL|/|L| = {dl:.2e}")
    print(json.dumps({k: v for k, v in sec_d.items() if k.startswith("threads")}, indent=1, default=str)[:1500])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
