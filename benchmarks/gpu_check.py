"""GPU check: a CUDA smoke test of dynsim with a timing table against the same work on the CPU.

Checks (each a row; the same function runs on ``--device`` and, unless that is the CPU, on
the CPU as the baseline, in the same run):

- ``solver:<name>``: every registered solver settles a 784-neuron layer (NpS 4, 28×28,
  64 random centred inputs, ``‖du/ds‖/‖u‖ < 1e-4`` or 300 steps) on the device; the rates
  must be finite, on the device, and (with a baseline) agree with the CPU's to 1e-3 on the
  samples both settled;
- ``dssm nps=4`` / ``dssm nps=100``: ``run dssm`` (1 epoch of ``--images`` images, probe
  readout on 600 / 300 images) trains and evaluates on the device (readout included);
- ``ssl <rule>``: ``run ssl`` (e2e, 1 epoch on ``--ssl-train`` images) with each rule
  ``bp, rf, urf, dtp``;
- ``checkpoint dssm`` / ``checkpoint ssl dtp``: one epoch on the device with a checkpoint,
  then resumed **on the CPU** for a second epoch (weights, optimizer states and random
  states written on the GPU, read on the CPU).

Usage::

    python benchmarks/gpu_check.py                      # on a GPU machine (--device cuda)
    python benchmarks/gpu_check.py --device cpu         # anywhere: the same checks, CPU only
    python benchmarks/gpu_check.py --data fashion-mnist --out benchmarks/results/gpu_check.json

Prints the table (seconds on the device, on the CPU, and their ratio; with ``--device cpu``
the CPU column is empty: nothing to compare) and writes JSON (``--out``); exits with status 1
if a check failed.
Budget: well under 5 minutes on one GPU with the defaults (digits).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from dynsim import SOLVERS, HebbianLayer, MaxSteps, RelativeChange, settle
from dynsim.pipelines.dssm import DSSMConfig, run_dssm
from dynsim.pipelines.ssl import SSLConfig, run_ssl
from dynsim.results import result_header, write_json_atomic
from dynsim.solvers.spec import solver_from_spec
from dynsim.ssl.rules import RULES
from dynsim.stopping import Status


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# solvers whose spec needs tolerances (no silent defaults): the bench's settings
SPECS = {name: f"{name},rtol=1e-5,atol=1e-7" for name in ("dopri5", "torchdiffeq", "torchode")}


def solver_check(name: str):
    def run(device: str) -> dict:
        torch.manual_seed(0)
        layer = HebbianLayer((1, 28, 28), nps=4, stride=2, radius=4.0).to(device)
        x = torch.rand(64, 784)
        x = (x - x.mean(1, keepdim=True)).to(device)
        solver, stop = solver_from_spec(SPECS.get(name, name)), RelativeChange(1e-4) | MaxSteps(300)
        settle(layer, x[:4], solver=solver, stop=stop)  # warm-up: CUDA kernels, compiled CPU kernels
        _sync(device)
        t0 = time.perf_counter()
        res = settle(layer, x, solver=solver, stop=stop)
        _sync(device)
        seconds = time.perf_counter() - t0
        if res.r.device.type != torch.device(device).type:
            raise AssertionError(f"rates on {res.r.device}, expected {device}")
        if not bool(torch.isfinite(res.r).all()):
            raise AssertionError("non-finite rates")
        settled = res.status.cpu() == Status.SETTLED
        return {"seconds": seconds, "detail": f"{int(settled.sum())}/64 settled, mean steps "
                f"{float(res.steps.float().mean()):.1f}", "r": res.r.cpu(), "settled": settled}

    return run


def _dssm(device: str, args, nps: int, **kw) -> dict:
    config = DSSMConfig(data=args.data, data_dir=args.data_dir, nps=nps, epochs=kw.pop("epochs", 1),
                        images_per_epoch=args.images, eval_every=1, eval_train_size=600, eval_test_size=300,
                        readout="probe", device=device, progress=False, threads=None, **kw)
    return run_dssm(config, resume=kw.get("checkpoint_every") is not None and config.epochs > 1)


def dssm_check(nps: int):
    def run(device: str, args) -> dict:
        t0 = time.perf_counter()
        result = _dssm(device, args, nps)
        _sync(device)
        acc = result["final"]["test_accuracy"]
        if acc is None or not math.isfinite(acc):
            raise AssertionError(f"test accuracy {acc}")
        return {"seconds": time.perf_counter() - t0, "detail": f"test acc {100 * acc:.1f} %, mean steps "
                f"{result['final']['mean_iterations']:.1f}"}

    return run


def _ssl_config(device: str, args, rule: str, **kw) -> SSLConfig:
    return SSLConfig(data=args.data, data_dir=args.data_dir, rule=rule, schedule="e2e", epochs=kw.pop("epochs", 1),
                     n_train=args.ssl_train, n_test=300, batch_size=100, probe_epochs=5, random_baseline=False,
                     device=device, **kw)


def ssl_check(rule: str):
    def run(device: str, args) -> dict:
        t0 = time.perf_counter()
        result = run_ssl(_ssl_config(device, args, rule), progress=False)
        _sync(device)
        acc = result["final"]["test_accuracy"]
        if acc is None:
            raise AssertionError(f"no test accuracy ({result['final'].get('divergence')})")
        return {"seconds": time.perf_counter() - t0, "detail": f"probe acc {100 * acc:.1f} %"}

    return run


def checkpoint_dssm(device: str, args) -> dict:
    """One epoch on ``device`` with a checkpoint, the second resumed on the CPU."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "ck.json")
        t0 = time.perf_counter()
        _dssm(device, args, 4, epochs=1, checkpoint_every=1, out=out)
        resumed = _dssm("cpu", args, 4, epochs=2, checkpoint_every=1, out=out)
        if resumed["resumed_from_epoch"] != 1 or len(resumed["history"]) != 2:
            raise AssertionError(f"resumed from {resumed['resumed_from_epoch']}, {len(resumed['history'])} epochs")
        acc = resumed["final"]["test_accuracy"]
        return {"seconds": time.perf_counter() - t0, "detail": f"{device} -> cpu, test acc {100 * acc:.1f} %"}


