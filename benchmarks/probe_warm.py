"""Warm-started probe readout across evaluations: iterations, seconds and accuracy, cold vs warm.

Trains the default Fashion-MNIST layer online (Newton, batch 1) for ``--first`` epochs,
reads it out (probe, cold start), trains ``--gap`` more epochs, and reads it out again
from zeros (cold, 150 iterations) and from the first readout's weights (warm, as
``Evaluator`` does) with several iteration caps, on the same settled representations.

Usage: PYTHONPATH=. python benchmarks/probe_warm.py --out runs/probe_warm.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dynsim.engine import DynamicsSettler, Engine
from dynsim.evaluation import linear_probe_accuracy, settle_dataset
from dynsim.pipelines.dssm import DSSMConfig, build_layer, epoch_batches, prepare_data
from dynsim.plasticity import SimilarityMatchingRule
from dynsim.solvers import SiteNewton
from dynsim.stopping import stop_rule


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--first", type=int, default=2)
    p.add_argument("--gap", type=int, default=2)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--eval-size", type=int, default=None, help="train images read out (default all; test: all)")
    p.add_argument("--caps", default="25,50,75,150", help="L-BFGS iteration caps of the warm-started fits")
    p.add_argument("--out", default="runs/probe_warm.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    cfg = DSSMConfig(data="fashion-mnist")
    ds, xtr, xte = prepare_data(cfg)
    n = len(xtr) if args.eval_size is None else args.eval_size
    layer = build_layer(cfg, ds.image_shape)
    stop = stop_rule(1e-4, 3000)
    engine = Engine(DynamicsSettler(layer, SiteNewton(), stop), [SimilarityMatchingRule(layer)], progress=False)
    batches = epoch_batches(torch.as_tensor(xtr), images=args.images, batch_size=1, seed=0)

    def readouts(runs):
        kw = dict(solver=SiteNewton(), stop=stop, batch_size=1000)
        rtr, rte = settle_dataset(layer, xtr[:n], **kw), settle_dataset(layer, xte, **kw)
        return [linear_probe_accuracy(rtr.r, ds.y_train[:n], rte.r, ds.y_test, w0=w0, max_iter=it) for w0, it in runs]

    engine.fit(batches, args.first)
    (first,) = readouts([(None, 150)])
    engine.fit(batches, args.first + args.gap, start_epoch=args.first)
    t0 = time.perf_counter()
    caps = [int(c) for c in args.caps.split(",")]
    res = readouts([(None, 150)] + [(first["weights"], c) for c in caps])
    out = {"args": vars(args), "n_train": n, "seconds_total": time.perf_counter() - t0}
    for name, o in zip(["first", "cold_150"] + [f"warm_{c}" for c in caps], [first, *res], strict=True):
        o.pop("weights")
        out[name] = o
    print(json.dumps(out, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
