"""Compiled (numba) kernels vs the torch path, measured in the same run on the same weights.

Rows (ratio = torch time / compiled time, > 1: the kernels are faster):

1. settle one input at a time (batch 1), per-site Newton, T = 1e-4, on weights after
   ``--train-images`` online images: torch path vs ``dynsim.compiled``; (1b) the same with the
   seed's Euler schedule (on a quarter of the inputs);
2. settle a batch of ``--eval-batch`` images (evaluation): torch vs compiled with 1 and 2 threads;
3. online training (settle + Hebbian update, batch 1) through the Engine, one epoch;
4. the per-site M × M elimination: site by site vs site-last (vectorised over sites), M = 2, 4, 8;
5. compile time: a fresh process with an empty numba cache vs one that finds the cache;
6. the probe's two products on 60,000 × 785 features, ``X W`` and ``Xᵀ G`` (a transposed view)
   vs the "wide" ``Wᵀ Xᵀ`` and ``Gᵀ X`` that the removed L-BFGS probe used (as does the ``svc``
   readout's gradient),
   1 and 2 threads (not a kernel: a layout choice measured here with the rest);
7. the torch path's Newton lateral term ``s·A_k r_k`` (used on GPU and for NpS > 16): a
   broadcast ``matmul`` (copies A per sample) vs one ``bmm`` over sites;
8. the float32 kernel's tanh: libm's ``tanhf`` vs the vectorisable rational, same batch;
9. where the compiled Newton loop stops paying as NpS grows (4–48), batch 1 and 200: it sets
   ``dynsim.compiled.MAX_NPS``;
10. evaluation settling from rest vs warm-started from the previous evaluation's fixed points
    (``Evaluator(warm_settle=True)``; weights after 30 epochs, states from epoch 15), compiled.

Usage: PYTHONPATH=. python benchmarks/compiled_kernels.py --out runs/compiled_kernels.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dssm_speed import median_time  # noqa: E402

from dynsim import compiled, settle  # noqa: E402
from dynsim.builders import build_layer, epoch_batches, prepare_data  # noqa: E402
from dynsim.engine import DynamicsSettler, Engine  # noqa: E402
from dynsim.pipelines.dssm import DSSMConfig  # noqa: E402
from dynsim.plasticity import SimilarityMatchingRule  # noqa: E402
from dynsim.solvers import Euler, SiteNewton  # noqa: E402
from dynsim.stopping import stop_rule  # noqa: E402

STOP = stop_rule(1e-4, 3000)


def train(layer, x, images, epoch=0):
    rule = SimilarityMatchingRule(layer)
    engine = Engine(DynamicsSettler(layer, SiteNewton(), STOP), [rule], progress=False)
    engine.fit(epoch_batches(x, images=images, batch_size=1, seed=epoch), epoch + 1, start_epoch=epoch)


def per_site_elimination(a, b):  # numba-compiled below: the layout the kernel does not use
    m, n_sites = a.shape[1], a.shape[0]
    for s in range(n_sites):
        for c in range(m):
            p, best = c, abs(a[s, c, c])
            for i in range(c + 1, m):
                if abs(a[s, i, c]) > best:
                    best, p = abs(a[s, i, c]), i
            if p != c:
                for j in range(c, m):
                    a[s, c, j], a[s, p, j] = a[s, p, j], a[s, c, j]
                b[s, c], b[s, p] = b[s, p], b[s, c]
            for i in range(c + 1, m):
                f = a[s, i, c] / a[s, c, c]
                for j in range(c + 1, m):
                    a[s, i, j] -= f * a[s, c, j]
                b[s, i] -= f * b[s, c]
        for c in range(m - 1, -1, -1):
            acc = b[s, c]
            for j in range(c + 1, m):
                acc -= a[s, c, j] * b[s, j]
            b[s, c] = acc / a[s, c, c]


def elimination_rows(repeats=2000):
    import numba

    per_site = numba.njit(fastmath={"reassoc", "contract"})(per_site_elimination)
    rows = []
    rng = np.random.default_rng(0)
    for m in (2, 4, 8):
        a = (rng.standard_normal((196, m, m)) - 2 * np.eye(m)).astype(np.float32)
        f = rng.standard_normal((196, m)).astype(np.float32)
        a_last, f_last = np.ascontiguousarray(a.transpose(1, 2, 0)), np.ascontiguousarray(f.T)

        def run_site(a=a, f=f):
            aa, ff = a.copy(), f.copy()
            per_site(aa, ff)
            return ff

        def run_last(a=a_last, f=f_last):
            aa, ff = a.copy(), f.copy()
            compiled._solve_sites(aa, ff)
            return ff

        z1, z2 = run_site(), run_last()
        t1, _ = median_time(lambda: [run_site() for _ in range(repeats)], 3)
        t2, _ = median_time(lambda: [run_last() for _ in range(repeats)], 3)
        rows.append({"what": f"4. elimination of 196 {m}×{m} systems (µs)", "torch_or_baseline": t1 / repeats * 1e6,
                     "compiled": t2 / repeats * 1e6, "ratio": t1 / t2,
                     "note": f"site by site vs site-last; max |Δz| {float(np.abs(z1 - z2.T).max()):.1e}"})
    return rows


COMPILE_SNIPPET = """
import time, torch
t0 = time.perf_counter()
from dynsim import HebbianLayer, settle, compiled
from dynsim.plasticity import hebbian_update
from dynsim.solvers import Euler, SiteNewton  # noqa: E402
from dynsim.stopping import stop_rule  # noqa: E402
layer = HebbianLayer((1, 28, 28))
x = torch.randn(2, 784)
t1 = time.perf_counter()
res = settle(layer, x, solver=SiteNewton(), stop=stop_rule(1e-4, 3000))
hebbian_update(layer, x[:1], res.r[:1], 0.005)
torch.set_num_threads(2)
settle(layer, torch.randn(200, 784), solver=SiteNewton(), stop=stop_rule(1e-4, 3000))
print(time.perf_counter() - t1, t1 - t0)
"""


def compile_rows():
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        times = []
        for _ in range(2):  # first: empty cache (compiles), second: loads the cache
            out = subprocess.run([sys.executable, "-c", COMPILE_SNIPPET], env=env, capture_output=True, text=True,
                                 check=True)
            times.append(float(out.stdout.split()[0]))
    return [{"what": "5. first settle + update + parallel settle in a fresh process (s)",
             "torch_or_baseline": times[0], "compiled": times[1], "ratio": times[0] / times[1],
             "note": "empty numba cache (compiles) vs cache present"}]


def probe_rows(repeats):
    n, d, k = 60000, 785, 10
    g = torch.Generator().manual_seed(0)
    xb, v, gt = torch.rand(n, d, generator=g), 0.01 * torch.randn(d, k, generator=g), torch.randn(k, n, generator=g)
    xb_t, g_nk = xb.T.contiguous(), gt.T.contiguous()
    rows = []
    old = torch.get_num_threads()
    try:
        for th in (1, 2):
            torch.set_num_threads(th)
            tv, (a1, b1) = median_time(lambda: (xb @ v, xb.T @ g_nk), repeats)
            tc, (a2, b2) = median_time(lambda: (v.T @ xb_t, gt @ xb), repeats)
            err = max(float((a1 - a2.T).abs().max() / a1.abs().max()), float((b1 - b2.T).abs().max() / b1.abs().max()))
            rows.append({"what": f"6. probe scores + gradient products, 60000×785, {th} thread(s) (ms)",
                         "torch_or_baseline": tv * 1e3, "compiled": tc * 1e3, "ratio": tv / tc,
                         "note": f"X W, Xᵀ G (view) vs Wᵀ Xᵀ, Gᵀ X (wide; the 'compiled' column); rel. diff {err:.1e}"})
    finally:
        torch.set_num_threads(old)
    return rows


def lateral_rows(repeats):
    """The torch Newton step's lateral term s·A_k r_k: broadcast matmul vs one bmm over sites."""
    rows = []
    g = torch.Generator().manual_seed(0)
    for m, b in ((4, 1000), (100, 25)):
        a, r = torch.randn(196, m, m, generator=g), torch.randn(b, 196, m, generator=g)
        t_mm, y1 = median_time(lambda a=a, r=r: [torch.matmul(a, r.unsqueeze(-1)).squeeze(-1) for _ in range(10)],
                               repeats)
        t_bmm, y2 = median_time(lambda a=a, r=r: [torch.bmm(a, r.permute(1, 2, 0)).permute(2, 0, 1)
                                                  for _ in range(10)], repeats)
        rows.append({"what": f"7. torch Newton lateral term, NpS {m}, batch {b} (ms)", "torch_or_baseline": t_mm * 100,
                     "compiled": t_bmm * 100, "ratio": t_mm / t_bmm,
                     "note": f"broadcast matmul vs bmm over sites; max |Δ| {float((y1[0] - y2[0]).abs().max()):.1e}"})
    return rows


