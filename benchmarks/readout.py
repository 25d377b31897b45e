"""Readouts against scikit-learn's LinearSVC (liblinear), in one run.

Two sets of features, Fashion-MNIST, all 60,000 training and 10,000 test images:

1. raw pixels (each image /255 minus its mean, as the DSSM input);
2. the settled rates of one default DSSM run (120 epochs × 1000 images, Newton, T = 1e-4) at
   its 8 evaluations (every 15 epochs).

For each: ``liblinear`` (sklearn's LinearSVC, 1 thread), ``svc`` cold at 1 and 2 threads,
``svc`` warm-started from the previous evaluation's ``svc`` solution (1 thread), and ``ridge``.
Reported per row: seconds, Newton iterations, test accuracy, the objective relative to
liblinear's (summed over the 10 one-vs-rest problems, and the worst class), the fraction of
test predictions identical to liblinear's. The objective of every fit is recomputed here in
float64 from its weights (not taken from the solver).

Per-feature-set results are saved as they finish (``--out`` JSON, resumable: rows already in
the file are not recomputed unless ``--fresh``).

    PYTHONPATH=. python benchmarks/readout.py --out benchmarks/results/readout.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynsim.readouts import fit_liblinear, fit_ridge, fit_svc, svc_sample_costs  # noqa: E402
from dynsim.results import write_json_atomic  # noqa: E402


def objective(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, k: int) -> np.ndarray:
    """LinearSVC's one-vs-rest objectives (float64) of weights ``w`` (d + 1, k)."""
    t, c = svc_sample_costs(y, k, C=1.0, class_weight="balanced", dtype=torch.float64)
    w = w.double()
    z = (x.double() @ w[:-1] + w[-1]).T
    return (0.5 * (w * w).sum(0) + (c * (1 - t * z).clamp_min(0) ** 2).sum(1)).numpy()


def timed(fn, threads: int):
    torch.set_num_threads(threads)
    with threadpool_limits(threads):
        t0 = time.perf_counter()
        model = fn()
        return model, time.perf_counter() - t0


def measure(name: str, xtr, ytr, xte, yte, prev_svc: torch.Tensor | None, rows_done: dict,
            liblinear: bool = True) -> dict:
    """All readouts on one feature set; returns the row dict (and the svc weights under '_w')."""
    k = int(ytr.max()) + 1
    out = dict(rows_done)
    fits = {
        **({"liblinear": (lambda: fit_liblinear(xtr, ytr, n_classes=k), 1)} if liblinear else {}),
        "svc_cold_1thread": (lambda: fit_svc(xtr, ytr, n_classes=k), 1),
        "svc_cold_2threads": (lambda: fit_svc(xtr, ytr, n_classes=k), 2),
        "ridge": (lambda: fit_ridge(xtr, ytr, n_classes=k), 1),
    }
    if prev_svc is not None:
        fits["svc_warm_1thread"] = (lambda: fit_svc(xtr, ytr, n_classes=k, w0=prev_svc), 1)
    weights = {}
    for key, (fn, threads) in fits.items():
        if key in out and key != "svc_cold_1thread":
            continue
        model, seconds = timed(fn, threads)
        weights[key] = model.weights
        pred = model.predict(xte)
        out[key] = {
            "seconds": seconds,
            "threads": threads,
            "newton_iterations": model.info.get("newton_iterations"),
            "test_accuracy": float((pred == yte).double().mean()),
            "objective": objective(model.weights, xtr, ytr, k).tolist(),
            "predictions": pred.to(torch.int8).numpy(),
        }
        print(f"  {name:>10} {key:>18}: {seconds:7.2f} s  acc {100 * out[key]['test_accuracy']:.2f} %", flush=True)
    if "liblinear" not in out:
        out["_w"] = weights.get("svc_cold_1thread")
        return out
    ref_obj = np.asarray(out["liblinear"]["objective"])
    ref_pred = np.asarray(out["liblinear"]["predictions"])
    for row in out.values():
        if not isinstance(row, dict) or "objective" not in row:
            continue
        obj = np.asarray(row["objective"])
        row["objective_rel_to_liblinear"] = float((obj.sum() - ref_obj.sum()) / ref_obj.sum())
        row["worst_class_objective_rel"] = float(np.max((obj - ref_obj) / ref_obj))
        row["same_predictions_as_liblinear"] = float(np.mean(np.asarray(row["predictions"]) == ref_pred))
        row["speedup_vs_liblinear"] = out["liblinear"]["seconds"] / row["seconds"]
    out["_w"] = weights.get("svc_cold_1thread")
    return out


