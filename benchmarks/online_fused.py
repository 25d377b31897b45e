"""Issue 14 item 2: batch-1 online training on the Engine's fused backend vs the tight NumPy loop, one run.

NpS 4, Fashion-MNIST, T = 1e-4 field residual, cap 3000, the seed's learning rate, images drawn
as ``run_dssm`` draws them (``EpochDraws``, seed 0, 1000 per epoch), from the same weights:

(b) epochs 0–1 from the initial weights;
(e) epochs ``--late-epoch`` and the next (default 14–15; the weights after dynsim's fused
    training of epochs 0 … late−1), where the seed's Euler needs hundreds of steps per image.

Each is run by
  tight      the tight NumPy loop (``tight_loop.py``: per-site blocks, Euler, batch 1) — the baseline;
  per_input  dynsim's Engine with its per-input loop (``Engine(fused=False)``: settle + rule per image);
  fused      dynsim's Engine as ``run_dssm`` wires it (rule, SettlingMonitor, Evaluator not due):
             the fused backend (``dynsim/fused.py``) runs each epoch as one compiled call.
dynsim uses ``--solver auto`` = per-site Newton. Times: median of ``--repeats`` interleaved runs
(the tight loop: ``--tight-repeats``), CPU time of this thread (``--clock cpu``, default; the
machine is shared) or wall time. Printed and written: µs per image, ratios vs the tight loop,
the relative weight differences (fused vs per-input, dynsim vs tight), and the fused call's
parts (:func:`fused_parts`: settling and the update, each on frozen weights) beside their
arithmetic limits (``online_profile.arithmetic``,
``machine_peak``).

Usage: PYTHONPATH=. python benchmarks/online_fused.py --out runs/online_fused.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine_peak  # noqa: E402
from online_profile import arithmetic  # noqa: E402
from tight_loop import TightLoop  # noqa: E402

from dynsim import compiled  # noqa: E402
from dynsim.builders import build_layer, prepare_data  # noqa: E402
from dynsim.configs.dssm import DSSMConfig  # noqa: E402
from dynsim.engine import DynamicsSettler, Engine, EpochDraws  # noqa: E402
from dynsim.evaluation import Evaluator  # noqa: E402
from dynsim.monitors import SettlingMonitor  # noqa: E402
from dynsim.plasticity import SEED_RATE, SimilarityMatchingRule  # noqa: E402
from dynsim.solvers import SiteNewton  # noqa: E402
from dynsim.stopping import stop_rule  # noqa: E402

STOP = stop_rule(1e-4, 3000)
CLOCK = time.thread_time


def engine_train(layer, x, xte, yte, *, fused, start, epochs, images):
    """Train ``layer`` in place through the Engine; returns (seconds, monitor, engine)."""
    rule, monitor = SimilarityMatchingRule(layer), SettlingMonitor()
    # wired as run_dssm wires it, but never due here (its evaluations are item 3's, not the online step's)
    ev = Evaluator(layer, x_train=xte[:20], y_train=yte[:20], x_test=xte[:20], y_test=yte[:20], solver=SiteNewton(),
                   stop=STOP, every=0, epochs=10**9, readout="svc", progress=False)
    engine = Engine(DynamicsSettler(layer, SiteNewton(), STOP), [rule, monitor, ev], progress=False, fused=fused)
    draws = EpochDraws(x, images=images, batch_size=1, seed=0)
    t0 = CLOCK()
    engine.fit(draws, start + epochs, start_epoch=start)
    return CLOCK() - t0, monitor, engine


def tight_train(layer, x_np, *, start, epochs, images):
    tl = TightLoop.from_layer(layer)
    with threadpool_limits(1):
        t0 = CLOCK()
        hist = tl.train(x_np, epochs=start + epochs, images=images, seed=0, start_epoch=start)
        return CLOCK() - t0, hist, tl


def fused_parts(layer, x, *, epoch, images, repeats):
    """The fused call on ``epoch``'s draws from ``layer``'s weights (s per image, median of ``repeats``):
    ``settle`` with learning off; ``update`` = learning on with zero rates (the same arithmetic, the
    same frozen weights, so the same steps) minus ``settle``; ``settle_update`` learning as in training."""
    loop = compiled.loop_arguments(layer, **compiled.kernel_settings(SiteNewton(), STOP.limits(), 1e6))
    order = EpochDraws(x, images=images, batch_size=1, seed=0).order(epoch).numpy()
    xs = x.numpy()
    eta = SEED_RATE(epoch)
    times = {"settle": [], "zero_rate_update": [], "settle_update": []}
    steps_of = {}
    for _ in range(repeats):
        for name, learn, rate in (("settle", False, 0.0), ("zero_rate_update", True, 0.0),
                                  ("settle_update", True, eta)):
            lay = copy.deepcopy(layer)
            w, ff_index, n_pixels, channels, lat, _ = compiled._arrays(lay)
            n = lay.state_size
            u, r = np.zeros((1, n), np.float32), np.zeros((1, n), np.float32)
            k = order.shape[0]
            steps, status = np.empty(k, np.int64), np.empty(k, np.int8)
            residual, evals = np.empty(k, np.float32), np.empty(k, np.int64)
            t0 = CLOCK()
            compiled._train_online(xs, order, w, ff_index, n_pixels, channels, lat, *loop, np.float32(rate),
                                   np.float32(0.5 * rate), learn, True, False, u, r, steps, status, residual, evals)
            times[name].append((CLOCK() - t0) / k)
            steps_of[name] = float(steps.mean())
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"settle": med["settle"], "update": med["zero_rate_update"] - med["settle"],
            "settle_update": med["settle_update"], "mean_steps_frozen": steps_of["settle"],
            "mean_steps_learn": steps_of["settle_update"]}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--images", type=int, default=1000, help="images per epoch")
    p.add_argument("--late-epoch", type=int, default=14)
    p.add_argument("--repeats", type=int, default=5, help="dynsim runs per section (median)")
    p.add_argument("--tight-repeats", type=int, default=1, help="tight-loop runs per section (median)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="cpu: this thread's CPU time (default; the machine is shared); wall: perf_counter")
    p.add_argument("--out", default="runs/online_fused.json")
    args = p.parse_args(argv)
    global CLOCK
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    uptime_start = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    cfg = DSSMConfig(data=args.data)
    ds, xtr, xte = prepare_data(cfg)
    x = torch.as_tensor(xtr)
    x_np = np.asarray(xtr, np.float32)
    layer0 = build_layer(cfg, ds.image_shape)
    engine_train(copy.deepcopy(layer0), x, xte, ds.y_test, fused=True, start=0, epochs=1, images=5)  # compile/load
    peak = machine_peak.measure()
    print("machine:", {k: round(v, 1) for k, v in peak.items()}, flush=True)

    late = args.late_epoch
    base = copy.deepcopy(layer0)  # the weights at the start of epoch `late`
    t_pre, _, _ = engine_train(base, x, xte, ds.y_test, fused=True, start=0, epochs=late, images=args.images)
    sections = {"first": (0, layer0), "late": (late, base)}
    result = {"args": vars(args), "uptime_start": uptime_start, "machine_peak": peak,
              "pretrain_seconds_epochs_0_to_late": t_pre, "sections": {}}
    rows = []
    for name, (start, weights) in sections.items():
        times = {"fused": [], "per_input": [], "tight": []}
        finals = {}
        for rep in range(max(args.repeats, args.tight_repeats)):  # interleaved: load changes hit all alike
            for which in ("fused", "per_input"):
                if rep >= args.repeats:
                    continue
                lay = copy.deepcopy(weights)
                t, mon, eng = engine_train(lay, x, xte, ds.y_test, fused=which == "fused", start=start, epochs=2,
                                           images=args.images)
                times[which].append(t)
                finals[which] = (lay, mon, eng)
            if rep < args.tight_repeats:
                t, hist, tl = tight_train(weights, x_np, start=start, epochs=2, images=args.images)
                times["tight"].append(t)
                finals["tight"] = (tl, hist)
        n_img = 2 * args.images
        per = {k: statistics.median(v) / n_img for k, v in times.items()}
        lay_f, mon_f, eng_f = finals["fused"]
        lay_p, mon_p, eng_p = finals["per_input"]
        tw, tlat = finals["tight"][0].weights()
        parts = fused_parts(weights, x, epoch=start, images=args.images, repeats=args.repeats)
        sec = {
            "epochs": [start, start + 1],
            "us_per_image": {k: v * 1e6 for k, v in per.items()},
            "all_seconds": times,
            "ratio_fused_vs_tight": per["tight"] / per["fused"],
            "ratio_per_input_vs_tight": per["tight"] / per["per_input"],
            "ratio_fused_vs_per_input": per["per_input"] / per["fused"],
            "backend_fused_run": [h["online_backend"] for h in eng_f.history],
            "backend_per_input_run": [h["online_backend"] for h in eng_p.history],
            "newton_steps_per_image": float(mon_f.iterations.mean()),
            "tight_euler_steps_per_image": [h["mean_steps"] for h in finals["tight"][1]],
            "same_steps_and_status_fused_vs_per_input": bool(
                np.array_equal(mon_f.iterations, mon_p.iterations) and np.array_equal(mon_f.status, mon_p.status)),
            "fraction_settled": float(np.mean(mon_f.status == 1)),
            "relative_weight_difference": {
                "fused_vs_per_input": {"W": rel(lay_f.ff.weight, lay_p.ff.weight),
                                       "L": rel(lay_f.lateral.weight, lay_p.lateral.weight)},
                "fused_vs_tight": {"W": rel(lay_f.ff.weight, tw), "L": rel(lay_f.lateral.weight, tlat)},
            },
            "fused_call_parts_us_per_image": {k: parts[k] * 1e6 for k in ("settle", "update", "settle_update")},
            "fused_call_mean_steps": {k: parts[k] for k in ("mean_steps_frozen", "mean_steps_learn")},
        }
        ar = arithmetic(weights, parts["mean_steps_frozen"])
        sec["arithmetic"] = ar
        sec["limit_us"] = {"settle": machine_peak.limit_seconds(ar["settle_flop"], ar["settle_bytes"], peak) * 1e6,
                           "update": machine_peak.limit_seconds(ar["update_flop"], ar["update_bytes"], peak) * 1e6}
        result["sections"][name] = sec
        rows.append((name, sec))
        print(f"\nepochs {start}-{start + 1}: µs/image fused {sec['us_per_image']['fused']:.1f}, per-input "
              f"{sec['us_per_image']['per_input']:.1f}, tight {sec['us_per_image']['tight']:.1f}", flush=True)

    print(f"\n{'epochs':8s} {'tight µs':>9s} {'per-input µs':>13s} {'fused µs':>9s} {'fused×tight':>12s} "
          f"{'per-input×tight':>16s} {'Newton st.':>10s} {'Euler st.':>10s} {'ΔW fused/per-in':>16s} "
          f"{'ΔW fused/tight':>15s}")
    for _, s in rows:
        u = s["us_per_image"]
        print(f"{s['epochs'][0]}-{s['epochs'][1]:<6d} {u['tight']:9.1f} {u['per_input']:13.1f} {u['fused']:9.1f} "
              f"{s['ratio_fused_vs_tight']:12.1f} {s['ratio_per_input_vs_tight']:16.1f} "
              f"{s['newton_steps_per_image']:10.2f} {np.mean(s['tight_euler_steps_per_image']):10.1f} "
              f"{s['relative_weight_difference']['fused_vs_per_input']['W']:16.1e} "
              f"{s['relative_weight_difference']['fused_vs_tight']['W']:15.1e}")
    print(f"\n{'fused call, epochs':20s} {'settle µs':>10s} {'limit':>7s} {'update µs':>10s} {'limit':>7s} "
          f"{'learning µs':>12s}")
    for _, s in rows:
        q, lim = s["fused_call_parts_us_per_image"], s["limit_us"]
        print(f"{s['epochs'][0]}-{s['epochs'][1]:<18d} {q['settle']:10.1f} {lim['settle']:7.1f} {q['update']:10.1f} "
              f"{lim['update']:7.1f} {q['settle_update']:12.1f}")
    result["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(result["uptime_start"], "/", result["uptime_end"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