def nps_rows(repeats):
    """Where the compiled loop stops paying: settle with Newton at NpS 4–48 (random symmetric lateral
    blocks, 28×28 inputs), batch 1 and batch 200, compiled vs torch (``MAX_NPS`` lifted for the test)."""
    rows = []
    old_max = compiled.MAX_NPS
    compiled.MAX_NPS = 1000
    try:
        for nps in (4, 16, 32, 48):
            layer = build_layer(DSSMConfig(data="fashion-mnist", nps=nps), (1, 28, 28))
            g = torch.Generator().manual_seed(0)
            noise = (0.3 / nps**0.5) * torch.randn(layer.lateral.weight.shape, generator=g)
            layer.lateral.weight.add_((noise + noise.mT) / 2)
            x = torch.randn(200, 784, generator=g)
            for b, n_img in ((1, 20), (200, 200)):
                def run(b=b, n_img=n_img, layer=layer, x=x):
                    return [settle(layer, x[i:i + b], solver=SiteNewton(), stop=STOP) for i in range(0, n_img, b)]

                run()
                t_fast, fast = median_time(run, repeats)
                with compiled.disabled():
                    t_torch, ref = median_time(run, repeats)
                same = all(torch.equal(a.steps, r.steps) for a, r in zip(fast, ref, strict=True))
                rows.append({"what": f"9. Newton settle, NpS {nps}, batch {b} (ms per image)",
                             "torch_or_baseline": t_torch / n_img * 1e3, "compiled": t_fast / n_img * 1e3,
                             "ratio": t_torch / t_fast, "note": f"random lateral blocks; same steps {same}"})
    finally:
        compiled.MAX_NPS = old_max
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--train-images", type=int, default=1000, help="online images before the settle rows")
    p.add_argument("--settle-inputs", type=int, default=200)
    p.add_argument("--eval-batch", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="runs/compiled_kernels.json")
    args = p.parse_args(argv)
    if not compiled.available():
        raise SystemExit("numba is not installed (pip install numba): nothing to compare")
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    cfg = DSSMConfig(data=args.data)
    ds, xtr, xte = prepare_data(cfg)
    x_train = torch.as_tensor(xtr)
    layer = build_layer(cfg, ds.image_shape)
    train(layer, x_train, 50)  # compile and warm up both paths
    with compiled.disabled():
        train(build_layer(cfg, ds.image_shape), x_train, 50)
    train(layer, x_train, args.train_images)
    xs = torch.as_tensor(xte[: args.settle_inputs])
    rows = []

    def one_by_one():
        return [settle(layer, x[None], solver=SiteNewton(), stop=STOP) for x in xs]

    t_fast, fast = median_time(one_by_one, args.repeats)
    with compiled.disabled():
        t_torch, ref = median_time(one_by_one, args.repeats)
    same_steps = all(torch.equal(a.steps, b.steps) for a, b in zip(fast, ref, strict=True))
    rate_diff = max(float((a.r - b.r).norm() / b.r.norm()) for a, b in zip(fast, ref, strict=True))
    n = len(xs)
    rows.append({"what": "1. settle per input, batch 1 (ms)", "torch_or_baseline": t_torch / n * 1e3,
                 "compiled": t_fast / n * 1e3, "ratio": t_torch / t_fast,
                 "note": f"{statistics.mean(float(a.steps) for a in fast):.2f} steps; same steps {same_steps}; "
                         f"rates differ ≤ {rate_diff:.1e}"})

    n_euler = max(1, n // 4)  # Euler needs hundreds of steps per input: a quarter of the inputs

    def euler_one_by_one():
        return [settle(layer, x[None], solver=Euler(), stop=STOP) for x in xs[:n_euler]]

    t_fast, fast = median_time(euler_one_by_one, args.repeats)
    with compiled.disabled():
        t_torch, ref = median_time(euler_one_by_one, args.repeats)
    same_steps = all(torch.equal(a.steps, b.steps) for a, b in zip(fast, ref, strict=True))
    rate_diff = max(float((a.r - b.r).norm() / b.r.norm()) for a, b in zip(fast, ref, strict=True))
    rows.append({"what": "1b. settle per input, batch 1, seed Euler (ms)", "torch_or_baseline": t_torch / n_euler * 1e3,
                 "compiled": t_fast / n_euler * 1e3, "ratio": t_torch / t_fast,
                 "note": f"{statistics.mean(float(a.steps) for a in fast):.1f} steps; same steps {same_steps}; "
                         f"rates differ ≤ {rate_diff:.1e}"})

    xe = torch.as_tensor(xte[: args.eval_batch])
    with compiled.disabled():
        t_torch, ref = median_time(lambda: settle(layer, xe, solver=SiteNewton(), stop=STOP), args.repeats)
    for th in (1, 2):
        torch.set_num_threads(th)
        t_fast, fast = median_time(lambda: settle(layer, xe, solver=SiteNewton(), stop=STOP), args.repeats)
        torch.set_num_threads(1)
        rows.append({"what": f"2. settle a batch of {len(xe)} (ms per image), compiled with {th} thread(s)",
                     "torch_or_baseline": t_torch / len(xe) * 1e3, "compiled": t_fast / len(xe) * 1e3,
                     "ratio": t_torch / t_fast,
                     "note": f"torch path 1 thread; same steps {torch.equal(fast.steps, ref.steps)}"})

    # the float32 kernel's rational tanh vs libm's tanhf (activation code 0 instead of 3)
    t_rational, fast = median_time(lambda: settle(layer, xe, solver=SiteNewton(), stop=STOP), args.repeats)
    rational_code = compiled._activation_code
    compiled._activation_code = lambda activation, dtype: compiled.ACTIVATION_CODES[activation]
    try:
        t_libm, ref = median_time(lambda: settle(layer, xe, solver=SiteNewton(), stop=STOP), args.repeats)
    finally:
        compiled._activation_code = rational_code
    rows.append({"what": f"8. compiled settle of {len(xe)}, float32 tanh (ms per image)",
                 "torch_or_baseline": t_libm / len(xe) * 1e3, "compiled": t_rational / len(xe) * 1e3,
                 "ratio": t_libm / t_rational,
                 "note": f"libm tanhf vs the rational; same steps {torch.equal(fast.steps, ref.steps)}, "
                         f"rates differ ≤ {float((fast.r - ref.r).abs().max()):.1e}"})

    images = args.train_images
    state = {k: v.clone() for k, v in layer.state_dict().items()}

    def one_epoch(disable):
        layer.load_state_dict(state)
        if disable:
            with compiled.disabled():
                train(layer, x_train, images, epoch=1)
        else:
            train(layer, x_train, images, epoch=1)
        return layer.ff.weight.clone()

    t_fast, w_fast = median_time(lambda: one_epoch(False), args.repeats)
    t_torch, w_torch = median_time(lambda: one_epoch(True), args.repeats)
    rows.append({"what": f"3. online training, {images} images (ms per image)",
                 "torch_or_baseline": t_torch / images * 1e3, "compiled": t_fast / images * 1e3,
                 "ratio": t_torch / t_fast,
                 "note": f"weights after the epoch differ by {float((w_fast - w_torch).norm() / w_torch.norm()):.1e}"})

    # evaluation settling warm-started from the previous evaluation's fixed points (Evaluator(warm_settle=True)),
    # as in the default run: evaluations after epochs 15 and 30 (learning rates of the seed schedule)
    for epoch in range(2, 15):
        train(layer, x_train, images, epoch=epoch)
    u_prev = settle(layer, xe, solver=SiteNewton(), stop=STOP).u
    for epoch in range(15, 30):
        train(layer, x_train, images, epoch=epoch)
    t_cold, cold = median_time(lambda: settle(layer, xe, solver=SiteNewton(), stop=STOP), args.repeats)
    t_warm, warm = median_time(lambda: settle(layer, xe, solver=SiteNewton(), stop=STOP, u0=u_prev), args.repeats)
    rows.append({"what": f"10. compiled settle of {len(xe)} from rest vs warm (ms per image)",
                 "torch_or_baseline": t_cold / len(xe) * 1e3, "compiled": t_warm / len(xe) * 1e3,
                 "ratio": t_cold / t_warm,
                 "note": f"weights after 30 epochs, warm from those after 15; steps "
                         f"{float(cold.steps.float().mean()):.2f} → {float(warm.steps.float().mean()):.2f}, "
                         f"all settled {bool(warm.converged.all())}"})
    rows += elimination_rows()
    rows += compile_rows()
    rows += probe_rows(args.repeats)
    rows += lateral_rows(args.repeats)
    rows += nps_rows(args.repeats)

    print(f"{'what':<66} {'baseline':>10} {'compiled':>10} {'ratio':>7}  note")
    for r in rows:
        print(f"{r['what']:<66} {r['torch_or_baseline']:>10.4g} {r['compiled']:>10.4g} {r['ratio']:>7.2f}  {r['note']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {"torch": torch.__version__, "numba": __import__("numba").__version__, "cpus": os.cpu_count(),
            "load_average": os.getloadavg(), "args": vars(args)}
    out.write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
