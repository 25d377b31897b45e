"""NpS = 100 on 28×28 (19,600 neurons): time per image for online training and evaluation, peak memory.

Example::

    PYTHONPATH=. python benchmarks/nps100.py --train-images 200 --eval-images 1000 --out runs/nps100.json
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from dynsim.builders import build_layer, epoch_batches, prepare_data
from dynsim.evaluation import settle_dataset
from dynsim.pipelines.dssm import DSSMConfig
from dynsim.plasticity import hebbian_update
from dynsim.readouts import readout_accuracy
from dynsim.settle import settle
from dynsim.solvers import SiteNewton
from dynsim.stopping import stop_rule


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--nps", type=int, default=100)
    p.add_argument("--train-images", type=int, default=200)
    p.add_argument("--eval-images", type=int, default=1000, help="train and test images each")
    p.add_argument("--eval-batch", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/nps100.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    cfg = DSSMConfig(data=args.data, nps=args.nps)
    ds, xtr, xte = prepare_data(cfg)
    layer = build_layer(cfg, ds.image_shape)
    stop = stop_rule(1e-4, 3000)
    x = torch.as_tensor(xtr)
    t0, steps = time.perf_counter(), []
    for batch in epoch_batches(x, images=args.train_images, batch_size=1, seed=0)(0):
        res = settle(layer, batch.x, solver=SiteNewton(), stop=stop)
        hebbian_update(layer, batch.x, res.r, 5e-3)
        steps.append(int(res.steps))
    train_per_image = (time.perf_counter() - t0) / args.train_images
    t0 = time.perf_counter()
    kw = dict(solver=SiteNewton(), stop=stop, batch_size=args.eval_batch)
    rep_tr = settle_dataset(layer, xtr[: args.eval_images], **kw)
    rep_te = settle_dataset(layer, xte[: args.eval_images], **kw)
    eval_per_image = (time.perf_counter() - t0) / (2 * args.eval_images)
    probe = readout_accuracy("svc", rep_tr.r, ds.y_train[: args.eval_images], rep_te.r, ds.y_test[: args.eval_images])
    probe.pop("weights")
    out = {
        "nps": args.nps, "neurons": layer.state_size, "ff_nonzeros": layer.ff.nnz,
        "lateral_nonzeros": layer.lateral.nnz, "threads": args.threads,
        "train_seconds_per_image": train_per_image, "train_mean_newton_steps": sum(steps) / len(steps),
        "eval_settle_seconds_per_image": eval_per_image, "eval_batch": args.eval_batch,
        "eval_fraction_converged": float((rep_te.status == 1).mean()),
        "probe_on_subset": probe,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    print(json.dumps(out, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
