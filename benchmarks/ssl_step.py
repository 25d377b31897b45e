"""The SSL training step and the deformations on CPU: before/after, 1 vs 2 threads, in one run.

One E2E/BP training step (both views through the encoder, the hinge loss, the errors, the
weight gradients and Adam on every unit) on a batch of B Fashion-MNIST-sized images
(1x28x28, random pixels), with the default encoder ``cifar-half`` and all negatives, and one
call of the deformation, timed at 1 and 2 torch threads. "before" is the code before issue 17:
NCHW tensors and the hinge loss that builds the (B, B, D) difference, its absolute value, its
sign and their product as separate tensors; "after" is the current code (NHWC batches, the L1
distances by ``torch.cdist``, one in-place sign and two contractions). A torch-profiler table
of one "after" step is printed too.

    PYTHONPATH=. python benchmarks/ssl_step.py --out benchmarks/results/ssl_step.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dynsim.ssl.signals as signals  # noqa: E402
from dynsim.engine import Batch  # noqa: E402
from dynsim.results import write_json_atomic  # noqa: E402
from dynsim.ssl import Deform, build_encoder, make_rules  # noqa: E402
from dynsim.ssl.loss import HingeResult, hinge_loss  # noqa: E402


def hinge_loss_before(z, z_prime, *, tau, delta, negatives=None, grad_block=False, wrap=False):
    """The all-negatives hinge loss as it was computed before issue 17 (same values)."""
    if negatives is not None:
        return hinge_loss(z, z_prime, tau=tau, delta=delta, negatives=negatives, grad_block=grad_block, wrap=wrap)
    z, z_prime = z.detach(), z_prime.detach()
    n = z.shape[0]
    diff = z[:, None, :] - z_prime[None, :, :]
    d = diff.abs().sum(-1)
    eye = torch.eye(n, dtype=torch.bool)
    pos = torch.clamp(d - (tau - delta), min=0)
    neg = torch.clamp((tau + delta) - d, min=0)
    loss = torch.where(eye, pos, neg).sum()
    c = torch.where(eye, (pos > 0).to(z.dtype), -(neg > 0).to(z.dtype))
    s = torch.sign(diff) * c[:, :, None]
    err, err_prime = s.sum(1), -s.sum(0)
    if grad_block:
        err_prime = torch.zeros_like(err_prime)
    return HingeResult(loss, err, err_prime)


def make_step(version: str, arch: str, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    enc = build_encoder(arch, (1, 28, 28), act="hardtanh", generator=g)
    rules = make_rules("bp", enc, lr=1e-4, generator=g)
    sig = signals.ContrastiveSignals(enc, (1, 28, 28), Deform(flip=True), tau=6.0, delta=3.0, negatives=None,
                                     grad_block=False, generator=g)
    sig.channels_last = version == "after"
    x = torch.rand(batch, 784, generator=g)
    b = Batch(x=x, y=None, index=None, epoch=0, number=0)
    loss_fn = hinge_loss if version == "after" else hinge_loss_before

    def step():
        signals.hinge_loss = loss_fn
        try:
            r = sig(b)
        finally:
            signals.hinge_loss = hinge_loss
        for rule in rules:
            rule.on_settled(None, b, r)
        return float(r.loss)

    return step, x.view(-1, 1, 28, 28), g


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="cifar-half")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/ssl_step.json")
    args = ap.parse_args(argv)
    rows = []
    losses = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for version in ("before", "after"):
            step, x, g = make_step(version, args.arch, args.batch)
            losses[version] = step()
            t_step = best_of(step, args.repeats)
            t_aug = best_of(lambda x=x, g=g: Deform(flip=True)(x, g), args.repeats)
            rows.append({"threads": threads, "version": version, "step_seconds": t_step, "deform_seconds": t_aug})
    base = {r["threads"]: r["step_seconds"] for r in rows if r["version"] == "before"}
    print(f"SSL training step, E2E/BP, {args.arch}, batch {args.batch} (2 views), all negatives; best of "
          f"{args.repeats}; load {os.getloadavg()[0]:.1f}")
    print("| threads | code | step s | images/s | deform s | speed-up vs before |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        r["speedup"] = base[r["threads"]] / r["step_seconds"]
        print(f"| {r['threads']} | {r['version']} | {r['step_seconds']:.3f} | {args.batch / r['step_seconds']:.0f} "
              f"| {r['deform_seconds']:.4f} | {r['speedup']:.2f}x |")
    torch.set_num_threads(1)
    step, _, _ = make_step("after", args.arch, args.batch)
    step()
    with torch.profiler.profile() as prof:
        step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10)
    print(table)
    out = {"rows": rows, "arch": args.arch, "batch": args.batch, "first_loss": losses,
           "load_average": os.getloadavg(), "torch": torch.__version__, "machine": platform.processor(),
           "profile_after_1_thread": table}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(args.out), out)
    return out


if __name__ == "__main__":
    main()
