"""Issue 14 item 3: settling all 70,000 Fashion-MNIST images for one evaluation, 1 vs 2 threads.

The layer is trained online for ``--epochs`` epochs (fused backend, as ``run_dssm``), then every
train and test image is settled from rest with ``settle_dataset`` exactly as the ``Evaluator``
does (per-site Newton, T = 1e-4, cap 3000, batches of 1000), at 1 and 2 threads
(``torch.set_num_threads``: the compiled kernel then runs on contiguous slices in that many
Python threads). Median of ``--repeats`` interleaved runs; printed and written: wall seconds,
this process's CPU seconds, CPU µs per image, Newton steps, and the arithmetic limit of the
settle per image (``online_profile.arithmetic``, ``machine_peak``). Run it with the machine's
load in mind: on a shared machine 2 threads can only be faster when 2 cores are free (the
JSON keeps ``uptime``).

Usage: PYTHONPATH=. python benchmarks/eval_settle.py --out runs/eval_settle.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as importing dynsim first does (dynsim/__init__.py)
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine_peak  # noqa: E402
from online_profile import arithmetic  # noqa: E402

from dynsim.builders import build_layer, prepare_data  # noqa: E402
from dynsim.configs.dssm import DSSMConfig  # noqa: E402
from dynsim.engine import DynamicsSettler, Engine, EpochDraws  # noqa: E402
from dynsim.evaluation import settle_dataset  # noqa: E402
from dynsim.plasticity import SimilarityMatchingRule  # noqa: E402
from dynsim.solvers import SiteNewton  # noqa: E402
from dynsim.stopping import stop_rule  # noqa: E402


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--epochs", type=int, default=15, help="online epochs before the evaluation")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="runs/eval_settle.json")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    start = uptime()
    cfg = DSSMConfig(data=args.data)
    ds, xtr, xte = prepare_data(cfg)
    layer = build_layer(cfg, ds.image_shape)
    stop = stop_rule(1e-4, 3000)
    Engine(DynamicsSettler(layer, SiteNewton(), stop), [SimilarityMatchingRule(layer)], progress=False).fit(
        EpochDraws(torch.as_tensor(xtr), images=1000, batch_size=1, seed=0), args.epochs)
    peak = machine_peak.measure()
    threads = [int(t) for t in args.threads.split(",")]
    wall = {t: [] for t in threads}
    cpu = {t: [] for t in threads}
    steps = None
    for _ in range(args.repeats):
        for t in threads:
            torch.set_num_threads(t)
            t0, c0 = time.perf_counter(), time.process_time()
            reps = [settle_dataset(layer, x, solver=SiteNewton(), stop=stop, batch_size=1000) for x in (xtr, xte)]
            wall[t].append(time.perf_counter() - t0)
            cpu[t].append(time.process_time() - c0)
            steps = np.concatenate([r.steps for r in reps])
    n = len(xtr) + len(xte)
    mean_steps = float(steps.mean())
    ar = arithmetic(layer, mean_steps)
    limit = machine_peak.limit_seconds(ar["settle_flop"], ar["settle_bytes"], peak)
    rows = {t: {"wall_seconds": statistics.median(wall[t]), "cpu_seconds": statistics.median(cpu[t]),
                "cpu_us_per_image": statistics.median(cpu[t]) / n * 1e6, "all_wall": wall[t], "all_cpu": cpu[t]}
            for t in threads}
    print(f"settle {n} images after {args.epochs} epochs: Newton {mean_steps:.2f} steps per image, "
          f"limit {limit * 1e6:.1f} µs per image on one core ({limit * n:.2f} s)")
    print(f"{'threads':>7s} {'wall s':>8s} {'CPU s':>8s} {'CPU µs/image':>13s} {'× limit':>8s}")
    for t, r in rows.items():
        print(f"{t:7d} {r['wall_seconds']:8.2f} {r['cpu_seconds']:8.2f} {r['cpu_us_per_image']:13.1f} "
              f"{r['cpu_us_per_image'] / (limit * 1e6):8.1f}")
    end = uptime()
    print(start, "/", end)
    out = {"args": vars(args), "uptime_start": start, "uptime_end": end, "machine_peak": peak, "images": n,
           "mean_newton_steps": mean_steps, "arithmetic": ar, "limit_seconds_per_image": limit,
           "threads": {str(t): r for t, r in rows.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
