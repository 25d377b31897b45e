"""Where the time of batch-1 online training goes (issue 14 items 2–3): layer by layer.

Online DSSM training at NpS 4 on Fashion-MNIST (Newton, T = 1e-4, the seed's learning
rate), run the same way several times from the same initial weights over the same images,
each time with one more layer of the stack peeled off:

  engine_full      the Engine as ``run_dssm`` wires it: DynamicsSettler + [rule, SettlingMonitor, Evaluator]
  engine_rule      the Engine with the plasticity rule only
  settle_update    a plain loop over the same batches: ``settle(...)`` + ``hebbian_update(...)``
  compiled_calls   ``compiled.settle_layer`` + ``compiled.hebbian_update_online`` (no ``settle`` dispatch)
  kernels          the two numba kernels on preallocated NumPy arrays (no torch tensors), each timed
  batches          only iterating ``epoch_batches`` (indexing the image, building the Batch)

The difference between two neighbours is the cost of that layer. Beside each part: its
flop and byte counts and the arithmetic limit on this machine (``machine_peak.py``: a
large sgemm and copy bandwidths measured in the same run). ``--legacy`` adds the Engine
with the monitor and dispatch of before this change (the before/after of the safe wins).
A cProfile of ``engine_full`` lists the Python functions per image.

Usage: PYTHONPATH=. python benchmarks/online_profile.py --images 1000 --repeats 3 --out runs/online_profile.json
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine_peak  # noqa: E402
from tight_loop import TightLoop  # noqa: E402

from dynsim import compiled, settle  # noqa: E402
from dynsim.builders import build_layer, epoch_batches, prepare_data  # noqa: E402
from dynsim.engine import DynamicsSettler, Engine  # noqa: E402
from dynsim.evaluation import Evaluator  # noqa: E402
from dynsim.monitors import SettlingMonitor  # noqa: E402
from dynsim.pipelines.dssm import DSSMConfig  # noqa: E402
from dynsim.plasticity import SEED_RATE, SimilarityMatchingRule, hebbian_update  # noqa: E402
from dynsim.solvers import SiteNewton  # noqa: E402
from dynsim.stopping import stop_rule  # noqa: E402

STOP = stop_rule(1e-4, 3000)
# CPU time of this (the only working) thread: the 2-core machine is shared, and wall time counts
# the time other processes hold the core; --clock wall gives wall time
CLOCK = time.thread_time


def engine_callbacks(layer, which, xte, yte):
    rule = SimilarityMatchingRule(layer)
    if which == "rule":
        return [rule]
    ev = Evaluator(layer, x_train=xte[:20], y_train=yte[:20], x_test=xte[:20], y_test=yte[:20], solver=SiteNewton(),
                   stop=STOP, every=15, epochs=120, readout="svc", progress=False)
    monitor = LegacySettlingMonitor() if which == "legacy" else SettlingMonitor()
    return [rule, monitor, ev]


def run_engine(layer, x, images, which, xte, yte, epoch=0):
    cbs = engine_callbacks(layer, which, xte, yte)
    engine_cls, settler_cls = (LegacyEngine, LegacySettler) if which == "legacy" else (Engine, DynamicsSettler)
    engine = engine_cls(settler_cls(layer, SiteNewton(), STOP), cbs, progress=False)
    batches = epoch_batches(x, images=images, batch_size=1, seed=0)
    t0 = CLOCK()
    engine.fit(batches, epoch + 1, start_epoch=epoch)
    return CLOCK() - t0, {}


def run_loop_only(layer, x, images, which, xte, yte, epoch=0):
    """The event loop alone: a settler that returns one precomputed result (no dynamics) and a
    rule whose update does nothing, with the monitor and evaluator of ``engine_full``: the
    per-image cost of the Engine's dispatch and the monitors, without the settle's noise."""
    fixed = settle(layer, x[:1], solver=SiteNewton(), stop=STOP)
    cbs = engine_callbacks(layer, which, xte, yte)
    cbs[0].update = lambda x, r: None
    engine_cls, settler_cls = (LegacyEngine, LegacySettler) if which == "legacy" else (Engine, DynamicsSettler)

    class Fixed(settler_cls):
        def __call__(self, batch, on_step=None):
            return self._checked(batch, fixed)

    engine = engine_cls(Fixed(layer, SiteNewton(), STOP), cbs, progress=False)
    batches = epoch_batches(x, images=images, batch_size=1, seed=0)
    t0 = CLOCK()
    engine.fit(batches, epoch + 1, start_epoch=epoch)
    return CLOCK() - t0, {}


def run_settle_update(layer, x, images, epoch=0):
    eta, solver = SEED_RATE(epoch), SiteNewton()
    t0 = CLOCK()
    for batch in epoch_batches(x, images=images, batch_size=1, seed=0)(epoch):
        res = settle(layer, batch.x, solver=solver, stop=STOP)
        hebbian_update(layer, batch.x, res.r, eta)
    return CLOCK() - t0, {}


def run_compiled_calls(layer, x, images, epoch=0):
    eta = SEED_RATE(epoch)
    t0 = CLOCK()
    for batch in epoch_batches(x, images=images, batch_size=1, seed=0)(epoch):
        _, r, *_ = compiled.settle_layer(layer, batch.x, None, method="newton", tol=1e-4, cap=3000, cap_first=False,
                                         max_state_norm=1e6)
        compiled.hebbian_update_online(layer, batch.x, r, eta, 0.5 * eta)
    return CLOCK() - t0, {}


def run_kernels(layer, x, images, epoch=0):
    """The two kernels alone, on NumPy arrays prepared once; each kernel timed on its own."""
    eta = SEED_RATE(epoch)
    w, ff_index, n_pixels, channels, lat, lat_index = compiled._arrays(layer)
    order = np.random.default_rng([0, epoch]).integers(0, x.shape[0], size=images)
    xs = x.numpy()
    n = layer.state_size
    u, r = np.zeros((1, n), np.float32), np.zeros((1, n), np.float32)
    steps, status, residual = np.zeros(1, np.int64), np.zeros(1, np.int8), np.zeros(1, np.float32)
    dts = np.zeros(1, np.float32)
    code = compiled._activation_code("tanh", torch.float32)
    bound = float(1e6 * np.sqrt(n))
    big = float(np.finfo(np.float32).max)
    t_settle = t_update = 0.0
    total_steps = 0
    t0 = CLOCK()
    for i in order:
        xi = xs[i : i + 1]
        ta = CLOCK()
        u.fill(0.0)
        compiled._settle_kernel(xi, w, ff_index, n_pixels, channels, lat, np.float32(-1.0), 1.0, code,
                                compiled.METHOD_PICARD_NEWTON, dts, 1e-4, 3000, False, bound, big, u, r, steps, status,
                                residual)
        tb = CLOCK()
        compiled._hebbian_kernel(xi[0], r[0], w, ff_index, n_pixels, channels, lat, lat_index, np.float32(eta),
                                 np.float32(0.5 * eta))
        tc = CLOCK()
        t_settle += tb - ta
        t_update += tc - tb
        total_steps += int(steps[0])
    elapsed = CLOCK() - t0
    return elapsed, {"settle_kernel_s": t_settle, "update_kernel_s": t_update, "mean_steps": total_steps / images}


def run_batches(x, images, epoch=0):
    t0 = CLOCK()
    for _ in epoch_batches(x, images=images, batch_size=1, seed=0)(epoch):
        pass
    return CLOCK() - t0, {}


def run_tight(layer, x, images, epoch=0):
    tl = TightLoop.from_layer(layer)
    t0 = CLOCK()
    hist = tl.train(x.numpy(), epochs=epoch + 1, images=images, start_epoch=epoch)
    return CLOCK() - t0, {"mean_steps": hist[0]["mean_steps"]}


def arithmetic(layer, mean_newton_steps):
    """Flop and byte counts per image (float32), from the shapes and the measured Newton steps.

    drive: 2·S·M·K (K padded fan-in); per residual test: tanh (≈ 20 flop, the rational) and the
    lateral product 2·S·M² + 4·S·M; per Newton step: the Jacobian S·M², the elimination
    ≈ (2/3)·S·M³ + 2·S·M², the update 4·S·M. Update: 3 flop per stored weight (W and L).
    Bytes: weights read (settle) or read and written (update) once, inputs and state once.
    """
    s, m, k = layer.ff.weight.shape
    nn = s * m
    tests = mean_newton_steps + 1
    settle_flop = 2 * s * m * k + tests * (20 * nn + 2 * s * m * m + 4 * nn) + mean_newton_steps * (
        s * m * m + (2 / 3) * s * m**3 + 2 * s * m * m + 4 * nn)
    settle_bytes = 4 * (s * m * k + s * m * m + layer.input_size + 2 * nn)
    update_flop = 3 * (s * m * k + s * m * m)
    update_bytes = 4 * 2 * (s * m * k + s * m * m) + 4 * (layer.input_size + nn)
    return {"settle_flop": settle_flop, "settle_bytes": settle_bytes, "update_flop": update_flop,
            "update_bytes": update_bytes}


def profile_engine(layer, x, images, xte, yte, top=18):
    pr = cProfile.Profile(CLOCK)
    pr.enable()
    run_engine(layer, x, images, "full", xte, yte)
    pr.disable()
    st = pstats.Stats(pr)
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _) in st.stats.items():
        rows.append({"function": f"{Path(file).name}:{line}({fn})", "calls_per_image": nc / images,
                     "own_us_per_image": tt / images * 1e6, "cumulative_us_per_image": ct / images * 1e6})
    rows.sort(key=lambda r: -r["own_us_per_image"])
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
    return rows[:top], buf.getvalue()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--legacy", action="store_true", help="also the Engine + monitor of before the safe wins")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="cpu: this thread's CPU time (default; the machine is shared); wall: perf_counter")
    p.add_argument("--out", default="runs/online_profile.json")
    args = p.parse_args(argv)
    global CLOCK
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    cfg = DSSMConfig(data=args.data)
    ds, xtr, xte = prepare_data(cfg)
    x = torch.as_tensor(xtr)
    layer0 = build_layer(cfg, ds.image_shape)
    run_compiled_calls(copy.deepcopy(layer0), x, 3)  # compile or load the kernels before any timing
    peak = machine_peak.measure()
    print("machine:", {k: round(v, 1) for k, v in peak.items()}, flush=True)

    variants = {
        "engine_full": lambda lay: run_engine(lay, x, args.images, "full", xte, ds.y_test),
        "engine_rule": lambda lay: run_engine(lay, x, args.images, "rule", xte, ds.y_test),
        "settle_update": lambda lay: run_settle_update(lay, x, args.images),
        "compiled_calls": lambda lay: run_compiled_calls(lay, x, args.images),
        "kernels": lambda lay: run_kernels(lay, x, args.images),
        "batches": lambda lay: run_batches(x, args.images),
        "tight_numpy_euler": lambda lay: run_tight(lay, x, args.images),
    }
    if args.legacy:
        variants = {"engine_full_legacy": lambda lay: run_engine(lay, x, args.images, "legacy", xte, ds.y_test),
                    **variants,
                    "loop_only_legacy": lambda lay: run_loop_only(lay, x, args.images, "legacy", xte, ds.y_test),
                    "loop_only": lambda lay: run_loop_only(lay, x, args.images, "full", xte, ds.y_test)}
    times = {k: [] for k in variants}
    info = {}
    finals = {}
    for _ in range(args.repeats):  # interleaved, so that load changes hit every variant alike
        for name, fn in variants.items():
            lay = copy.deepcopy(layer0)
            t, extra = fn(lay)
            times[name].append(t)
            info.setdefault(name, []).append(extra)
            finals[name] = lay.ff.weight.clone()
    per_image = {k: statistics.median(v) / args.images for k, v in times.items()}
    kern = info["kernels"]
    settle_k = statistics.median(e["settle_kernel_s"] for e in kern) / args.images
    update_k = statistics.median(e["update_kernel_s"] for e in kern) / args.images
    mean_steps = kern[0]["mean_steps"]
    # the variants follow one trajectory: same weights at the end
    ref = finals["engine_full"]
    same = {k: float((v - ref).norm() / ref.norm()) for k, v in finals.items()
            if k not in ("tight_numpy_euler", "batches", "loop_only", "loop_only_legacy")}
    ar = arithmetic(layer0, mean_steps)
    lim_settle = machine_peak.limit_seconds(ar["settle_flop"], ar["settle_bytes"], peak)
    lim_update = machine_peak.limit_seconds(ar["update_flop"], ar["update_bytes"], peak)
    parts = [
        ("settle kernel (drive + Picard + Newton, compiled)", settle_k, lim_settle,
         f"{ar['settle_flop'] / 1e3:.0f} kflop, {ar['settle_bytes'] / 1e3:.0f} kB"),
        ("update kernel (W and L, compiled)", update_k, lim_update,
         f"{ar['update_flop'] / 1e3:.0f} kflop, {ar['update_bytes'] / 1e3:.0f} kB"),
        ("kernel-call timing loop (clock reads, fill)", per_image["kernels"] - settle_k - update_k, 0.0, ""),
        ("settle_layer + hebbian_update_online wrappers (tensors, views, checks)",
         per_image["compiled_calls"] - per_image["kernels"], 0.0, ""),
        ("settle() + hebbian_update() dispatch (validation, rule lookup, SettleResult)",
         per_image["settle_update"] - per_image["compiled_calls"], 0.0, ""),
        ("Engine + DynamicsSettler + rule callback (hooks, divergence check)",
         per_image["engine_rule"] - per_image["settle_update"], 0.0, ""),
        ("monitors: SettlingMonitor + Evaluator hooks", per_image["engine_full"] - per_image["engine_rule"], 0.0, ""),
    ]
    if args.legacy:
        parts.append(("(before) legacy Engine dispatch + list monitor, vs engine_full",
                      per_image["engine_full_legacy"] - per_image["engine_full"], 0.0, ""))
        parts.append(("event loop alone (fixed result, no-op update), before the safe wins",
                      per_image["loop_only_legacy"], 0.0, ""))
        parts.append(("event loop alone (fixed result, no-op update), after", per_image["loop_only"], 0.0, ""))
    print(f"\nper image, median of {args.repeats} runs of {args.images} images (epoch 0, NpS 4, Newton "
          f"{mean_steps:.2f} steps + Picard):")
    print(f"{'variant':22s} {'µs/image':>10s}")
    for k, v in per_image.items():
        print(f"{k:22s} {v * 1e6:10.1f}")
    print(f"\n{'part':78s} {'µs/image':>9s} {'limit µs':>9s}  counts")
    for name, t, lim, note in parts:
        print(f"{name:78s} {t * 1e6:9.1f} {lim * 1e6:9.2f}  {note}")
    prof_rows, prof_text = profile_engine(copy.deepcopy(layer0), x, args.images, xte, ds.y_test)
    print("\ncProfile of engine_full (own time per image):")
    for r in prof_rows:
        print(f"  {r['own_us_per_image']:7.2f} µs  {r['calls_per_image']:5.1f} calls  {r['function']}")
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    out = {
        "args": vars(args), "machine_peak": peak, "uptime_at_end": uptime, "mean_newton_steps": mean_steps,
        "per_image_seconds": per_image, "all_seconds": times,
        "parts": [{"part": n, "seconds_per_image": t, "limit_seconds": lim, "counts": note}
                  for n, t, lim, note in parts],
        "arithmetic": ar, "final_weight_difference_vs_engine_full": same,
        "tight_mean_euler_steps": info["tight_numpy_euler"][0]["mean_steps"],
        "cprofile_engine_full": prof_rows, "cprofile_text": prof_text,
    }
    print("\nfinal W vs engine_full (relative):", same)
    print(uptime)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("wrote", args.out)


# --- the code of before the safe wins, kept here to measure them in the same run -------------
class LegacySettlingMonitor(SettlingMonitor):
    """SettlingMonitor as it was: Python lists extended per batch."""

    def __init__(self, postfix_every: int = 25):
        self._its, self._sts = [], []
        self.postfix_every = postfix_every
        self._epoch_start = 0
        self._evals = 0

    def on_epoch_start(self, engine, epoch):
        self._epoch_start = len(self._its)
        self._evals = 0

    def on_batch_end(self, engine, batch, result):
        self._its.extend(result.steps.tolist())
        self._sts.extend(result.status.tolist())
        self._evals += result.n_evals
        if engine.batches_seen % self.postfix_every == 0:
            recent = self._its[-200:]
            engine.set_postfix(iters=f"{sum(recent) / len(recent):.0f}")

    def on_epoch_end(self, engine, epoch):
        pass

    @property
    def iterations(self):
        return np.asarray(self._its)


class LegacyEngine(Engine):
    """Engine.fit's batch loop as it was: every per-batch hook called on every callback through
    ``getattr``, the progress bar updated per batch, ``batch.size`` read twice."""

    def fit(self, batches, epochs, *, start_epoch=0, images_per_epoch=None, resume=False):
        from tqdm.auto import tqdm

        on_step = self._step_hook()
        self._bar = tqdm(total=None, unit="img", disable=not self.progress)
        try:
            self._call("on_fit_start")
            for epoch in range(start_epoch, epochs):
                self.epoch = epoch
                self._record = {"epoch": epoch}
                t0 = CLOCK()
                self._call("on_epoch_start", epoch)
                for batch in batches(epoch):
                    self._call("on_input", batch)
                    result = self.settler(batch, on_step)
                    self._call("on_settled", batch, result)
                    self._call("on_batch_end", batch, result)
                    self.batches_seen += 1
                    self.images_seen += batch.size
                    self._bar.update(batch.size)
                    if self.should_stop:
                        break
                self._record.update(images_seen=self.images_seen, train_seconds=CLOCK() - t0)
                self.history.append(self._record)
                self._call("on_epoch_end", epoch)
            self._call("on_fit_end")
        finally:
            self._bar.close()
            self._bar = None
        return self


class LegacySettler(DynamicsSettler):
    """DynamicsSettler's divergence test as it was: ``result.diverged.any()`` (a tensor
    comparison with the Status enum)."""

    def __call__(self, batch, on_step=None):
        return self._checked(batch, settle(self.system, batch.x, solver=self.solver, stop=self.stop,
                                           on_step=on_step))

    def _checked(self, batch, result):
        if self.on_divergence == "raise" and bool(result.diverged.any()):
            raise RuntimeError("diverged")
        return result


if __name__ == "__main__":
    main()
