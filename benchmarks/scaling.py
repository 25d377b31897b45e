"""Scaling: time per image of settle, update and readout vs NpS and vs batch size, beside the arithmetic limit.

For each NpS in ``--nps`` (Fashion-MNIST 28×28, stride 2, radius 4: 196 sites) the layer is
first trained online on ``--warm-images`` images (so that L ≠ I and settling is not trivial),
then, for each batch size B in ``--batches``:

* **settle**: ``dynsim.settle`` (Newton, T = 1e-4, the default) of ``max(B, n)`` test images in
  batches of B, from rest; time per image;
* **update**: ``hebbian_update`` (the ``sum`` rule) with those batches and their settled rates;
  time per image (the weights are restored afterwards);

and once per NpS:

* **readout**: every readout of ``dynsim.evaluation.READOUTS``, called by name through
  ``readout_accuracy`` (so a new readout appears here without editing this script), fitted on
  the settled representations of ``--readout-train`` training images and scored on
  ``--readout-test`` test images; time per training image.

Beside each time, the *arithmetic limit* ``max(flop / sgemm peak, bytes / bandwidth)`` with
this machine's peaks measured in the same run (``machine_peak.py``) and the flop and byte
counts of :func:`counts` (the measured mean Newton steps enter the settle counts; a readout
that reports its iterations enters with them, one that does not with one pass over the data,
a lower bound). Cells whose estimated time exceeds ``--max-cell-seconds`` are skipped (marked).

Times are this thread's CPU time (``--clock cpu``, the default: the 2-core machine is shared)
at 1 thread. Writes JSON (``--out``), a table (stdout) and a plot (``--plot``).

Usage: PYTHONPATH=. python benchmarks/scaling.py --out runs/scaling.json --plot runs/scaling.png
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine_peak  # noqa: E402

from dynsim import settle  # noqa: E402
from dynsim.builders import build_layer, epoch_batches, prepare_data  # noqa: E402
from dynsim.engine import DynamicsSettler, Engine  # noqa: E402
from dynsim.evaluation import READOUTS, readout_accuracy, settle_dataset  # noqa: E402
from dynsim.pipelines.dssm import DSSMConfig  # noqa: E402
from dynsim.plasticity import SimilarityMatchingRule, hebbian_update  # noqa: E402
from dynsim.solvers import SiteNewton  # noqa: E402
from dynsim.stopping import stop_rule  # noqa: E402

STOP = stop_rule(1e-4, 3000)
CLOCK = time.thread_time


def counts(s, m, k, d, mean_steps, b):
    """Flop and bytes per image (float32) of the settle and the update at NpS ``m``, batch ``b``.

    settle: drive 2·S·M·K; per residual test (steps + 1) tanh (≈ 20 flop) + lateral 2·S·M² + 4·S·M;
    per Newton step the Jacobian S·M², elimination (2/3)·S·M³ + 2·S·M², update 4·S·M. Bytes: the
    weights once per batch (÷ b), the image, and per Newton step the Jacobian written and read
    (2·4·S·M² per image; it does not fit in cache beyond NpS ≈ 16 at batch > 1).
    update (sum rule): the correlation 2·S·M·(K + M) per image, the lerp 3·S·M·(K + M) per batch
    (÷ b); bytes: the weights read and written once per batch (÷ b), the image and its rates.
    """
    nn = s * m
    tests = mean_steps + 1
    w_entries = s * m * k + s * m * m
    settle_flop = 2 * s * m * k + tests * (20 * nn + 2 * s * m * m + 4 * nn) + mean_steps * (
        s * m * m + (2 / 3) * s * m**3 + 2 * s * m * m + 4 * nn)
    settle_bytes = 4 * w_entries / b + 4 * (d + 2 * nn) + mean_steps * 8 * s * m * m
    update_flop = 2 * s * m * (k + m) + 3 * w_entries / b
    update_bytes = 8 * w_entries / b + 4 * (d + nn)
    return {"settle_flop": settle_flop, "settle_bytes": settle_bytes, "update_flop": update_flop,
            "update_bytes": update_bytes, "weight_bytes": 4 * w_entries}


def readout_counts(n_features, n_classes, n_train, n_test, iterations):
    """Per training image: ``iterations`` passes of the two products (scores and gradient, 2·N·k flop
    each per image) plus the test scores; bytes: the features read twice per iteration."""
    it = max(iterations, 1)
    flop = 4 * n_features * n_classes * it + 2 * n_features * n_classes * n_test / n_train
    nbytes = 8 * n_features * it + 4 * n_features * n_test / n_train
    return flop, nbytes, 4 * n_features * n_train


def limits(c, peak):
    """(settle, update) arithmetic limits of a row's counts."""
    return (machine_peak.limit_seconds(c["settle_flop"], c["settle_bytes"], peak, working_set=c["settle_working_set"]),
            machine_peak.limit_seconds(c["update_flop"], c["update_bytes"], peak, working_set=c["update_working_set"]))