def dssm_features(evals: int, epochs_between: int, seed: int):
    """Train the default DSSM (Newton) and yield (epoch, train rates, test rates) at each evaluation."""
    from dynsim.builders import build_system, epoch_batches, prepare_data
    from dynsim.engine import DynamicsSettler, Engine
    from dynsim.evaluation import settle_dataset
    from dynsim.pipelines.dssm import DSSMConfig
    from dynsim.plasticity import DecayingRate, SimilarityMatchingRule
    from dynsim.solvers import solver_from_spec
    from dynsim.stopping import stop_rule

    config = DSSMConfig(data="fashion-mnist", seed=seed, progress=False)
    ds, x_train, x_test = prepare_data(config)
    layer = build_system(config, ds.image_shape)
    stop = stop_rule(config.threshold, config.max_steps)
    solver = solver_from_spec(config.resolved_solver(), schedule=config.schedule)
    rule = SimilarityMatchingRule(layer, rate=DecayingRate(config.eta0, config.eta_decay, config.eta_min))
    engine = Engine(DynamicsSettler(layer, solver, stop), [rule], progress=False)
    batches = epoch_batches(torch.as_tensor(x_train), images=config.images_per_epoch, batch_size=1, seed=seed)
    torch.set_num_threads(1)
    for e in range(evals):
        with torch.no_grad():
            engine.fit(batches, (e + 1) * epochs_between, start_epoch=e * epochs_between,
                       images_per_epoch=config.images_per_epoch)
        rtr = settle_dataset(layer, x_train, solver=solver, stop=stop).r
        rte = settle_dataset(layer, x_test, solver=solver, stop=stop).r
        yield (e + 1) * epochs_between, rtr, rte, ds


def compact(obj):
    """Per-image prediction arrays as strings of digits (one character per image)."""
    if isinstance(obj, dict):
        return {k: compact(v) for k, v in obj.items() if k != "_w"}
    if isinstance(obj, np.ndarray):
        return "".join(map(str, obj.tolist()))
    return obj


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/readout.json")
    p.add_argument("--evals", type=int, default=8, help="DSSM evaluations (every 15 epochs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-raw", action="store_true")
    p.add_argument("--liblinear-at", default=None,
                   help="evaluations (1-based, comma-separated) at which liblinear runs too (default: all; it "
                        "takes ~5 min each)")
    args = p.parse_args()
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.exists() else {}
    result = {
        "command": " ".join(["python", *sys.argv]),
        "torch_version": torch.__version__,
        "machine": {"platform": platform.platform()},
        "sets": done.get("sets", {}),
    }

    def decode(rows):  # predictions come back from the JSON as digit strings
        for row in rows.values():
            if isinstance(row, dict) and isinstance(row.get("predictions"), str):
                row["predictions"] = np.frombuffer(row["predictions"].encode(), dtype=np.uint8) - ord("0")
        return rows

    from dynsim.data import center_per_image, load_dataset

    if not args.skip_raw:
        ds = load_dataset("fashion-mnist")
        xtr = torch.from_numpy(center_per_image(ds.x_train))
        xte = torch.from_numpy(center_per_image(ds.x_test))
        ytr, yte = torch.from_numpy(ds.y_train).long(), torch.from_numpy(ds.y_test).long()
        print("raw pixels", flush=True)
        rows = measure("raw", xtr, ytr, xte, yte, None, decode(result["sets"].get("raw", {})))
        result["sets"]["raw"] = compact(rows)
        write_json_atomic(out, result)
    prev = None
    lib_at = None if args.liblinear_at is None else {int(v) for v in args.liblinear_at.split(",")}
    for epoch, rtr, rte, ds in dssm_features(args.evals, 15, args.seed):
        name = f"dssm_epoch{epoch}"
        print(name, flush=True)
        ytr, yte = torch.from_numpy(ds.y_train).long(), torch.from_numpy(ds.y_test).long()
        rows = measure(name, torch.from_numpy(rtr), ytr, torch.from_numpy(rte), yte, prev,
                       decode(result["sets"].get(name, {})), liblinear=lib_at is None or epoch // 15 in lib_at)
        prev = rows["_w"]
        result["sets"][name] = compact(rows)
        write_json_atomic(out, result)
    print_table(result)


def print_table(result: dict) -> None:
    print(f"\n{'features':>14} {'readout':>18} {'s':>8} {'×liblin':>8} {'Newton':>6} {'acc %':>7} "
          f"{'Δobj (rel)':>11} {'worst cls':>10} {'same pred':>9}")
    for name, rows in result["sets"].items():
        for key, r in rows.items():
            if not isinstance(r, dict) or "seconds" not in r:
                continue
            if "speedup_vs_liblinear" in r:
                vs = (f"{r['speedup_vs_liblinear']:8.1f} {r.get('newton_iterations') or 0:6d} "
                      f"{100 * r['test_accuracy']:7.2f} {r['objective_rel_to_liblinear']:11.2e} "
                      f"{r['worst_class_objective_rel']:10.2e} {100 * r['same_predictions_as_liblinear']:8.2f}%")
            else:  # no liblinear fit at this evaluation
                vs = (f"{'–':>8} {r.get('newton_iterations') or 0:6d} {100 * r['test_accuracy']:7.2f} "
                      f"{'–':>11} {'–':>10} {'–':>9}")
            print(f"{name:>14} {key:>18} {r['seconds']:8.2f} {vs}")


if __name__ == "__main__":
    main()
