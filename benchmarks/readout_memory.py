"""The `svc` readout's memory and seconds at NpS 100 size: one-copy fit vs the fit it replaced.

Issue 15: at NpS 64/100 (d = 12,544 / 19,600 features, n = 60,000) the former `fit_svc` held
the features three times (the caller's tensor, the augmented copy ``[X, s]`` and its transpose)
and ran out of memory. This script fits both, each in its own spawned process (its own peak
RSS, ``ru_maxrss``), on the same features, and reports peak RSS, the peak beyond the features
themselves, seconds, Newton/CG iterations and test accuracy; "old" is ``fit_svc`` of commit
``--old-commit`` (loaded from ``git show``), "new" the working tree's.

Features: a **proxy** of settled NpS 100 rates (training NpS 100 to produce real ones costs
more than the readout itself): random-ReLU features ``max(0, X P)`` of the Fashion-MNIST inputs
(each image /255 minus its mean), ``P`` (784, d) Gaussian with std 1/√784, float32 — the same
shape, non-negative and dense like the network's ``tanh`` rates.

``--layouts`` also times one CG product ``(C ∘ (P X̃ᵀ)) X̃`` (k = 10) three ways on the same
(n, d) matrix: chunked over rows (what `fit_svc` does), one product with the whole matrix, and
the former "wide" form with a transposed copy — the question whether that copy was worth it.

    PYTHONPATH=. python benchmarks/readout_memory.py --max-iter 3 --layouts \\
        --out benchmarks/results/readout_memory.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def proxy_features(n_train: int, n_test: int, d: int, seed: int = 0):
    """Random-ReLU features of the first n_train / n_test Fashion-MNIST images (module docstring)."""
    import torch

    from dynsim.data import center_per_image, load_dataset

    ds = load_dataset("fashion-mnist", None)
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(ds.n_features, d, generator=g) / ds.n_features**0.5
    out = []
    for x in (ds.x_train[:n_train], ds.x_test[:n_test]):
        x = torch.as_tensor(center_per_image(x), dtype=torch.float32)
        f = torch.empty(x.shape[0], d)
        for i in range(0, x.shape[0], 2000):  # in chunks: no second full-size temporary
            torch.mm(x[i : i + 2000], p, out=f[i : i + 2000]).clamp_min_(0.0)
        out.append(f)
    return out[0], torch.as_tensor(ds.y_train[:n_train]).long(), out[1], torch.as_tensor(ds.y_test[:n_test]).long()


def load_fit_svc(which: str, commit: str):
    if which == "new":
        from dynsim.readouts import fit_svc

        return fit_svc
    src = subprocess.run(["git", "show", f"{commit}:dynsim/readouts.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "readouts_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("readouts_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod.fit_svc


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def fit_row(args: dict, queue) -> None:
    """One fit in this (spawned) process; puts its row on ``queue``."""
    import torch

    torch.set_num_threads(1)
    xtr, ytr, xte, yte = proxy_features(args["n"], args["n_test"], args["d"])
    fit_svc = load_fit_svc(args["which"], args["commit"])
    before = rss_gib()
    t0 = time.perf_counter()
    model = fit_svc(xtr, ytr, n_classes=10, max_iter=args["max_iter"])
    seconds = time.perf_counter() - t0
    peak = rss_gib()
    queue.put({
        "which": args["which"], "n": args["n"], "d": args["d"], "seconds": seconds,
        "features_gib": xtr.numel() * 4 / 2**30, "rss_before_fit_gib": before, "peak_rss_gib": peak,
        "peak_beyond_before_fit_gib": peak - before,
        "newton_iterations": model.info["newton_iterations"], "cg_iterations": model.info.get("cg_iterations"),
        "converged": model.info["converged"], "objective_sum": float(model.info["objective"].sum()),
        "test_accuracy": model.accuracy(xte, yte), "train_accuracy": model.accuracy(xtr, ytr),
        "load_after": os.getloadavg()[0],
    })


def layouts_row(args: dict, queue) -> None:
    """Seconds of one CG product on the (n, d) matrix, three layouts (module docstring)."""
    import torch

    from dynsim.readouts import _Design

    torch.set_num_threads(1)
    x, _, _, _ = proxy_features(args["n"], 1, args["d"])
    k, reps = 10, 3
    g = torch.Generator().manual_seed(1)
    p = torch.randn(k, args["d"] + 1, generator=g)
    c = torch.rand(k, args["n"], generator=g)
    design = _Design(x, 1.0)

    def timed(fn):
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn()
        return (time.perf_counter() - t0) / reps, out

    row = {"n": args["n"], "d": args["d"], "chunk_rows": design.chunk}
    row["chunked_s"], ref = timed(lambda: design.gauss_newton_product(p, c))

    def whole():  # one product with the whole (n, d) matrix each way, no copy
        a = c * torch.addmm(p[:, -1:], p[:, :-1], x.T)
        return torch.cat([a @ x, a.sum(dim=1, keepdim=True)], dim=1)

    row["whole_s"], out = timed(whole)
    row["whole_max_rel_diff"] = float((out - ref).abs().max() / ref.abs().max())
    xt = x.T.contiguous()  # the former fit's second layout (its bias column left out: same cost)

    def wide():
        a = c * torch.addmm(p[:, -1:], p[:, :-1], xt)
        return torch.cat([a @ x, a.sum(dim=1, keepdim=True)], dim=1)

    row["wide_copy_s"], out = timed(wide)
    row["wide_max_rel_diff"] = float((out - ref).abs().max() / ref.abs().max())
    row["load_after"] = os.getloadavg()[0]
    queue.put(row)


def spawn(fn, args: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=fn, args=(args, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        return {**args, "error": f"exit code {proc.exitcode} (e.g. killed for memory)"}
    return queue.get()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=60000)
    ap.add_argument("--n-test", type=int, default=10000)
    ap.add_argument("--d", type=int, default=19600)
    ap.add_argument("--max-iter", type=int, default=1000, help="Newton iterations at most (both fits)")
    ap.add_argument("--old-commit", default="572445d", help="the commit whose fit_svc is 'old'")
    ap.add_argument("--which", default="new,old", help="fits to run, in order")
    ap.add_argument("--layouts", action="store_true", help="also time one CG product in three layouts")
    ap.add_argument("--out", default="benchmarks/results/readout_memory.json")
    a = ap.parse_args()
    rows, layouts = [], None
    common = {"n": a.n, "n_test": a.n_test, "d": a.d, "max_iter": a.max_iter, "commit": a.old_commit}
    print(f"load {os.getloadavg()[0]:.1f}; n = {a.n}, d = {a.d}, max_iter = {a.max_iter}", flush=True)
    if a.layouts:
        layouts = spawn(layouts_row, common)
        print("CG product (k = 10):", json.dumps(layouts), flush=True)
    for which in a.which.split(","):
        row = spawn(fit_row, {**common, "which": which})
        rows.append(row)
        print(json.dumps(row), flush=True)
    head = ["fit", "s", "Newton it.", "CG it.", "features GiB", "peak RSS GiB", "beyond before fit GiB",
            "test acc. %", "objective"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        if "error" in r:
            print(f"| {r['which']} | {r['error']} |")
            continue
        print(f"| {r['which']} | {r['seconds']:.1f} | {r['newton_iterations']} | {r['cg_iterations']} | "
              f"{r['features_gib']:.2f} | {r['peak_rss_gib']:.2f} | {r['peak_beyond_before_fit_gib']:.2f} | "
              f"{100 * r['test_accuracy']:.2f} | {r['objective_sum']:.6g} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"machine": platform.platform(), "args": vars(a), "features": "random-ReLU proxy",
                                       "layouts": layouts, "rows": rows}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
