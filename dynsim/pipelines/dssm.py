"""The similarity-matching (DSSM) experiment of Obeid, Ramambason & Pehlevan (NeurIPS 2019), end to end.

``run_dssm(DSSMConfig(...))`` loads data, builds a structured :class:`HebbianLayer`, and
trains it online on the event loop: each epoch draws ``images_per_epoch`` training images
with replacement, every image settles (Euler with the seed's step schedule by default,
stopping per sample at ``‖du/ds‖/‖u‖ < T`` or the cap), then the Hebbian/anti-Hebbian
rule updates ``W`` and ``L``. Every ``eval_every`` epochs the representations of all train
and test images are read out linearly. The result dict holds the config, the version, the
per-epoch history and a ``final`` block (:func:`dynsim.results.result_header`).
With ``layers > 1`` the system is a :class:`~dynsim.systems.deep.DeepHebbianNet` (per-layer
structure lists, feedback ``gamma``) and each layer's representation is read out
separately (``final.layer_test_accuracy``); see ``docs/deep.md``.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynsim.builders import build_dssm, build_solver, describe_system, epoch_batches, prepare_data, readout_sets
from dynsim.checkpoint import Checkpoint, check_resume, checkpoint_path
from dynsim.configs.dssm import DSSMConfig, training_settings
from dynsim.engine import Engine
from dynsim.errors import DivergenceError
from dynsim.evaluation import Evaluator, readout_accuracy
from dynsim.layer_monitor import LayerMonitor
from dynsim.monitors import SettlingMonitor
from dynsim.readouts import paired_difference
from dynsim.results import result_header
from dynsim.stopping import Status
from dynsim.streaming import SwitchMonitor
from dynsim.systems.deep import DeepHebbianNet

__all__ = ["DSSMConfig", "run_dssm", "write_outputs"]


def run_dssm(config: DSSMConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train and evaluate a DSSM network; write the result JSON and plots if ``config.out``.

    With ``config.out`` and ``checkpoint_every > 0`` a checkpoint ``<out>.ckpt.pt`` is written
    every ``checkpoint_every`` epochs and at the end; ``resume=True`` continues from it
    (same final numbers as an uninterrupted run).
    """
    config.validate()
    check_resume(resume, config.out)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    t_start = time.perf_counter()
    ds, x_train, x_test = prepare_data(config)
    device = torch.device(config.device)
    net = build_dssm(config, ds.image_shape, device=config.device)
    layer, solver, stop, settler = net.system, net.solver, net.stop, net.settler
    deep = isinstance(layer, DeepHebbianNet)

    ev_xtr, ev_ytr, ev_xte, ev_yte = readout_sets(config, ds, x_train, x_test)
    t0 = time.perf_counter()  # raw-pixel baseline with the run's readout, timed apart
    baseline = (readout_accuracy(config.readout, ev_xtr, ev_ytr, ev_xte, ev_yte, device=config.device,
                                 tol=config.readout_tol)
                if config.raw_baseline else {"accuracy": None, "test_predictions": None})
    baseline.pop("weights", None)
    baseline_seconds = time.perf_counter() - t0

    monitor = SettlingMonitor()
    evaluator = Evaluator(
        layer,
        x_train=ev_xtr,
        y_train=ev_ytr,
        x_test=ev_xte,
        y_test=ev_yte,
        solver=solver if config.eval_solver is None else build_solver(config, config.eval_solver),
        stop=stop,
        every=config.eval_every,
        epochs=config.epochs,
        readout=config.readout,
        batch_size=config.eval_batch_size,
        device=config.device,
        seed=config.seed,
        progress=config.progress,
        layer_slices=layer.layer_slices() if deep else None,
        readout_blocks=[sub.nps for sub in layer.layers] if deep else [getattr(layer, "nps", None)],
        readout_tol=config.readout_tol,
    )
    callbacks = [net.rule, monitor, evaluator]
    if deep:  # before the rule: it reads the residuals at the weights the state settled with
        callbacks.insert(0, LayerMonitor(layer, tol=config.threshold or 1e-4))
    if config.stream_every is not None:
        callbacks.insert(0, SwitchMonitor(settler))
    ckpt = None
    if config.out and (config.checkpoint_every or resume):
        meta = training_settings(config)
        ckpt = Checkpoint(checkpoint_path(config.out), every=config.checkpoint_every, modules={"system": layer},
                          meta=meta, recorded={"resolved_solver": config.resolved_solver()})
        callbacks.append(ckpt)
    engine = Engine(settler, callbacks, progress=config.progress, desc=f"dssm {config.data}")
    x_train_t = torch.as_tensor(x_train, device=device)
    batches = epoch_batches(x_train_t, images=config.images_per_epoch, batch_size=config.batch_size, seed=config.seed)
    resumed_from = None
    solver_change = None
    if resume:
        resumed_from = ckpt.restore(engine) if ckpt.path.exists() else None
        if resumed_from is None:
            warnings.warn(f"no checkpoint at {ckpt.path}; starting from epoch 0", stacklevel=2)
        solver_then, solver_now = ckpt.restored_record.get("resolved_solver"), config.resolved_solver()
        if resumed_from is not None and solver_then not in (None, solver_now):
            solver_change = {"checkpoint": solver_then, "now": solver_now}
            warnings.warn(f"--solver {config.solver} ran as {solver_then!r} before the checkpoint and runs as "
                          f"{solver_now!r} now (this version picks differently); both settle to the "
                          f"same threshold, the result records the change", stacklevel=2)
    try:
        with torch.no_grad():
            engine.fit(batches, config.epochs, start_epoch=resumed_from or 0,
                       images_per_epoch=config.images_per_epoch)
    except DivergenceError as exc:
        if ckpt is not None and ckpt.last_saved_epoch:
            where = (f"the last good checkpoint is {ckpt.path} (after epoch {ckpt.last_saved_epoch}); "
                     "fix the setting and rerun with --resume")
        else:
            where = "no checkpoint was written before it (use --checkpoint-every 1 and --out)"
        raise DivergenceError(f"{exc}. The run stopped; {where}") from None

    history = engine.history
    train_seconds = sum(h["train_seconds"] for h in history)
    eval_seconds = sum(h.get("eval_seconds", 0.0) for h in history)
    evaluated = [h for h in history if "test_accuracy" in h]
    its = np.asarray(monitor.iterations)
    paired = None
    if evaluator.test_predictions is not None and baseline["test_predictions"] is not None:
        paired = paired_difference(evaluator.test_predictions[-1], baseline["test_predictions"], ev_yte)
    result = {
        **result_header("run dssm", config, device=str(device)),
        "data": {"name": ds.name, "n_train": len(x_train), "n_test": len(x_test), "image_shape": ds.image_shape,
                 "eval_n_train": len(ev_xtr), "eval_n_test": len(ev_xte)},
        "system": {**describe_system(layer), "solver": config.resolved_solver()},
        "baseline": {"raw_pixel_accuracy": baseline["accuracy"], "seconds": baseline_seconds},
        "history": history,
        "iterations_per_input": its.tolist(),
        "final": {
            "test_accuracy": evaluated[-1]["test_accuracy"] if evaluated else None,
            "best_test_accuracy": max((h["test_accuracy"] for h in evaluated), default=None),
            "layer_test_accuracy": evaluated[-1].get("layer_test_accuracy") if evaluated else None,
            "raw_pixel_accuracy": baseline["accuracy"],
            "gain_over_raw": paired,
            "train_seconds": train_seconds,
            "eval_seconds": eval_seconds,
            "last_eval_settle_seconds": evaluated[-1].get("eval_settle_seconds") if evaluated else None,
            "last_readout_seconds": evaluated[-1].get("readout_seconds") if evaluated else None,
            "total_seconds": time.perf_counter() - t_start,
            "images_seen": engine.images_seen,
            "mean_iterations": float(its.mean()) if its.size else None,
            "fraction_converged": float(np.mean(np.asarray(monitor.status) == 1)) if its.size else None,
            "diverged_skipped": int(np.sum(np.asarray(monitor.status) == int(Status.DIVERGED))),
        },
        "resumed_from_epoch": resumed_from,
        "solver_changed_on_resume": solver_change,
    }
    if ckpt is not None:
        result["checkpoint"] = str(ckpt.path)
    if config.out:
        result["files"] = write_outputs(result, Path(config.out))
    return result


def write_outputs(result: dict[str, Any], out: Path) -> dict[str, str]:
    """Write ``out`` (JSON) and the two plots beside it as one set; return their paths."""
    from dynsim.plots import plot_accuracy, plot_iterations
    from dynsim.results import write_result

    plots = {"accuracy_plot": ("_accuracy", plot_accuracy(result)),
             "iterations_plot": ("_iterations", plot_iterations(result))}
    return write_result(out, result, plots)
