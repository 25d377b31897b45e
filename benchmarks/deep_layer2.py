"""Why layer 2 of the deep network reads out worse than raw pixels (issue 16, item 4): a diagnosis.

A 2-layer network (Fashion-MNIST, NpS 4,4, stride 2,1, radius 4,2, γ = 0, the authors'
settings; ``--mult-factors`` 1,M for each M of ``--m2``) is trained online (batch 1, η_e as the
authors, ``auto`` solver), and before training and after each epoch of 1000 images the readout
subsets (``--eval-train/--eval-test`` images, fixed random subsets as ``run dssm``'s) are settled
from rest to T = 1e-4. Per checkpoint it records, for layer 2:

* the linear readout (``--readout``, LinearSVC by default) on the rates ``r₂`` and on the
  pre-activations ``u₂`` (``r₂ = tanh(u₂)``; if ``u₂`` reads out well where ``r₂`` does not, the
  information is there and the saturation of tanh loses it);
* mean ``|r₂|``, the fraction of rates with ``|r₂| > 0.99``, ``‖W₂‖_F``, ``‖L₂ − I‖_F``, and the
  largest layer residual (all inputs settled, so the step cap is not what limits it);

and the same readouts of layer 1 and of the raw pixels. Epoch 0 is the untrained network
(random ``W₂``): if it reads out well, training is what hurts layer 2.

    PYTHONPATH=. python benchmarks/deep_layer2.py --out benchmarks/results/deep_layer2_fashion.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from dynsim.builders import build_dssm, epoch_batches, prepare_data, subset
from dynsim.configs.dssm import DSSMConfig
from dynsim.engine import Engine
from dynsim.evaluation import readout_accuracy, settle_dataset
from dynsim.results import write_json_atomic


def measure(net, x_tr, y_tr, x_te, y_te, raw, readout):
    """Settle both subsets from rest; readouts and activity of each layer."""
    tr = settle_dataset(net.system, x_tr, solver=net.solver, stop=net.stop, keep_states=True)
    te = settle_dataset(net.system, x_te, solver=net.solver, stop=net.stop, keep_states=True)
    system = net.system
    n1 = system.sizes[0]
    u_tr, u_te = tr.u.numpy(), te.u.numpy()
    out = {"raw_pixels": raw, "fraction_converged": min(tr.fraction_converged, te.fraction_converged),
           "mean_steps": float(np.mean(np.concatenate([tr.steps, te.steps])))}
    for name, a, b in (("layer1_r", tr.r[:, :n1], te.r[:, :n1]), ("layer2_r", tr.r[:, n1:], te.r[:, n1:]),
                       ("layer2_u", u_tr[:, n1:], u_te[:, n1:])):
        out[name] = readout_accuracy(readout, a, y_tr, b, y_te)["accuracy"]
    r2 = np.abs(te.r[:, n1:])
    out["mean_abs_r1"] = float(np.abs(te.r[:, :n1]).mean())
    out["mean_abs_r2"] = float(r2.mean())
    out["fraction_r2_saturated"] = float((r2 > 0.99).mean())
    w2 = system.layers[1].ff.weight
    lat = system.layers[1].lateral.weight
    eye = torch.eye(lat.shape[1], dtype=lat.dtype)
    out["w2_norm"] = float(w2.norm())
    out["l2_minus_i_norm"] = float((lat[:, :, : lat.shape[1]] - eye).norm())
    drive = system.drive(torch.as_tensor(x_te[:500]))
    out["max_layer_residual"] = float(system.layer_residuals(te.u[:500], drive).max())
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--m2", default="1,20", help="layer-2 mult factors to compare (1: the authors' default)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--eval-train", type=int, default=2000)
    p.add_argument("--eval-test", type=int, default=2000)
    p.add_argument("--readout", default="svc")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/deep_layer2.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = []
    for m2 in [float(v) for v in a.m2.split(",")]:
        config = DSSMConfig(data=a.data, layers=2, nps=[4, 4], stride=[2, 1], radius=[4.0, 2.0],
                            mult_factors=[1.0, m2], seed=a.seed)
        ds, x_train, x_test = prepare_data(config)
        x_tr, y_tr = subset(x_train, ds.y_train, a.eval_train, a.seed)
        x_te, y_te = subset(x_test, ds.y_test, a.eval_test, a.seed + 1)
        raw = readout_accuracy(a.readout, x_tr, y_tr, x_te, y_te)["accuracy"]
        net = build_dssm(config, ds.image_shape)
        engine = Engine(net.settler, [net.rule], progress=False)
        batches = epoch_batches(torch.as_tensor(x_train), images=1000, batch_size=1, seed=a.seed)
        for epoch in range(a.epochs + 1):
            if epoch:
                engine.fit(batches, epoch, start_epoch=epoch - 1)  # epoch e - 1 at η_(e-1), as run dssm
            row = {"m2": m2, "epoch": epoch, "images": 1000 * epoch,
                   **measure(net, x_tr, y_tr, x_te, y_te, raw, a.readout)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nload average {os.getloadavg()[0]:.1f}; {time.perf_counter() - t0:.0f} s; readout {a.readout} on "
          f"{a.eval_train}/{a.eval_test} images; one seed ({a.seed})\n")
    print("| m₂ | images | raw % | layer 1 r % | layer 2 r % | layer 2 u % | mean abs r₂ | abs r₂ > 0.99 "
          "| ‖W₂‖ | ‖L₂−I‖ | max residual |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['m2']:g} | {r['images']} | {100 * r['raw_pixels']:.2f} | {100 * r['layer1_r']:.2f} | "
              f"{100 * r['layer2_r']:.2f} | {100 * r['layer2_u']:.2f} | {r['mean_abs_r2']:.2f} | "
              f"{r['fraction_r2_saturated']:.2f} | {r['w2_norm']:.1f} | {r['l2_minus_i_norm']:.1f} | "
              f"{r['max_layer_residual']:.1e} |")
    write_json_atomic(Path(a.out), {"benchmark": "deep_layer2", "args": vars(a), "rows": rows,
                                    "load_average": os.getloadavg()})


if __name__ == "__main__":
    main()