def checkpoint_ssl(device: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "ck.json")
        t0 = time.perf_counter()
        run_ssl(_ssl_config(device, args, "dtp", epochs=1, out=out), progress=False, checkpoint_every=1)
        resumed = run_ssl(_ssl_config("cpu", args, "dtp", epochs=2, out=out), progress=False, checkpoint_every=1,
                          resume=True)
        if resumed["resumed_from_epoch"] != 1 or len(resumed["history"]) != 2:
            raise AssertionError(f"resumed from {resumed['resumed_from_epoch']}, {len(resumed['history'])} epochs")
        return {"seconds": time.perf_counter() - t0, "detail": f"{device} -> cpu, 2 epochs"}


def checks(args) -> list[tuple[str, callable]]:
    rows = [(f"solver:{name}", (lambda fn: lambda device, a: fn(device))(solver_check(name))) for name in SOLVERS]
    rows += [("dssm nps=4", dssm_check(4)), ("dssm nps=100", dssm_check(100))]
    rows += [(f"ssl {rule}", ssl_check(rule)) for rule in RULES]
    rows += [("checkpoint dssm", checkpoint_dssm), ("checkpoint ssl dtp", checkpoint_ssl)]
    if not args.only:
        return rows
    names = {n for n, _ in rows}
    # a full check name selects that check only ("solver:newton", not "solver:newton-cg"); else substrings
    wanted = [s for s in args.only.split(",") if s]
    return [(n, f) for n, f in rows if any(s == n if s in names else s in n for s in wanted)]


def _attempt(fn, device: str, args) -> dict:
    try:
        return {"ok": True, **fn(device, args)}
    except Exception as exc:  # a smoke test: report every failure in its row, keep going
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        return {"ok": False, "seconds": None, "detail": f"{type(exc).__name__}: {first}"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="device to check (default: cuda); cpu runs the checks alone")
    p.add_argument("--data", default="digits", help="data set for the dssm and ssl checks (default: digits)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--images", type=int, default=100, help="training images of the dssm checks")
    p.add_argument("--ssl-train", type=int, default=1000, help="training images of the ssl checks")
    p.add_argument("--only", default=None,
                   help="comma-separated check names or substrings: run only the matching checks")
    p.add_argument("--out", default="runs/gpu_check.json")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: --device {args.device}: CUDA is not available here; run with --device cpu", file=sys.stderr)
        return 2
    baseline = None if args.device == "cpu" else "cpu"
    rows = []
    head = f"{'check':<22} {args.device + ' s':>9} {'cpu s':>9} {'cpu/dev':>9}  result"
    print(head, "\n" + "-" * len(head), flush=True)
    for name, fn in checks(args):
        dev = _attempt(fn, args.device, args)
        base = _attempt(fn, baseline, args) if baseline else None
        if dev["ok"] and base and base["ok"] and "r" in dev:  # solvers: the same fixed points on both devices
            both = dev.pop("settled") & base.pop("settled")
            gap = float((dev.pop("r") - base.pop("r"))[both].abs().max()) if bool(both.any()) else 0.0
            dev["detail"] += f", max |r_dev - r_cpu| {gap:.1e}"
            if gap > 1e-3:
                dev["ok"], dev["detail"] = False, dev["detail"] + " > 1e-3"
        for d in (dev, base):
            if d:
                d.pop("r", None), d.pop("settled", None)
        ok = dev["ok"] and (base is None or base["ok"])
        fmt = lambda s: "-" if s is None else f"{s:.2f}"  # noqa: E731
        speed = "-" if not (base and base["seconds"] and dev["seconds"]) else f"{base['seconds'] / dev['seconds']:.2f}x"
        detail = dev["detail"]
        if base and not base["ok"]:
            detail += f" | cpu: {base['detail']}"
        print(f"{name:<22} {fmt(dev['seconds']):>9} {fmt(base['seconds'] if base else None):>9} {speed:>9}  "
              f"{'ok ' if ok else 'FAIL'} {detail}", flush=True)
        rows.append({"check": name, "ok": ok, "device": dev, "cpu": base})
    machine = {"device": args.device}
    if args.device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    write_json_atomic(args.out, {**result_header("benchmarks/gpu_check.py", vars(args), **machine), "rows": rows})
    failed = [r["check"] for r in rows if not r["ok"]]
    summary = f"{len(rows) - len(failed)}/{len(rows)} checks passed"
    print(f"\n{summary}" + (f"; FAILED: {', '.join(failed)}" if failed else "") + f"; JSON: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
