"""Why does a trained SSL encoder read out worse than the random one? Probes of both, in one run.

Takes a ``run ssl`` checkpoint (``<out>.ckpt.pt``; E2E/BP on Fashion-MNIST by default) and
rebuilds, from the same seed, the random encoder it started from. For each encoder it reports
the embedding's effective rank and scale, and the test accuracy of four linear readouts on the
same stratified split: the authors' probe (one linear layer, cross-entropy, Adam 1e-3, 400
epochs, batch 500, raw features), the same on standardised features, and the exact readouts
``svc`` (LinearSVC's problem) and ``ridge`` of :mod:`dynsim.readouts`. If the gap stays under
every readout, it is in the representation, not in the probe's optimisation.

    PYTHONPATH=. python benchmarks/ssl_probe_diagnostics.py --ckpt /work/runs/ssl/item4_e2e_bp_s0.ckpt.pt \
        --out benchmarks/results/ssl_probe_diagnostics.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynsim.configs.ssl import DEFAULT_ARCH, SSLConfig  # noqa: E402
from dynsim.data import load_dataset  # noqa: E402
from dynsim.results import write_json_atomic  # noqa: E402
from dynsim.ssl.stages import build_encoder  # noqa: E402
from dynsim.ssl.training import probe_encoder  # noqa: E402

READOUTS = (("adam (authors')", "adam", False), ("adam standardised", "adam", True),
            ("svc (exact)", "svc", False), ("ridge (exact)", "ridge", False))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", default="benchmarks/results/ssl_probe_diagnostics.json")
    ap.add_argument("--readouts", default=",".join(r[0] for r in READOUTS),
                    help="comma-separated labels of READOUTS to run (default: all)")
    ap.add_argument("--encoders", default="random,trained",
                    help="which encoders to read out: random, trained or both (the random one is deterministic "
                         "given the checkpoint's seed, so one reading of it serves every checkpoint of a run)")
    args = ap.parse_args(argv)
    chosen = [r for r in READOUTS if r[0] in args.readouts.split(",")]
    torch.set_num_threads(1)
    ck = torch.load(args.ckpt, weights_only=False)
    cfg = SSLConfig(**{k: v for k, v in ck["meta"].items() if k in SSLConfig.__dataclass_fields__})
    ds = load_dataset(cfg.data, cfg.data_dir).subset(n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.seed)
    shape = tuple(int(s) for s in ds.image_shape)
    xtr = torch.as_tensor(ds.x_train, dtype=torch.float32).view(-1, *shape)
    xte = torch.as_tensor(ds.x_test, dtype=torch.float32).view(-1, *shape)
    ytr, yte = torch.as_tensor(ds.y_train), torch.as_tensor(ds.y_test)
    arch = cfg.arch or DEFAULT_ARCH[cfg.data]

    def encoder(trained: bool):
        enc = build_encoder(arch, shape, act=cfg.act, head_dim=cfg.head_dim, head_pool=cfg.head_pool,
                            generator=torch.Generator().manual_seed(cfg.seed))
        if trained:
            enc.load_state_dict(ck["modules"]["encoder"], strict=False)
        return enc

    rows = []
    which = args.encoders.split(",")
    for name, trained in (("random encoder", False), (f"trained, {ck['completed_epochs']} epochs", True)):
        if ("trained" if trained else "random") not in which:
            continue
        enc = encoder(trained)
        for label, probe, std in chosen:
            t0 = time.perf_counter()
            r = probe_encoder(enc, xtr, ytr, xte, yte, probe=probe, epochs=400, batch_size=500,
                              standardize=std, seed=cfg.seed)
            rows.append({"encoder": name, "readout": label, "test_accuracy": r["test_accuracy"],
                         "train_accuracy": r["train_accuracy"], "effective_rank": r["effective_rank"],
                         "feature_rms": r["feature_rms"], "seconds": time.perf_counter() - t0})
            print(rows[-1], flush=True)
    print(f"{cfg.data}, {cfg.schedule}/{cfg.rule}, {len(xtr)} train / {len(xte)} test images, seed {cfg.seed} "
          f"(one seed); load {os.getloadavg()[0]:.1f}")
    print("| encoder | readout | test % | train % | effective rank | feature rms |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['encoder']} | {r['readout']} | {100 * r['test_accuracy']:.2f} | {100 * r['train_accuracy']:.2f} "
              f"| {r['effective_rank']:.1f} | {r['feature_rms']:.3f} |")
    out = {"ckpt": args.ckpt, "config": cfg.__dict__, "epochs": ck["completed_epochs"], "rows": rows,
           "load_average": os.getloadavg()}
    write_json_atomic(Path(args.out), out)
    return out


if __name__ == "__main__":
    main()
