"""DSSM speed: dynsim against two baselines, measured in the same run on the same images and weights.

Baselines (both batch 1 online, forward Euler with the seed's schedule, the same stop test
``‖du/ds‖/‖u‖ < T`` and the same learning rule; same initial weights and image sequence):

* **tight NumPy loop** (``tight_loop.py``): the lateral matrix as its per-site NpS × NpS blocks,
  preallocated float32 arrays, site-last ``einsum``; a vectorised batch variant with per-image
  stopping for evaluation. What a competent user would write: *the* baseline of every ratio.
* **authors' dense formulation** (``reference_loop.py``): dense ``W`` (N × D) and ``L`` (N × N) in
  torch, as the authors' code runs. Reported separately, labelled "vs authors' dense".

Prints a table and writes JSON (``--out``). Ratios are baseline time / dynsim time (> 1: dynsim
is faster), each timing the median of ``--repeats`` runs. Sections:

(a) settle ``--settle-inputs`` fixed test images one by one on the weights after (b), at equal
    residual: dense reference, tight loop, dynsim Euler, dynsim per-site Newton; ``--threads``
    (the tight loop always on one core).
(b) the first ``--epochs`` (2) training epochs (batch 1, online): dense reference, tight loop,
    dynsim (Newton); the distances between the weight sets, and (``--acc-size``) the reference's
    and dynsim's weights read out the same way (matched accuracy).
(e) epochs ``--late-epoch`` and the next one (default 14–15, where Euler needs hundreds of steps
    per image): dynsim trains epochs 0 … late−1, then the tight loop and dynsim each train the
    two epochs from those same weights (``--late-reference`` adds the dense reference).
(d) evaluation: settle ``--eval-size`` train + test images (dynsim: Newton, batch ``--eval-batch``;
    tight loop: its batch variant, Euler, batch ``--eval-batch``, measured) and fit the probe
    readout (LinearSVC with ``--svc``); the dense reference's settling extrapolated from (a).
(c) the full default run (120 epochs × 1000 images, readout every 15): dynsim measured with
    ``--full`` or read from ``--full-result``, else extrapolated; the baselines extrapolated
    (hours): the tight loop as 120,000 × its per-image time of (e) (a lower bound: Euler's
    steps keep growing after epoch 15) + 8 × 70,000 × its per-image settle of (d); the dense
    reference as before (per-input settle of (a) × (120k + 8 × 70k)).

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
from threadpoolctl import threadpool_limits  # noqa: E402
from tight_loop import TightLoop  # noqa: E402

from dynsim import settle  # noqa: E402
from dynsim.builders import build_layer, prepare_data  # noqa: E402
from dynsim.evaluation import settle_dataset  # noqa: E402
from dynsim.pipelines.dssm import DSSMConfig, run_dssm  # noqa: E402
from dynsim.plasticity import SimilarityMatchingRule  # noqa: E402
from dynsim.readouts import readout_accuracy  # noqa: E402
from dynsim.solvers import Euler, SiteNewton  # noqa: E402
from dynsim.stopping import stop_rule  # noqa: E402

# the clock of every timing here: perf_counter (wall) unless main() is told --clock cpu
CLOCK = time.perf_counter


def median_time(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = CLOCK()
        out = fn()
        times.append(CLOCK() - t0)
    return statistics.median(times), out


def dynsim_train(layer, x_train, *, epochs, images, seed=0, start_epoch=0):
    """Online training with the Newton solver through the engine, with the plasticity rule and the
    settling monitor (as ``run_dssm`` wires it; its evaluator only acts at epoch ends)."""
    from dynsim.builders import epoch_batches
    from dynsim.engine import DynamicsSettler, Engine
    from dynsim.monitors import SettlingMonitor

    stop = stop_rule(1e-4, 3000)
    rule = SimilarityMatchingRule(layer)
    engine = Engine(DynamicsSettler(layer, SiteNewton(), stop), [rule, SettlingMonitor()], progress=False)
    batches = epoch_batches(x_train, images=images, batch_size=1, seed=seed)
    with torch.no_grad():
        engine.fit(batches, epochs, start_epoch=start_epoch)
    return engine.history


def tight_train(layer, x_train, *, epochs, images, seed=0, start_epoch=0):
    """The tight NumPy loop from ``layer``'s weights; returns (seconds, history, loop)."""
    tl = TightLoop.from_layer(layer)
    xs = np.asarray(x_train, np.float32)
    with threadpool_limits(1):
        t0 = CLOCK()
        hist = tl.train(xs, epochs=epochs, images=images, seed=seed, start_epoch=start_epoch)
        seconds = CLOCK() - t0
    return seconds, hist, tl


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--settle-inputs", type=int, default=30)
    p.add_argument("--train-images", type=int, default=1000, help="images per epoch in (b) and (e)")
    p.add_argument("--eval-batch", type=int, default=1000)
    p.add_argument("--eval-size", type=int, default=None, help="settle only this many train and test images in (d)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--svc", action="store_true", help="also time LinearSVC in (d)")
    p.add_argument("--full", action="store_true", help="run the full default config in (c) (else extrapolate)")
    p.add_argument("--full-result", default=None, help="(c) from this run_dssm result JSON of the default config")
    p.add_argument("--epochs", type=int, default=2, help="training epochs in (b)")
    p.add_argument("--late-epoch", type=int, default=14, help="(e): train epochs late, late+1 (0: skip (e))")
    p.add_argument("--late-reference", action="store_true", help="(e): the dense reference too (slow)")
    p.add_argument("--acc-size", type=int, default=0,
                   help="(b) read out both runs' weights on this many train and test images (0: skip; -1: all)")
    p.add_argument("--threads", default="1,2", help="thread counts for (a) and (d), e.g. 1 or 1,2")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="cpu (default): this process's CPU time (time.process_time), so that other jobs on a "
                        "shared machine do not count; with 2 threads it adds both threads' time (no parallel "
                        "speed-up shows): use wall for thread comparisons on a quiet machine")
    p.add_argument("--out", default="runs/dssm_speed.json")
    args = p.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    cfg = DSSMConfig(data=args.data)
    ds, xtr, xte = prepare_data(cfg)
    x_train = torch.as_tensor(xtr)
    layer0 = build_layer(cfg, ds.image_shape)
    stop = stop_rule(1e-4, 3000)
    out = {"data": args.data, "args": vars(args), "torch": torch.__version__, "sections": {},
           "clock": "process CPU time" if args.clock == "cpu" else "wall (perf_counter)",
           "uptime_at_start": _uptime()}
    rows = []  # (what, dense reference s or None, tight s or None, dynsim s)

    # numba compiles dynsim's kernels once per machine (then loads them from its cache in
    # ~0.35 s): do it before any timing, and report it
    import copy

    t0 = CLOCK()
    dynsim_train(copy.deepcopy(layer0), x_train, epochs=1, images=2)
    settle(copy.deepcopy(layer0), torch.as_tensor(xte[:300]), solver=SiteNewton(), stop=stop)
    settle(copy.deepcopy(layer0), torch.as_tensor(xte[:2]), solver=Euler(), stop=stop)
    out["compile_or_cache_load_seconds"] = CLOCK() - t0
    print(f"kernels compiled or loaded in {out['compile_or_cache_load_seconds']:.2f} s (not in any timing)", flush=True)

    # (b) first epochs: dense reference, tight loop and dynsim from the same initial weights
    layer = copy.deepcopy(layer0)
    W, L = layer0.dense_weights()
    mw, ml = dense_masks(layer0)
    t0 = CLOCK()
    ref_hist = reference_train(W, L, mw, ml, x_train, epochs=args.epochs, images=args.train_images)
    t_ref2 = CLOCK() - t0
    t_tight2, tight_hist, tight = tight_train(layer0, xtr, epochs=args.epochs, images=args.train_images)
    t0 = CLOCK()
    dyn_hist = dynsim_train(layer, x_train, epochs=args.epochs, images=args.train_images)
    t_dyn2 = CLOCK() - t0
    wd, ld = layer.dense_weights()
    tw, tl_ = tight.weights()
    dw = float((wd - W).norm() / W.norm())
    dl = float((ld - L).norm() / L.norm())
    print(f"(b) reference {t_ref2:.1f} s, tight {t_tight2:.2f} s, dynsim {t_dyn2:.2f} s", flush=True)
    out["sections"]["b_two_epochs"] = {
        "images_per_epoch": args.train_images, "reference_seconds": t_ref2, "tight_seconds": t_tight2,
        "dynsim_seconds": t_dyn2, "ratio_vs_tight": t_tight2 / t_dyn2, "ratio_vs_dense_reference": t_ref2 / t_dyn2,
        "reference_history": ref_hist, "tight_history": tight_hist, "dynsim_history": dyn_hist,
        "relative_weight_difference": {"W": dw, "L": dl},
        "relative_weight_difference_tight_vs_dynsim": {"W": rel(tw, layer.ff.weight),
                                                       "L": rel(tl_, layer.lateral.weight)},
    }
    rows.append((f"(b) {args.epochs} epochs × {args.train_images} img, batch 1", t_ref2, t_tight2, t_dyn2))
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

    # (a) settle fixed inputs on the trained weights (after (b))
    xs = torch.as_tensor(xte[: args.settle_inputs])
    xs_np = np.asarray(xte[: args.settle_inputs], np.float32)
    tight_a = TightLoop.from_layer(layer)
    with threadpool_limits(1):
        t_tight, tight_res = median_time(lambda: [tight_a.settle(x) for x in xs_np], args.repeats)
    sec_a = {"tight_s_per_input": t_tight / len(xs), "tight_mean_steps": float(np.mean([n for n, _, _ in tight_res])),
             "tight_max_residual": max(r for *_, r in tight_res)}
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
            "ratio_newton_vs_tight": t_tight / t_new, "ratio_euler_vs_tight": t_tight / t_eul,
            "reference_mean_steps": float(np.mean([n for _, n, _, _ in ref_res])),
            "euler_mean_steps": float(np.mean([int(r.steps) for r in eul])),
            "newton_mean_steps": float(np.mean([int(r.steps) for r in new])),
            "max_residual": {"reference": max(res for *_, res in ref_res),
                             "euler": max(float(r.residual) for r in eul),
                             "newton": max(float(r.residual) for r in new)},
            "max_relative_rate_difference_newton_vs_reference": float(
                ((r_new - r_ref).norm(dim=1) / r_ref.norm(dim=1)).max()),
        }
        print(f"(a) threads {threads}: ref {t_ref:.2f} s, tight {t_tight:.3f} s, euler {t_eul:.3f} s, "
              f"newton {t_new:.4f} s", flush=True)
        rows.append((f"(a) settle/input, Euler, {threads} thr", t_ref / len(xs), t_tight / len(xs), t_eul / len(xs)))
        rows.append((f"(a) settle/input, Newton, {threads} thr", t_ref / len(xs), t_tight / len(xs),
                     t_new / len(xs)))
    torch.set_num_threads(1)
    out["sections"]["a_settle"] = sec_a
    ref_per_input = sec_a["threads_1"]["reference_s_per_input"]

    # (e) late epochs: from the same weights after `late` epochs of dynsim training
    t_tight_late = None
    if args.late_epoch:
        late = args.late_epoch
        base = copy.deepcopy(layer0)
        t0 = CLOCK()
        dynsim_train(base, x_train, epochs=late, images=args.train_images)
        t_pre = CLOCK() - t0
        lay_e = copy.deepcopy(base)
        t_tight_late, tight_hist_e, tight_e = tight_train(base, xtr, epochs=late + 2, images=args.train_images,
                                                          start_epoch=late)
        t0 = CLOCK()
        dyn_hist_e = dynsim_train(lay_e, x_train, epochs=late + 2, images=args.train_images, start_epoch=late)
        t_dyn_late = CLOCK() - t0
        tw_e, tl_e = tight_e.weights()
        sec_e = {"epochs": [late, late + 1], "dynsim_pretrain_seconds": t_pre, "tight_seconds": t_tight_late,
                 "dynsim_seconds": t_dyn_late, "ratio_vs_tight": t_tight_late / t_dyn_late,
                 "tight_history": tight_hist_e, "dynsim_history": dyn_hist_e,
                 "relative_weight_difference_tight_vs_dynsim": {"W": rel(tw_e, lay_e.ff.weight),
                                                                "L": rel(tl_e, lay_e.lateral.weight)}}
        t_ref_late = None
        if args.late_reference:
            We, Le = base.dense_weights()
            t0 = CLOCK()
            sec_e["reference_history"] = reference_train(We, Le, mw, ml, x_train, epochs=late + 2,
                                                         images=args.train_images, start_epoch=late)
            t_ref_late = CLOCK() - t0
            sec_e["reference_seconds"] = t_ref_late
            sec_e["ratio_vs_dense_reference"] = t_ref_late / t_dyn_late
        out["sections"]["e_late_epochs"] = sec_e
        print(f"(e) epochs {late}-{late + 1}: tight {t_tight_late:.2f} s, dynsim {t_dyn_late:.3f} s", flush=True)
        rows.append((f"(e) epochs {late}–{late + 1} × {args.train_images} img, batch 1", t_ref_late, t_tight_late,
                     t_dyn_late))

    # (d) evaluation: settle the images in large batches + readout, threads 1 and 2
    n_tr = len(xtr) if args.eval_size is None else args.eval_size
    n_te = len(xte) if args.eval_size is None else min(args.eval_size, len(xte))
    sec_d = {}
    tight_d = TightLoop.from_layer(layer)
    with threadpool_limits(1):
        t0 = CLOCK()
        steps_t = []
        for xset, n in ((xtr, n_tr), (xte, n_te)):
            for start in range(0, n, args.eval_batch):
                steps_t.append(tight_d.settle_batch(xset[start : min(start + args.eval_batch, n)])[1])
        t_tight_settle = CLOCK() - t0
    sec_d["tight_settle_seconds"] = t_tight_settle
    sec_d["tight_mean_steps"] = float(np.mean(np.concatenate(steps_t)))
    for threads in threads_list:
        torch.set_num_threads(threads)
        t0 = CLOCK()
        kw = dict(solver=SiteNewton(), stop=stop, batch_size=args.eval_batch)
        rep_tr = settle_dataset(layer, xtr[:n_tr], **kw)
        rep_te = settle_dataset(layer, xte[:n_te], **kw)
        t_settle = CLOCK() - t0
        t0 = CLOCK()
        probe = readout_accuracy("svc", rep_tr.r, ds.y_train[:n_tr], rep_te.r, ds.y_test[:n_te])
        probe["readout_seconds"] = CLOCK() - t0  # on the benchmark's clock
        probe.pop("test_predictions")
        probe.pop("weights")
        sec_d[f"threads_{threads}"] = {
            "settle_seconds": t_settle, "n_images": n_tr + n_te,
            "mean_steps": float(np.mean(np.concatenate([rep_tr.steps, rep_te.steps]))),
            "fraction_converged": float(np.mean(np.concatenate([rep_tr.status, rep_te.status]) == 1)),
            "probe": probe, "total_seconds": t_settle + probe["readout_seconds"],
        }
        rows.append((f"(d) settle {n_tr + n_te} img, batch {args.eval_batch}, {threads} thr (ref extrap.)",
                     ref_per_input * (n_tr + n_te), t_tight_settle, t_settle))
    torch.set_num_threads(1)
    best = min((v for k, v in sec_d.items() if k.startswith("threads")), key=lambda v: v["total_seconds"])
    if args.svc:
        svc = readout_accuracy("liblinear", rep_tr.r, ds.y_train[:n_tr], rep_te.r, ds.y_test[:n_te])
        sec_d["svc"] = svc
    readout_s = best["probe"]["readout_seconds"]
    ref_eval = ref_per_input * (n_tr + n_te) + readout_s
    tight_eval = t_tight_settle + readout_s
    sec_d["reference_extrapolated_seconds"] = ref_eval
    sec_d["tight_seconds_with_the_same_probe"] = tight_eval
    sec_d["note"] = "baselines' readout: dynsim's probe time added (same features size, same readout)"
    out["sections"]["d_eval"] = sec_d
    rows.append((f"(d) eval {n_tr + n_te} img settle+probe (ref extrap.)", ref_eval, tight_eval,
                 best["total_seconds"]))

    # (c) full default run: 120 epochs × 1000 images, readout every 15 (8 readouts)
    per_img_dyn = t_dyn2 / (args.epochs * args.train_images)
    eval_full = best["total_seconds"] * (70000 / (n_tr + n_te))
    dyn_full = 120 * 1000 * per_img_dyn + 8 * eval_full
    ref_full = 120 * 1000 * ref_per_input + 8 * ref_per_input * 70000
    tight_train_img = (t_tight_late if t_tight_late is not None else t_tight2) / (2 * args.train_images)
    tight_full = 120 * 1000 * tight_train_img + 8 * 70000 * (tight_eval / (n_tr + n_te))
    sec_c = {"dynsim_extrapolated_seconds": dyn_full, "reference_extrapolated_seconds": ref_full,
             "tight_extrapolated_seconds": tight_full,
             "note": "dynsim: per-image time of (b) × 120k + 8 × eval of (d); reference: per-input settle "
                     "time on trained weights of (a) × (120k + 8 × 70k), readout time not included; tight: "
                     "per-image time of (e) (else (b)) × 120k + 8 × 70k × per-image settle + probe of (d) "
                     "(a lower bound: Euler needs more steps as training goes on)"}
    full = None
    if args.full:  # the default configuration (solver auto = newton, readout svc)
        t0 = CLOCK()
        full = run_dssm(DSSMConfig(data=args.data, readout="svc", progress=False))
        full["final"]["total_seconds_wall"] = full["final"]["total_seconds"]
        full["final"]["total_seconds"] = CLOCK() - t0  # on the benchmark's clock
    elif args.full_result:
        full = json.loads(Path(args.full_result).read_text())
    if full is not None:
        sec_c["dynsim_measured"] = full["final"]
        sec_c["dynsim_measured_seconds"] = full["final"]["total_seconds"]
        sec_c["source"] = "run in this benchmark" if args.full else args.full_result
        dyn_full = full["final"]["total_seconds"]
    out["sections"]["c_full"] = sec_c
    rows.append(("(c) full default run" + ("" if full is not None else " (extrapolated)") + " (baselines extrap.)",
                 ref_full, tight_full, dyn_full))

    out["table"] = [{"what": w, "reference_s": r, "tight_s": t, "dynsim_s": d,
                     "ratio_vs_tight": None if t is None else t / d,
                     "ratio_vs_dense_reference": None if r is None else r / d} for w, r, t, d in rows]
    out["uptime_at_end"] = _uptime()
    print(f"\n{'what':58s} {'dense ref s':>11s} {'tight s':>9s} {'dynsim s':>9s} {'vs tight':>9s} "
          f"{'vs dense':>9s}")
    for w, r, t, d in rows:
        fr = "" if r is None else f"{r:11.4g}"
        ft = "" if t is None else f"{t:9.4g}"
        print(f"{w:58s} {fr:>11s} {ft:>9s} {d:9.4g} {'' if t is None else f'{t / d:9.1f}':>9s} "
              f"{'' if r is None else f'{r / d:9.1f}':>9s}")
    print(f"(b) weights after {args.epochs} epochs: dynsim vs dense |ΔW|/|W| = {dw:.2e}, |ΔL|/|L| = {dl:.2e}; "
          f"tight vs dynsim {out['sections']['b_two_epochs']['relative_weight_difference_tight_vs_dynsim']}")
    print(out["uptime_at_start"], "→", out["uptime_at_end"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print("wrote", args.out)


def _uptime():
    import subprocess

    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    main()
