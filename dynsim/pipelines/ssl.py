"""The self-supervised pipeline: train an encoder with the contrastive hinge loss under a
learning schedule (E2E / GLL / RLL) and an update rule (BP / RF / URF / DTP), then
evaluate it with a linear probe on its frozen representation.

``run_ssl(config)`` runs one cell and returns the result dict (config, version,
per-epoch history, ``final`` block). The grid of Tang, Yang & Amit (2022) Table 1 is
:mod:`dynsim.studies.ssl`; the command line, :mod:`dynsim.cli.ssl`.

Example
-------
>>> from dynsim.pipelines.ssl import SSLConfig, run_ssl
>>> result = run_ssl(SSLConfig(data="digits", epochs=2, n_train=500))  # doctest: +SKIP
>>> result["final"]["test_accuracy"]  # doctest: +SKIP
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import torch

from dynsim.builders import build_ssl_training
from dynsim.callbacks import Callback
from dynsim.checkpoint import Checkpoint, GeneratorStates, check_resume, checkpoint_path
from dynsim.configs.ssl import DEFAULT_ARCH, SSLConfig, training_settings
from dynsim.errors import ConfigError, DivergenceError
from dynsim.results import result_header, write_result
from dynsim.ssl.history import LossHistory
from dynsim.ssl.stages import build_encoder
from dynsim.ssl.training import PlateauStop, TrainingMonitor, probe_encoder

__all__ = ["SSLConfig", "run_ssl"]


def _load(config: SSLConfig, dataset: Any | None):
    if dataset is None:
        from dynsim.data import load_dataset

        dataset = load_dataset(config.data, config.data_dir)
    if config.n_train is not None or config.n_test is not None:
        dataset = dataset.subset(n_train=config.n_train, n_test=config.n_test, seed=config.seed)
    return dataset


def _probe(encoder, x_train, y_train, x_test, y_test, config: SSLConfig) -> dict:
    return probe_encoder(encoder, x_train, y_train, x_test, y_test, probe=config.probe, epochs=config.probe_epochs,
                         batch_size=config.probe_batch_size, standardize=config.probe_standardize,
                         seed=config.seed, device=config.device)


def run_ssl(
    config: SSLConfig,
    *,
    dataset: Any | None = None,
    progress: bool = True,
    checkpoint_every: int = 1,
    resume: bool = False,
) -> dict:
    """Train one encoder and evaluate it; return (and write to ``config.out``) the result.

    Parameters
    ----------
    config : the run's settings.
    dataset : optional already-loaded dataset (fields of :func:`dynsim.data.load_dataset`);
        by default loaded from ``config.data``/``config.data_dir``.
    progress : show tqdm progress bars.
    checkpoint_every : with ``config.out``, write ``<out stem>.ckpt.pt`` every this many
        epochs and when training ends (0: never). It holds the encoder (heads and feedback
        matrices included), the DTP inverses, the rules' optimizer states, the pipeline's
        generators (batch order, deformations, RLL orders, DTP noise) and the history.
    resume : continue from that checkpoint (needs ``config.out``); the final numbers and
        weights are those of an uninterrupted run. Settings that shape training must match
        (:func:`training_settings`), else :class:`ConfigError`.

    Returns
    -------
    dict with ``config``, ``dynsim_version``, ``dataset``, ``encoder``, ``history`` (one row
    per epoch: epoch, images_seen, batches, loss per image, wall_seconds) and ``final``
    (test_accuracy, train_accuracy, random_encoder_accuracy, train_seconds, eval_seconds,
    diverged, divergence: the message naming epoch and batch, or None), ``resumed_from_epoch``
    and ``checkpoint`` (its path, when one is written).
    """
    from dynsim.engine import Batch, Engine

    config.validate()
    check_resume(resume, config.out)
    if not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ConfigError(f"checkpoint_every = {checkpoint_every!r} must be an integer >= 0")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    ds = _load(config, dataset)
    device = torch.device(config.device)
    shape = tuple(int(s) for s in ds.image_shape)
    x_train = torch.as_tensor(ds.x_train, dtype=torch.float32).view(-1, *shape).to(device)
    x_test = torch.as_tensor(ds.x_test, dtype=torch.float32).view(-1, *shape).to(device)
    y_train = torch.as_tensor(ds.y_train, dtype=torch.long)
    y_test = torch.as_tensor(ds.y_test, dtype=torch.long)
    n = len(x_train)
    if n < config.batch_size:
        raise ConfigError(f"batch_size = {config.batch_size} exceeds the {n} training images")
    arch = config.arch or DEFAULT_ARCH[config.data]
    gen = torch.Generator().manual_seed(config.seed)
    encoder = build_encoder(
        arch,
        shape,
        act=config.act,
        head_dim=config.head_dim,
        head_pool=config.head_pool,
        generator=gen,
    ).to(device)
    result: dict[str, Any] = {
        **result_header("run ssl", config, device=str(config.device)),
        "pipeline": "ssl",
        "dataset": {"name": ds.name, "n_train": n, "n_test": len(x_test), "image_shape": shape},
        "encoder": {
            "spec": encoder.spec,
            "n_features": int(encoder.embed(x_train[:1]).shape[1]),
            "n_params": sum(p.numel() for p in encoder.parameters()),
        },
        "history": [],
    }
    lr = config.resolved_lr()
    history = LossHistory(lr, config.rule)
    engine = ckpt = monitor = None
    if config.epochs > 0:  # build everything first, so bad settings fail before any work
        # RLL with the authors' budget: L passes per epoch, so each stage sees every image once
        passes = len(encoder.stages) if config.schedule == "rll" and config.rll_budget == "theirs" else 1
        per_epoch = passes * (n // config.batch_size)
        settler, rules, schedule, inverses = build_ssl_training(config, encoder, shape, gen, per_epoch, device)
        order_gen = torch.Generator().manual_seed(config.seed + 1)

        def batches(epoch: int):
            used = (n // config.batch_size) * config.batch_size
            perm = torch.cat([torch.randperm(n, generator=order_gen)[:used] for _ in range(passes)])
            for k, idx in enumerate(perm.split(config.batch_size)):
                yield Batch(
                    x=x_train[idx].flatten(1), y=y_train[idx], index=idx, epoch=epoch, number=k
                )

        plateau = PlateauStop(history.rows, tol=config.plateau_tol, window=config.plateau_window,
                              planner=schedule if config.schedule == "gll" else None)
        monitor = TrainingMonitor(
            history.rows,
            every=config.probe_every,
            measure=lambda: _probe(encoder, x_train, y_train, x_test, y_test, config),
            prefix=_prefixed,
        )
        callbacks: list[Callback] = [schedule, *rules, history, monitor, plateau]
        if config.out and (checkpoint_every or resume):
            modules: dict[str, torch.nn.Module] = {"encoder": encoder}
            modules.update({f"inverse_{k}": g for k, g in (inverses or {}).items()})
            ckpt = Checkpoint(
                checkpoint_path(config.out),
                every=checkpoint_every,
                modules=modules,
                meta=training_settings(config),
            )
            # the pipeline's own streams: batch order, and deformations, RLL orders, DTP noise
            callbacks += [GeneratorStates(order=order_gen, aug=gen), ckpt]
        desc = f"ssl {config.schedule}/{config.rule}"
        engine = Engine(settler, callbacks, progress=progress, desc=desc)
    t_eval = 0.0
    random_acc = random_probe = None
    if config.random_baseline or config.epochs == 0:
        t0 = time.perf_counter()
        random_probe = _probe(encoder, x_train, y_train, x_test, y_test, config)
        random_acc = random_probe["test_accuracy"]
        t_eval += time.perf_counter() - t0
    resumed_from = None
    if resume and ckpt is not None:
        resumed_from = ckpt.restore(engine) if ckpt.path.exists() else None
        if resumed_from is None:
            warnings.warn(f"no checkpoint at {ckpt.path}; starting from epoch 0", stacklevel=2)
    divergence = None
    if engine is not None:
        try:
            engine.fit(batches, config.epochs, start_epoch=resumed_from or 0)
        except DivergenceError as exc:
            if ckpt is not None and ckpt.last_saved_epoch:
                where = f"the last good checkpoint is {ckpt.path} (after epoch {ckpt.last_saved_epoch})"
            else:
                where = "no checkpoint was written before it"
            divergence = f"{exc}. Training stopped; {where}"
    t0 = time.perf_counter()
    if config.epochs == 0:
        probe = random_probe
    elif divergence is not None:
        probe = {"test_accuracy": None, "train_accuracy": None}
    elif monitor.last is not None and history.rows and monitor.last[0] == history.rows[-1]["epoch"]:
        probe = monitor.last[1]  # the last epoch was just probed: the same encoder
    else:
        probe = _probe(encoder, x_train, y_train, x_test, y_test, config)
    t_eval += time.perf_counter() - t0
    result["history"] = history.rows
    events = plateau.events if engine is not None else []
    result["settings"] = {"lr": lr, "arch": encoder.spec}
    result["departures"] = config.departures()
    result["final"] = {
        "test_accuracy": probe["test_accuracy"],
        "train_accuracy": probe.get("train_accuracy"),
        "effective_rank": probe.get("effective_rank"),
        "feature_rms": probe.get("feature_rms"),
        "random_encoder_accuracy": random_acc,
        "random_encoder_effective_rank": None if random_probe is None else random_probe.get("effective_rank"),
        "random_encoder_feature_rms": None if random_probe is None else random_probe.get("feature_rms"),
        "epochs_trained": len(history.rows),
        "stopped_by": ("plateau" if events and events[-1]["action"] == "stop" else "budget")
        if config.epochs > 0 else None,
        "plateau_events": events,
        "train_seconds": sum(r["wall_seconds"] for r in history.rows),
        "eval_seconds": t_eval,
        "images_seen": sum(r["batches"] for r in history.rows) * config.batch_size,
        "diverged": divergence is not None,
        "divergence": divergence,
    }
    result["resumed_from_epoch"] = resumed_from
    if ckpt is not None:
        result["checkpoint"] = str(ckpt.path)
    if config.out:
        plots = {}
        if result["history"]:
            from dynsim.ssl.plots import plot_training

            plots["training"] = ("_training", plot_training(result))
        write_result(Path(config.out), result, plots)
    return result


def _prefixed(probe: dict) -> dict:
    """A probe's numbers as history-row fields (``probe_test_accuracy``, ``effective_rank``, ...)."""
    return {
        "probe_test_accuracy": probe.get("test_accuracy"),
        "probe_train_accuracy": probe.get("train_accuracy"),
        "effective_rank": probe.get("effective_rank"),
        "feature_rms": probe.get("feature_rms"),
    }
