"""The SSL training step, its parts, and the authors' probe on CPU: before/after, 1 vs 2 threads, in one run.

**The step.** One E2E/BP training step (both views through the encoder, the hinge loss, the
errors, the weight gradients and Adam on every unit) on a batch of B Fashion-MNIST-sized
images (1x28x28, random pixels), default encoder ``cifar-half``, all negatives, timed at 1 and
2 torch threads in three versions of the code:

- ``before`` (before issue 17): NCHW tensors, the hinge loss that builds the (B, B, D)
  difference, its absolute value, its sign and their product as separate tensors, and the
  error below each conv by ``torch.nn.grad.conv2d_input``;
- ``session 1`` (issue 17, first session): NHWC batches (``channels_last``), the L1 distances
  by ``torch.cdist``, one in-place sign and two contractions; still ``conv2d_input``;
- ``now``: the error below each conv by the forward kernel on the flipped, transposed weight
  (:func:`dynsim.ssl.stages.conv_transpose_input`, the same numbers).

The step's parts (``now``, 1 thread): the deformation, the forward pass of both views, the
hinge loss with its errors, and the rest (errors down the encoder, weight gradients, Adam),
plus a torch-profiler table.

**The probe** (the authors': one linear layer, cross-entropy, Adam 1e-3, batch 500, on
frozen (N, D) features): ``before`` (``nn.Linear`` + autograd + ``x[idx]``) vs ``now``
(:func:`dynsim.readouts.train_softmax_layer`: closed-form gradients, ``index_select`` into a
reused buffer), same batches and optimiser, at 1 and 2 threads, steady state (after one
warm-up epoch), and the effective rank of 2,000 embeddings by ``svdvals`` vs the Gram
eigenvalues.

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
import torch.nn.functional as F
from torch.nn.grad import conv2d_input

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dynsim.ssl.signals as signals  # noqa: E402
import dynsim.ssl.stages as stages  # noqa: E402
from dynsim.engine import Batch  # noqa: E402
from dynsim.readouts import train_softmax_layer  # noqa: E402
from dynsim.results import write_json_atomic  # noqa: E402
from dynsim.ssl import Deform, build_encoder, make_rules  # noqa: E402
from dynsim.ssl.loss import HingeResult, hinge_loss  # noqa: E402
from dynsim.ssl.training import effective_rank  # noqa: E402

VERSIONS = ("before", "session 1", "now")


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


def conv_input_before(weight, grad_out):
    """The error below a conv as computed before this session: ``conv2d_input``."""
    shape = (grad_out.shape[0], weight.shape[1], *grad_out.shape[2:])
    return conv2d_input(shape, weight, grad_out, padding=1)


def make_step(version: str, arch: str, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    enc = build_encoder(arch, (1, 28, 28), act="hardtanh", generator=g)
    rules = make_rules("bp", enc, lr=1e-4, generator=g)
    sig = signals.ContrastiveSignals(enc, (1, 28, 28), Deform(flip=True), tau=6.0, delta=3.0, negatives=None,
                                     grad_block=False, generator=g)
    sig.channels_last = version != "before"
    x = torch.rand(batch, 784, generator=g)
    b = Batch(x=x, y=None, index=None, epoch=0, number=0)
    loss_fn = hinge_loss_before if version == "before" else hinge_loss
    conv_fn = stages.conv_transpose_input if version == "now" else conv_input_before

    def step():
        signals.hinge_loss, saved = loss_fn, stages.conv_transpose_input
        stages.conv_transpose_input = conv_fn
        try:
            r = sig(b)
        finally:
            signals.hinge_loss, stages.conv_transpose_input = hinge_loss, saved
        for rule in rules:
            rule.on_settled(None, b, r)
        return float(r.loss)

    return step, x.view(-1, 1, 28, 28), g, enc


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def step_parts(arch: str, batch: int, repeats: int) -> dict:
    """Seconds of the parts of one ``now`` step (1 thread): deformation, forward, loss, the rest."""
    step, x, g, enc = make_step("now", arch, batch)
    x2 = torch.cat([x, Deform(flip=True)(x, g)]).contiguous(memory_format=torch.channels_last)

    def forward():
        with torch.no_grad():
            h = x2
            for s in enc.stages:
                h = s(h)[1]
            return enc.heads[-1](h)

    z = forward()
    parts = {
        "deform": best_of(lambda: Deform(flip=True)(x, g), repeats),
        "forward (both views)": best_of(forward, repeats),
        "hinge loss + top errors": best_of(lambda: hinge_loss(z[:batch], z[batch:], tau=6.0, delta=3.0), repeats),
        "whole step": best_of(step, repeats),
    }
    parts["errors down, weight gradients, Adam"] = (parts["whole step"] - parts["deform"]
                                                    - parts["forward (both views)"] - parts["hinge loss + top errors"])
    return parts


def probe_before(x, y, k, *, epochs, lr, batch_size, generator):
    """The authors' probe loop as it was written before this session (autograd, ``x[idx]``)."""
    layer = torch.nn.Linear(x.shape[1], k)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(layer(x[idx]), y[idx]).backward()
            opt.step()
    return layer.weight.detach(), layer.bias.detach()


