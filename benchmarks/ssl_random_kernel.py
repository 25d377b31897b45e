"""Is the random encoder already a strong kernel on Fashion-MNIST? Raw pixels vs random encoders.

Issue 17, item 4, hypothesis (a). On one stratified Fashion-MNIST split, the linear readouts of
the raw pixels (784-d) and of the *untrained* encoder of the SSL pipeline at three widths
(``cifar`` = Tang, Yang & Amit's CIFAR encoder, 4608-d embedding on 28x28; ``cifar-half``, the
default, 2304-d; a quarter-width ``c8-a-c8-p-c16-a-c16-p-c128-p``, 1152-d), with hardtanh
where the authors put it, and ``cifar-half`` with no activation at all (``linear``: only the
max-pools are nonlinear). Each is read out by the exact ``svc`` (LinearSVC's problem) and by the
authors' probe (one linear layer, Adam 1e-3, 400 epochs, batch 500, raw features). One seed
(the encoder's initial weights and the subset), so differences under ~1 pt (the standard error
of an accuracy on 2,000 test images is ~0.8 pt) mean nothing.

    PYTHONPATH=. python benchmarks/ssl_random_kernel.py --n-train 2000 --n-test 2000 \
        --out benchmarks/results/ssl_random_kernel.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynsim.data import load_dataset  # noqa: E402
from dynsim.results import write_json_atomic  # noqa: E402
from dynsim.ssl.stages import build_encoder  # noqa: E402
from dynsim.ssl.training import probe_encoder  # noqa: E402

ENCODERS = (  # label, arch (None: raw pixels), activation
    ("raw pixels", None, None),
    ("random c8-a-c8-p-c16-a-c16-p-c128-p (quarter)", "c8-a-c8-p-c16-a-c16-p-c128-p", "hardtanh"),
    ("random cifar-half (default)", "cifar-half", "hardtanh"),
    ("random cifar (the authors')", "cifar", "hardtanh"),
    ("random cifar-half, no activation", "cifar-half", "linear"),
)


class _Pixels(torch.nn.Module):
    """The identity 'encoder': flattened pixels."""

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--readouts", default="svc,adam")
    ap.add_argument("--out", default="benchmarks/results/ssl_random_kernel.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ds = load_dataset("fashion-mnist").subset(n_train=args.n_train, n_test=args.n_test, seed=args.seed)
    shape = tuple(int(s) for s in ds.image_shape)
    xtr = torch.as_tensor(ds.x_train, dtype=torch.float32).view(-1, *shape)
    xte = torch.as_tensor(ds.x_test, dtype=torch.float32).view(-1, *shape)
    ytr, yte = torch.as_tensor(ds.y_train), torch.as_tensor(ds.y_test)
    rows = []
    for label, arch, act in ENCODERS:
        if arch is None:
            enc = _Pixels()
        else:
            enc = build_encoder(arch, shape, act=act, generator=torch.Generator().manual_seed(args.seed))
        for readout in args.readouts.split(","):
            t0 = time.perf_counter()
            r = probe_encoder(enc, xtr, ytr, xte, yte, probe=readout, epochs=400, batch_size=500,
                              standardize=False, seed=args.seed)
            rows.append({"encoder": label, "arch": arch, "act": act, "readout": readout,
                         "n_features": int(enc.embed(xtr[:1]).shape[1]), "test_accuracy": r["test_accuracy"],
                         "train_accuracy": r["train_accuracy"], "effective_rank": r["effective_rank"],
                         "seconds": time.perf_counter() - t0})
            print(rows[-1], flush=True)
    print(f"fashion-mnist, {len(xtr)} train / {len(xte)} test images (stratified, seed {args.seed}), one seed; "
          f"load {os.getloadavg()[0]:.1f}")
    print("| features | d | readout | test % | train % | effective rank |")
    print("|---|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['encoder']} | {r['n_features']} | {r['readout']} | {100 * r['test_accuracy']:.2f} "
              f"| {100 * r['train_accuracy']:.2f} | {r['effective_rank']:.0f} |")
    out = {"n_train": len(xtr), "n_test": len(xte), "seed": args.seed, "rows": rows,
           "load_average": os.getloadavg(), "torch": torch.__version__}
    write_json_atomic(Path(args.out), out)
    return out


if __name__ == "__main__":
    main()