def relimit(path, plot_path=None):
    """Recompute the limits of a stored result with peaks measured now (e.g. after adding a cache
    level to ``machine_peak``); rows stored without working sets get them from NpS (196 sites)."""
    result = json.loads(Path(path).read_text())
    peak = machine_peak.measure()
    result["machine_peak_at_measurement"] = result["machine_peak"]
    result["machine_peak"] = peak
    for r in result["rows"]:
        if "skipped" in r:
            continue
        s, m, b = 196, r["nps"], r["batch"]
        r.setdefault("settle_working_set", r["weight_bytes"] + b * 8 * s * m * m)
        r.setdefault("update_working_set", r["weight_bytes"] + b * 4 * (784 + s * m))
        r["settle_limit_s"], r["update_limit_s"] = limits(r, peak)
    for r in result["readout_rows"]:
        if "skipped" in r:
            continue
        ws = r.get("working_set", 4 * r["n_features"] * r["n_train"])
        r["limit_s"] = machine_peak.limit_seconds(r["flop"], r["bytes"], peak, working_set=ws)
    Path(path).write_text(json.dumps(result, indent=1))
    print("machine:", {k: round(v, 1) for k, v in peak.items()})
    print_table(result["rows"], result["readout_rows"])
    if plot_path:
        plot(result).savefig(plot_path, dpi=110, bbox_inches="tight")


