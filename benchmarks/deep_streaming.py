"""Study: 1 vs 2 layers × streaming vs reset × iteration cap, on Fashion-MNIST (issue 7).

Every cell is one ``dynsim run dssm`` (printed before it runs, so each can be rerun alone);
the script prints a markdown table (readout accuracy of each layer's representation,
mean steps per training input) and writes all results to one JSON file.

    PYTHONPATH=. python benchmarks/deep_streaming.py --epochs 3 --out runs/deep_streaming.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from dynsim.cli import _config_from_args, build_parser
from dynsim.pipelines.dssm import run_dssm
from dynsim.results import write_json_atomic

LAYERS = {
    1: "--layers 1 --nps 4 --stride 2 --radius 4",
    2: "--layers 2 --nps 4,4 --stride 2,1 --radius 4,2 --gamma {gamma}",
}


def cell_args(layers: int, stream: bool, cap: int, a: argparse.Namespace, out: Path) -> str:
    args = (
        f"run dssm --data {a.data} {LAYERS[layers].format(gamma=a.gamma)} "
        f"--threshold 1e-4 --max-steps {cap} "
        f"--epochs {a.epochs} --images-per-epoch {a.images_per_epoch} --eval-every 1 "
        f"--eval-train-size {a.eval_train_size} --eval-test-size {a.eval_test_size} "
        f"--seed {a.seed} "
        f"--no-progress --out {out}"
    )
    return args + (f" --stream-every {cap}" if stream else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--images-per-epoch", type=int, default=1000)
    p.add_argument("--eval-train-size", type=int, default=2000)
    p.add_argument("--eval-test-size", type=int, default=2000)
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--caps", default="1,10")
    p.add_argument("--layers", default="1,2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/deep_streaming.json")
    a = p.parse_args()
    out = Path(a.out)
    rows = []
    for layers in [int(v) for v in a.layers.split(",")]:
        for cap in [int(v) for v in a.caps.split(",")]:
            for stream in (False, True):
                cell_out = out.with_name(
                    f"{out.stem}-L{layers}-cap{cap}-{'stream' if stream else 'reset'}.json"
                )
                argv = cell_args(layers, stream, cap, a, cell_out)
                print("dynsim " + argv, flush=True)
                t0 = time.perf_counter()
                result = run_dssm(_config_from_args(build_parser().parse_args(shlex.split(argv))))
                f = result["final"]
                hist = [
                    h.get("layer_test_accuracy", [h.get("test_accuracy")])
                    for h in result["history"]
                ]
                rows.append(
                    {
                        "layers": layers,
                        "streaming": stream,
                        "cap": cap,
                        "command": "dynsim " + argv,
                        "layer_test_accuracy": f["layer_test_accuracy"] or [f["test_accuracy"]],
                        "best_top_accuracy": f["best_test_accuracy"],
                        "accuracy_per_epoch": hist,
                        "raw_pixel_accuracy": f["raw_pixel_accuracy"],
                        "mean_iterations": f["mean_iterations"],
                        "fraction_converged": f["fraction_converged"],
                        "seconds": time.perf_counter() - t0,
                    }
                )
                print(
                    json.dumps(rows[-1]["layer_test_accuracy"]),
                    f"{rows[-1]['seconds']:.0f} s",
                    flush=True,
                )
                write_json_atomic(out, {"study": "deep_streaming", "args": vars(a), "rows": rows})
    print(f"\nraw-pixel LinearSVC: {100 * rows[0]['raw_pixel_accuracy']:.2f} %\n")
    print(
        "| layers | input | cap | layer 1 acc. (%) | layer 2 acc. (%) | best top (%) "
        "| steps/input | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        acc = [f"{100 * v:.2f}" for v in r["layer_test_accuracy"]] + ["–"] * (
            2 - len(r["layer_test_accuracy"])
        )
        print(
            f"| {r['layers']} | {'stream' if r['streaming'] else 'reset'} | {r['cap']} "
            f"| {acc[0]} | {acc[1]} | {100 * r['best_top_accuracy']:.2f} "
            f"| {r['mean_iterations']:.1f} | {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
