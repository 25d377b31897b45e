"""Evaluation of all 70,000 Fashion-MNIST images after one online epoch: settle (Newton, batch 1000) + probe.

Usage: PYTHONPATH=. python benchmarks/eval_70k.py  (writes runs/eval70k.json)
"""

import json
import time
from pathlib import Path

import torch

from dynsim import settle
from dynsim.builders import build_layer, epoch_batches, prepare_data
from dynsim.evaluation import settle_dataset
from dynsim.pipelines.dssm import DSSMConfig
from dynsim.plasticity import hebbian_update
from dynsim.readouts import readout_accuracy
from dynsim.solvers import SiteNewton
from dynsim.stopping import stop_rule

torch.set_num_threads(1)
torch.set_grad_enabled(False)

cfg = DSSMConfig(data="fashion-mnist")
ds, xtr, xte = prepare_data(cfg)
layer = build_layer(cfg, ds.image_shape)
stop = stop_rule(1e-4, 3000)
x = torch.as_tensor(xtr)
t0 = time.perf_counter()
for b in epoch_batches(x, images=1000, batch_size=1, seed=0)(0):
    res = settle(layer, b.x, solver=SiteNewton(), stop=stop)
    hebbian_update(layer, b.x, res.r, 5e-3)
t_epoch = time.perf_counter() - t0
t0 = time.perf_counter()
rtr = settle_dataset(layer, xtr, solver=SiteNewton(), stop=stop, batch_size=1000)
rte = settle_dataset(layer, xte, solver=SiteNewton(), stop=stop, batch_size=1000)
t_settle = time.perf_counter() - t0
pr = readout_accuracy("svc", rtr.r, ds.y_train, rte.r, ds.y_test)
pr.pop("weights")
out = {
    "epoch_seconds": t_epoch,
    "settle_70k_seconds": t_settle,
    "mean_steps": float(rtr.steps.mean()),
    "converged": float((rtr.status == 1).mean()),
    "probe": pr,
    "eval_total_seconds": t_settle + pr["readout_seconds"],
}
print(json.dumps(out))
Path("runs").mkdir(exist_ok=True)
json.dump(out, open("runs/eval70k.json", "w"))