def timed(fn):
    t0 = CLOCK()
    out = fn()
    return CLOCK() - t0, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--nps", default="4,8,16,32,64,100")
    p.add_argument("--batches", default="1,10,100,1000")
    p.add_argument("--warm-images", type=int, default=200, help="online images before measuring (per NpS)")
    p.add_argument("--settle-images", type=int, default=200, help="images settled per cell (at least B)")
    p.add_argument("--large-nps-images", type=int, default=20, help="images per cell for NpS ≥ 64")
    p.add_argument("--readout-train", type=int, default=2000)
    p.add_argument("--readout-test", type=int, default=500)
    p.add_argument("--readouts", default=",".join(READOUTS), help="readouts by name (default: all of READOUTS)")
    p.add_argument("--max-cell-seconds", type=float, default=60.0)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    p.add_argument("--out", default="runs/scaling.json")
    p.add_argument("--plot", default=None)
    p.add_argument("--relimit", default=None, metavar="JSON",
                   help="only recompute the limits (and table, plot) of this stored result with peaks measured now")
    args = p.parse_args(argv)
    if args.relimit:
        torch.set_num_threads(1)
        relimit(args.relimit, args.plot)
        return
    global CLOCK
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    cfg = DSSMConfig(data=args.data)
    ds, xtr, xte = prepare_data(cfg)
    x_train = torch.as_tensor(xtr)
    peak = machine_peak.measure()
    print("machine:", {k: round(v, 1) for k, v in peak.items()}, flush=True)
    nps_list = [int(v) for v in args.nps.split(",")]
    batches = [int(v) for v in args.batches.split(",")]
    readouts = [r for r in args.readouts.split(",") if r]
    rows, readout_rows = [], []
    for m in nps_list:
        layer = build_layer(DSSMConfig(data=args.data, nps=m), ds.image_shape)
        s, _, k = layer.ff.weight.shape
        t_warm, _ = timed(lambda layer=layer: Engine(
            DynamicsSettler(layer, SiteNewton(), STOP), [SimilarityMatchingRule(layer)], progress=False).fit(
            epoch_batches(x_train, images=args.warm_images, batch_size=1, seed=0), 1))
        per_img_est = t_warm / args.warm_images
        print(f"NpS {m}: warm-up {args.warm_images} images {t_warm:.1f} s", flush=True)
        base_n = args.large_nps_images if m >= 64 else args.settle_images
        for b in batches:
            n = max(b, base_n)
            if per_img_est * n > args.max_cell_seconds:
                rows.append({"nps": m, "batch": b, "skipped": f"estimated {per_img_est * n:.0f} s "
                                                                 f"> --max-cell-seconds {args.max_cell_seconds:g}"})
                print(f"  B {b}: skipped", flush=True)
                continue
            x = torch.as_tensor(xte[:n])
            t0 = CLOCK()
            results = [settle(layer, x[i : i + b], solver=SiteNewton(), stop=STOP) for i in range(0, n, b)]
            t_settle = CLOCK() - t0
            steps = float(torch.cat([r.steps for r in results]).double().mean())
            w0, l0 = layer.ff.weight.clone(), layer.lateral.weight.clone()
            t0 = CLOCK()
            for i, res in zip(range(0, n, b), results, strict=True):
                hebbian_update(layer, x[i : i + b], res.r, 1e-4)
            t_update = CLOCK() - t0
            layer.ff.weight.copy_(w0)
            layer.lateral.weight.copy_(l0)
            c = counts(s, m, k, layer.input_size, steps, b)
            c["settle_working_set"] = c["weight_bytes"] + b * 8 * s * m * m
            c["update_working_set"] = c["weight_bytes"] + b * 4 * (layer.input_size + s * m)
            lim_s, lim_u = limits(c, peak)
            row = {"nps": m, "batch": b, "images": n, "mean_newton_steps": steps,
                   "settle_s_per_image": t_settle / n, "settle_limit_s": lim_s,
                   "update_s_per_image": t_update / n, "update_limit_s": lim_u, **c}
            rows.append(row)
            print(f"  B {b:5d}: settle {row['settle_s_per_image'] * 1e6:10.1f} µs (limit {lim_s * 1e6:8.2f}), "
                  f"update {row['update_s_per_image'] * 1e6:9.1f} µs (limit {lim_u * 1e6:7.2f}), "
                  f"{steps:.2f} steps", flush=True)
        # readouts on settled representations (batch 100)
        n_tr = args.readout_train if m < 64 else max(args.readout_train // 4, 200)
        n_te = args.readout_test if m < 64 else max(args.readout_test // 4, 100)
        if per_img_est * 0.5 * (n_tr + n_te) > 4 * args.max_cell_seconds:
            readout_rows.append({"nps": m, "skipped": "settling the readout's images would take too long"})
            continue
        kw = dict(solver=SiteNewton(), stop=STOP, batch_size=100)
        rtr = settle_dataset(layer, xtr[:n_tr], **kw)
        rte = settle_dataset(layer, xte[:n_te], **kw)
        for name in readouts:
            t0 = CLOCK()
            res = readout_accuracy(name, rtr.r, ds.y_train[:n_tr], rte.r, ds.y_test[:n_te])
            t_ro = CLOCK() - t0
            iters = res.get("readout_iterations")
            flop, nbytes, ws = readout_counts(rtr.r.shape[1], ds.n_classes, n_tr, n_te, iters or 1)
            lim = machine_peak.limit_seconds(flop, nbytes, peak, working_set=ws)
            readout_rows.append({"nps": m, "readout": name, "n_train": n_tr, "n_test": n_te, "working_set": ws,
                                 "n_features": int(rtr.r.shape[1]), "s_per_train_image": t_ro / n_tr,
                                 "limit_s": lim, "iterations": iters, "flop": flop, "bytes": nbytes,
                                 "limit_basis": "reported iterations" if iters else "one pass (lower bound)",
                                 "accuracy": res["accuracy"]})
            print(f"  readout {name}: {t_ro / n_tr * 1e6:9.1f} µs per train image (limit {lim * 1e6:.2f}), "
                  f"{n_tr} train × {rtr.r.shape[1]} features, iterations {iters}, acc {res['accuracy']:.3f}",
                  flush=True)
        write_partial(args, peak, rows, readout_rows)  # a long run keeps what it has measured
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    out = {"args": vars(args), "clock": args.clock, "machine_peak": peak, "uptime_at_end": uptime,
           "rows": rows, "readout_rows": readout_rows}
    print_table(rows, readout_rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(uptime)
    print("wrote", args.out)
    if args.plot:
        fig = plot(out)
        fig.savefig(args.plot, dpi=110, bbox_inches="tight")
        print("wrote", args.plot)


def write_partial(args, peak, rows, readout_rows):
    out = {"args": vars(args), "clock": args.clock, "machine_peak": peak, "partial": True, "rows": rows,
           "readout_rows": readout_rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


def print_table(rows, readout_rows):
    print(f"\n{'NpS':>4s} {'B':>5s} {'steps':>6s} {'settle µs':>11s} {'limit':>8s} {'×':>6s} "
          f"{'update µs':>10s} {'limit':>7s} {'×':>6s}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['nps']:4d} {r['batch']:5d}  skipped: {r['skipped']}")
            continue
        print(f"{r['nps']:4d} {r['batch']:5d} {r['mean_newton_steps']:6.2f} {r['settle_s_per_image'] * 1e6:11.1f} "
              f"{r['settle_limit_s'] * 1e6:8.2f} {r['settle_s_per_image'] / r['settle_limit_s']:6.0f} "
              f"{r['update_s_per_image'] * 1e6:10.1f} {r['update_limit_s'] * 1e6:7.2f} "
              f"{r['update_s_per_image'] / r['update_limit_s']:6.0f}")
    print(f"\n{'NpS':>4s} {'readout':>8s} {'µs/train img':>13s} {'limit':>8s} {'×':>6s}  basis")
    for r in readout_rows:
        if "skipped" in r:
            print(f"{r['nps']:4d}  skipped: {r['skipped']}")
            continue
        print(f"{r['nps']:4d} {r['readout']:>8s} {r['s_per_train_image'] * 1e6:13.1f} {r['limit_s'] * 1e6:8.2f} "
              f"{r['s_per_train_image'] / r['limit_s']:6.0f}  {r['limit_basis']}")


def plot(result):
    """Two panels: per-image time vs NpS (batch 1 and the largest batch run everywhere), and vs
    batch size at the smallest NpS; the arithmetic limits dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "skipped" not in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"settle": "C0", "update": "C1", "readout": "C2"}
    batches = sorted({r["batch"] for r in rows})
    for b, mark in zip(batches, "os^D", strict=False):
        sel = sorted((r for r in rows if r["batch"] == b), key=lambda r: r["nps"])
        if len(sel) < 2:
            continue
        npss = [r["nps"] for r in sel]
        for part in ("settle", "update"):
            ax1.plot(npss, [r[f"{part}_s_per_image"] * 1e6 for r in sel], marker=mark, color=colours[part],
                     label=f"{part}, B={b}")
            ax1.plot(npss, [r[f"{part}_limit_s"] * 1e6 for r in sel], ls="--", color=colours[part], alpha=0.5)
    for name in sorted({r["readout"] for r in result["readout_rows"] if "readout" in r}):
        sel = sorted((r for r in result["readout_rows"] if r.get("readout") == name), key=lambda r: r["nps"])
        ax1.plot([r["nps"] for r in sel], [r["s_per_train_image"] * 1e6 for r in sel], marker="x",
                 color=colours["readout"], ls="-" if name == "probe" else ":", label=f"readout {name}")
    ax1.set(xscale="log", yscale="log", xlabel="NpS (neurons per site)", ylabel="µs per image",
            title="vs NpS (dashed: arithmetic limit)")
    all_nps = sorted({r["nps"] for r in rows})
    ax1.set_xticks(all_nps, [str(v) for v in all_nps])
    ax1.minorticks_off()
    ax1.legend(fontsize=7, ncol=2)
    m0 = min(r["nps"] for r in rows)
    sel = sorted((r for r in rows if r["nps"] == m0), key=lambda r: r["batch"])
    for part in ("settle", "update"):
        ax2.plot([r["batch"] for r in sel], [r[f"{part}_s_per_image"] * 1e6 for r in sel], marker="o",
                 color=colours[part], label=part)
        ax2.plot([r["batch"] for r in sel], [r[f"{part}_limit_s"] * 1e6 for r in sel], ls="--",
                 color=colours[part], alpha=0.5, label=f"{part} limit")
    ax2.set(xscale="log", yscale="log", xlabel="batch size B", ylabel="µs per image", title=f"vs batch, NpS {m0}")
    ax2.set_xticks([r["batch"] for r in sel], [str(r["batch"]) for r in sel])
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