def probe_rows(n: int, d: int, epochs: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for version, fn in (("before", probe_before), ("now", train_softmax_layer)):
            fn(x, y, 10, epochs=1, lr=1e-3, batch_size=500, generator=torch.Generator().manual_seed(0))  # warm-up
            t0 = time.perf_counter()
            fn(x, y, 10, epochs=epochs, lr=1e-3, batch_size=500, generator=torch.Generator().manual_seed(0))
            per_epoch = (time.perf_counter() - t0) / epochs
            rows.append({"threads": threads, "version": version, "epoch_seconds": per_epoch,
                         "seconds_400_epochs": 400 * per_epoch})
    torch.set_num_threads(1)
    f = x[:2000].double()
    t0 = time.perf_counter()
    s = torch.linalg.svdvals(f - f.mean(0))
    t_svd = time.perf_counter() - t0
    t0 = time.perf_counter()
    er = effective_rank(x[:2000])
    t_gram = time.perf_counter() - t0
    p = s / s.sum()
    er_svd = float(torch.exp(-(p * p.log()).sum()))
    rows.append({"effective_rank_svdvals_seconds": t_svd, "effective_rank_gram_seconds": t_gram,
                 "effective_rank_svdvals": er_svd, "effective_rank_gram": er})
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="cifar-half")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--probe-n", type=int, default=10000, help="probe: training features (the item-4 split)")
    ap.add_argument("--probe-d", type=int, default=2304, help="probe: feature dimension (cifar-half's embedding)")
    ap.add_argument("--probe-epochs", type=int, default=10, help="probe epochs timed (the table scales to 400)")
    ap.add_argument("--out", default="benchmarks/results/ssl_step.json")
    args = ap.parse_args(argv)
    load0 = os.getloadavg()[0]
    rows, losses = [], {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        steps = {v: make_step(v, args.arch, args.batch) for v in VERSIONS}
        for v, (step, *_) in steps.items():
            losses[v] = step()
        best = {v: float("inf") for v in VERSIONS}
        for _ in range(args.repeats):  # interleaved, so a change of machine load hits every version
            for v, (step, *_) in steps.items():
                best[v] = min(best[v], best_of(step, 1))
        for v in VERSIONS:
            rows.append({"threads": threads, "version": v, "step_seconds": best[v]})
    base = {r["threads"]: r["step_seconds"] for r in rows if r["version"] == "before"}
    print(f"SSL training step, E2E/BP, {args.arch}, batch {args.batch} (2 views), all negatives; best of "
          f"{args.repeats}, interleaved; load {load0:.1f}")
    print("| threads | code | step s | images/s | vs before |")
    print("|---:|---|---:|---:|---:|")
    for r in rows:
        r["speedup"] = base[r["threads"]] / r["step_seconds"]
        print(f"| {r['threads']} | {r['version']} | {r['step_seconds']:.3f} | {args.batch / r['step_seconds']:.0f} "
              f"| {r['speedup']:.2f}x |")
    torch.set_num_threads(1)
    parts = step_parts(args.arch, args.batch, args.repeats)
    print("\nparts of one step (now, 1 thread; the rest = whole step minus the others)")
    print("| part | s | share |")
    print("|---|---:|---:|")
    for k, v in parts.items():
        print(f"| {k} | {v:.4f} | {100 * v / parts['whole step']:.1f} % |")
    step, *_ = make_step("now", args.arch, args.batch)
    step()
    with torch.profiler.profile() as prof:
        step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    print(table)
    probe = probe_rows(args.probe_n, args.probe_d, args.probe_epochs)
    pbase = {r["threads"]: r["epoch_seconds"] for r in probe if r.get("version") == "before"}
    print(f"\nthe authors' probe on ({args.probe_n}, {args.probe_d}) features, batch 500; "
          f"{args.probe_epochs} epochs timed after a warm-up, scaled to 400")
    print("| threads | code | s / epoch | s / 400 epochs | vs before |")
    print("|---:|---|---:|---:|---:|")
    for r in probe:
        if "version" in r:
            r["speedup"] = pbase[r["threads"]] / r["epoch_seconds"]
            print(f"| {r['threads']} | {r['version']} | {r['epoch_seconds']:.4f} | {r['seconds_400_epochs']:.1f} "
                  f"| {r['speedup']:.2f}x |")
    er = probe[-1]
    print(f"effective rank of (2000, {args.probe_d}): svdvals {er['effective_rank_svdvals_seconds']:.2f} s, "
          f"Gram eigenvalues {er['effective_rank_gram_seconds']:.2f} s "
          f"({er['effective_rank_svdvals']:.6f} vs {er['effective_rank_gram']:.6f})")
    load1 = os.getloadavg()[0]
    print(f"load average {load0:.1f} at the start, {load1:.1f} at the end")
    out = {"rows": rows, "parts": parts, "probe": probe, "arch": args.arch, "batch": args.batch,
           "first_loss": losses, "load_average_start": load0, "load_average_end": load1,
           "torch": torch.__version__, "machine": platform.processor(), "profile_now_1_thread": table}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(args.out), out)
    return out


if __name__ == "__main__":
    main()
