"""The self-supervised pipeline: train an encoder with the contrastive hinge loss under a
learning schedule (E2E / GLL / RLL) and an update rule (BP / RF / URF / DTP), then
evaluate it with a linear probe on its frozen representation.

``run_ssl(config)`` runs one cell and returns the result dict of DESIGN §4 (config,
version, per-epoch history, ``final`` block); ``run_study(...)`` runs the grid of
Tang, Yang & Amit (2022) Table 1 and writes a Markdown table, a JSON file and a bar plot.
``add_run_arguments``/``run_from_args`` and ``add_study_arguments``/``study_from_args``
are the CLI glue for ``dynsim run ssl`` and ``dynsim study ssl``.

Example
-------
>>> from dynsim.pipelines.ssl import SSLConfig, run_ssl
>>> result = run_ssl(SSLConfig(data="digits", epochs=2, n_train=500))  # doctest: +SKIP
>>> result["final"]["test_accuracy"]  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dynsim.callbacks import Callback
from dynsim.checkpoint import Checkpoint, GeneratorStates, checkpoint_path
from dynsim.errors import ConfigError, DivergenceError
from dynsim.readouts import fit_linear_probe
from dynsim.results import result_header, write_result
from dynsim.settings import check_ranges
from dynsim.ssl.augment import Deform
from dynsim.ssl.loss import check_hinge_settings
from dynsim.ssl.rules import RULES, build_inverses, make_rules
from dynsim.ssl.schedules import SCHEDULES, make_schedule
from dynsim.ssl.settler import ContrastiveSettler
from dynsim.ssl.signals import VIEWS
from dynsim.ssl.stages import ACTIVATIONS, ARCHS, build_encoder, parse_spec
from dynsim.ssl.training import PlateauStop, TrainingMonitor, embedding_stats
from dynsim.sweeps import BACKENDS, run_grid

DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10", "cifar100", "stl10")
DEFAULT_ARCH = {
    "digits": "tiny",
    "mnist": "cifar-half",
    "fashion-mnist": "cifar-half",
    "cifar10": "cifar",
    "cifar100": "cifar",
    "stl10": "vgg6",
}
FLIP_DEFAULT = {"digits": False, "mnist": False}  # flips make no sense for digits

# Tang, Yang & Amit (2022) Table 1: SSL on CIFAR-100, linear probe on CIFAR-10 (%):
# (all negatives, gradient block + 5 negatives)
PUBLISHED_CIFAR = {
    ("e2e", "bp"): (71.44, 70.35),
    ("e2e", "dtp"): (71.29, 67.74),
    ("e2e", "rf"): (61.70, 63.61),
    ("gll", "bp"): (72.76, 71.14),
    ("gll", "urf"): (72.76, 71.14),
    ("gll", "rf"): (67.83, 66.52),
    ("rll", "bp"): (71.35, 71.17),
    ("rll", "urf"): (71.35, 71.17),
    ("rll", "rf"): (65.94, 65.49),
    ("random", "-"): (61.23, None),
}
STUDY_GRID: tuple[tuple[str, str], ...] = (
    ("e2e", "bp"),
    ("e2e", "rf"),
    ("e2e", "urf"),
    ("e2e", "dtp"),
    ("gll", "bp"),
    ("gll", "urf"),
    ("gll", "rf"),
    ("rll", "bp"),
    ("rll", "urf"),
    ("rll", "rf"),
    ("random", "-"),
)


# the authors' settings (Tang, Yang & Amit 2022, their CIFAR parameter files pars_emb_cifar.txt
# and pars_emb_cifar_fa.txt); a run that differs lists the difference in result["departures"]
AUTHORS = {
    "act": "hardtanh",
    "batch_size": 500,
    "tau": 6.0,
    "delta": 3.0,
    "head_dim": 64,
    "views": "clean+deformed",
    "negatives_wrap": False,
    "rll_budget": "theirs",
    "probe": "adam",
    "probe_epochs": 400,
    "probe_batch_size": 500,
    "probe_standardize": False,
}
AUTHORS_LR = {"bp": 1e-4, "rf": 1e-5, "urf": 1e-4, "dtp": 1e-4}  # rf: pars_emb_cifar_fa.txt
PROBES = ("adam", "svc", "ridge")
RLL_BUDGETS = ("theirs", "shared")


@dataclass
class SSLConfig:
    """Settings of one SSL run (all keyword, all typed; see ``dynsim run ssl --help``).

    ``epochs = 0`` gives the random-encoder baseline (no training). ``epochs`` is the budget:
    training ends earlier when the epoch loss reaches a plateau (``plateau_tol``,
    ``plateau_window``; :mod:`dynsim.ssl.training`). For GLL the epochs are shared equally
    among the stages and a plateau ends a stage. The hinge loss is summed over pairs
    (SSL.md); the history reports it per image. ``lr = None`` is the authors' (1e-4; RF 1e-5).
    The defaults are the authors' (:data:`AUTHORS`); every difference is listed in the
    result's ``departures``.
    """

    data: str = "digits"
    data_dir: str | None = None
    n_train: int | None = None
    n_test: int | None = None
    schedule: str = "e2e"
    rule: str = "bp"
    arch: str | None = None
    act: str = "hardtanh"
    negatives: int | None = None
    negatives_wrap: bool = False
    grad_block: bool = False
    views: str = "clean+deformed"
    tau: float = 6.0
    delta: float = 3.0
    head_dim: int = 64
    head_pool: int = 2
    epochs: int = 200
    plateau_tol: float = 0.01
    plateau_window: int = 5
    batch_size: int = 500
    lr: float | None = None
    rll_budget: str = "theirs"
    dtp_step: float = 0.1
    dtp_noise: float = 0.1
    flip: bool | None = None
    probe: str = "adam"
    probe_epochs: int = 400
    probe_batch_size: int = 500
    probe_standardize: bool = False
    probe_every: int = 5
    random_baseline: bool = True
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    out: str | None = None

    def resolved_lr(self) -> float:
        """``lr``, or the authors' for the rule when ``lr`` is None (1e-4; RF 1e-5)."""
        return AUTHORS_LR[self.rule] if self.lr is None else self.lr

    def departures(self) -> list[str]:
        """The settings that differ from the authors' (:data:`AUTHORS`), as ``name=ours (theirs X)``."""
        out = [f"{k}={getattr(self, k)!r} (theirs {v!r})" for k, v in AUTHORS.items() if getattr(self, k) != v]
        if self.lr is not None and self.lr != AUTHORS_LR[self.rule]:
            out.append(f"lr={self.lr!r} (theirs {AUTHORS_LR[self.rule]!r} for {self.rule})")
        theirs_arch = ARCHS["cifar"]
        ours_arch = ARCHS.get(self.arch or "", self.arch)
        if self.arch is not None and self.data in ("cifar10", "cifar100") and ours_arch != theirs_arch:
            out.append(f"arch={self.arch!r} (theirs {ARCHS['cifar']!r})")
        return out

    def validate(self) -> SSLConfig:
        """Raise :class:`ConfigError` naming the first bad value; return ``self``."""
        if self.data not in DATASETS:
            raise ConfigError(f"data {self.data!r} is unknown; use one of {', '.join(DATASETS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"schedule {self.schedule!r} is unknown; use one of {', '.join(SCHEDULES)}"
            )
        if self.rule not in RULES:
            raise ConfigError(f"rule {self.rule!r} is unknown; use one of {', '.join(RULES)}")
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"act {self.act!r} is unknown; use one of {sorted(ACTIVATIONS)}")
        for name, choices in (("views", VIEWS), ("probe", PROBES), ("rll_budget", RLL_BUDGETS)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} {getattr(self, name)!r} is unknown; use one of {', '.join(choices)}")
        check_ranges(self, command="ssl")  # one range per setting across commands (dynsim.settings)
        for name in ("grad_block", "random_baseline", "negatives_wrap", "probe_standardize"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.flip is not None and not isinstance(self.flip, bool):
            raise ConfigError(f"flip must be true, false or None (the data set's default), got {self.flip!r}")
        layers = parse_spec(self.arch or DEFAULT_ARCH[self.data])
        if self.schedule == "gll" and 0 < self.epochs < len(layers):
            raise ConfigError(f"GLL (--schedule gll) with {len(layers)} stages needs --epochs >= {len(layers)} "
                              f"(got {self.epochs}); the epochs are shared equally among the stages")
        self.check_memory()
        check_hinge_settings(self.tau, self.delta, self.negatives)
        if self.negatives is not None and self.negatives > self.batch_size:
            raise ConfigError(
                f"negatives = {self.negatives} exceeds batch_size = {self.batch_size}"
            )
        for name in ("epochs",):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} = {getattr(self, name)} must be >= 0")
        for name in ("batch_size", "head_dim", "head_pool", "probe_epochs", "probe_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} = {getattr(self, name)} must be >= 1")
        if self.batch_size < 2:
            raise ConfigError(f"batch_size = {self.batch_size} must be >= 2 (need negatives)")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr = {self.lr} must be > 0 (or None: the authors', 1e-4; RF 1e-5)")
        for name in ("dtp_step",):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} = {getattr(self, name)} must be > 0")
        if not self.dtp_noise >= 0:
            raise ConfigError(f"dtp_noise = {self.dtp_noise} must be >= 0")
        for name in ("n_train", "n_test"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} = {v} must be >= 1 or None (all)")
        return self

    def check_memory(self) -> None:
        """Refuse an encoder that would not fit in memory, saying how much it would need:
        parameters (with gradients and Adam's two moments: ×4) plus one batch of activations
        for the two views (×2), forward and backward (×2), float32."""
        from dynsim.data import IMAGE_SHAPES
        from dynsim.settings import check_memory

        shape = IMAGE_SHAPES[self.data]
        params = activations = 0
        for kind, width, pools in parse_spec(self.arch or DEFAULT_ARCH[self.data]):
            if kind == "c" and len(shape) == 3:
                params += shape[0] * width * 9
                activations += width * shape[1] * shape[2]
                shape = (width, max(shape[1] // 2**pools, 1), max(shape[2] // 2**pools, 1))
            else:
                params += math.prod(shape) * width
                activations += width
                shape = (width,)
            params += shape[0] * self.head_pool**2 * self.head_dim
        need = 4 * (4 * params + 4 * self.batch_size * activations)
        check_memory(need, f"the encoder {self.arch or DEFAULT_ARCH[self.data]!r} at batch size {self.batch_size}",
                     "use a smaller --arch or --batch-size")


class _History(Callback):
    """Per-epoch loss (per image), images seen and wall seconds.

    A non-finite hinge loss raises :class:`DivergenceError` naming the epoch and batch, so
    the run stops before the weights (now NaN) reach a checkpoint.
    """

    def __init__(self, lr: float, rule: str) -> None:
        self.lr, self.rule = lr, rule
        self.rows: list[dict[str, Any]] = []

    def on_epoch_start(self, engine, epoch):  # noqa: D102
        self._t0, self._losses = time.perf_counter(), []

    def on_batch_end(self, engine, batch, result):  # noqa: D102
        loss = float(result.loss)
        if not math.isfinite(loss):
            raise DivergenceError(
                f"the hinge loss became {loss} at epoch {batch.epoch}, batch {batch.number} "
                f"(rule {self.rule}, lr {self.lr}); lower --lr"
            )
        self._losses.append(loss / batch.x.shape[0])

    def on_epoch_end(self, engine, epoch):  # noqa: D102
        self.rows.append(
            {
                "epoch": epoch,
                "images_seen": engine.images_seen,
                "batches": len(self._losses),
                "loss": sum(self._losses) / max(len(self._losses), 1),
                "wall_seconds": time.perf_counter() - self._t0,
            }
        )

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"rows": [dict(r) for r in self.rows]}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        self.rows = [dict(r) for r in state["rows"]]


# settings that may change when a run is resumed (they do not shape the training trajectory);
# every other SSLConfig field, including ones added later, must match the checkpoint.
# ``epochs`` may change except for GLL, whose stage plan depends on it.
RESUME_MAY_CHANGE = (
    "epochs", "probe", "probe_epochs", "probe_batch_size", "probe_standardize", "probe_every",
    "random_baseline", "device", "threads", "out",
)


def training_settings(config: SSLConfig) -> dict[str, Any]:
    """The settings a checkpoint must match to be resumed."""
    keep = {"epochs"} if config.schedule == "gll" else set()
    return {
        k: v
        for k, v in dataclasses.asdict(config).items()
        if k not in RESUME_MAY_CHANGE or k in keep
    }


def _load(config: SSLConfig, dataset: Any | None):
    if dataset is None:
        from dynsim.data import load_dataset

        dataset = load_dataset(config.data, config.data_dir)
    if config.n_train is not None or config.n_test is not None:
        dataset = dataset.subset(n_train=config.n_train, n_test=config.n_test, seed=config.seed)
    return dataset


def _probe(encoder, x_train, y_train, x_test, y_test, config: SSLConfig) -> dict:
    """Probe accuracy (``test_accuracy``, ``train_accuracy``) and the training embedding's
    effective rank and scale (``effective_rank``, ``feature_rms``)."""
    f_train, f_test = encoder.embed(x_train), encoder.embed(x_test)
    if not (torch.isfinite(f_train).all() and torch.isfinite(f_test).all()):
        return {"test_accuracy": None, "train_accuracy": None, "note": "non-finite features"}
    stats = embedding_stats(f_train[:STATS_IMAGES])
    if config.probe == "adam":
        fit = fit_linear_probe(
            f_train,
            y_train,
            f_test,
            y_test,
            epochs=config.probe_epochs,
            batch_size=config.probe_batch_size,
            seed=config.seed,
            device=config.device,
            standardize=config.probe_standardize,
        )
    else:
        from dynsim.readouts import readout_accuracy

        if config.probe_standardize:
            mean, std = f_train.mean(0), f_train.std(0).clamp_min(1e-6)
            f_train, f_test = (f_train - mean) / std, (f_test - mean) / std
        r = readout_accuracy(config.probe, f_train, y_train, f_test, y_test, device=config.device)
        fit = {"test_accuracy": r["accuracy"], "train_accuracy": r["train_accuracy"]}
    return {**fit, **stats}


STATS_IMAGES = 2000  # training images whose embedding gives the effective rank and scale


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
    if resume and not config.out:
        raise ConfigError(
            "--resume needs --out PATH: the result file of the run to continue "
            "(its checkpoint <out>.ckpt.pt lies beside it)"
        )
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
    history = _History(lr, config.rule)
    engine = ckpt = monitor = None
    if config.epochs > 0:  # build everything first, so bad settings fail before any work
        deform = Deform(
            flip=FLIP_DEFAULT.get(config.data, True) if config.flip is None else config.flip
        )
        inverses = None
        if config.rule == "dtp":
            inverses = build_inverses(encoder, shape, gen)
            for g in inverses.values():
                g.to(device)
        rules = make_rules(
            config.rule,
            encoder,
            lr=lr,
            generator=gen,
            inverses=inverses,
            dtp_noise=config.dtp_noise,
        )
        settler = ContrastiveSettler(
            encoder,
            shape,
            deform,
            tau=config.tau,
            delta=config.delta,
            negatives=config.negatives,
            grad_block=config.grad_block,
            wrap=config.negatives_wrap,
            views=config.views,
            propagation="target" if config.rule == "dtp" else "error",
            inverses=inverses,
            target_step=config.dtp_step,
            generator=gen,
        )
        passes = len(encoder.stages) if config.schedule == "rll" and config.rll_budget == "theirs" else 1
        per_epoch = passes * (n // config.batch_size)
        schedule = make_schedule(
            config.schedule,
            settler,
            rules,
            epochs=config.epochs,
            batches_per_epoch=per_epoch,
            generator=gen,
        )
        order_gen = torch.Generator().manual_seed(config.seed + 1)

        def batches(epoch: int):
            # RLL with the authors' budget: L passes per epoch, so each stage sees every image once
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


# ---------------------------------------------------------------- CLI: dynsim run ssl


def _negatives(text: str) -> int | None:
    return None if text in ("all", "none", "None") else int(text)


def _add_common_arguments(p: argparse.ArgumentParser) -> None:
    d = SSLConfig()
    p.add_argument("--data", choices=DATASETS, default=d.data, help="data set (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="folder of the dataset files (default: the data set's own)")
    p.add_argument("--n-train", type=int, default=None,
                   help="training images, a stratified subset (default: all)")
    p.add_argument("--n-test", type=int, default=None, help="test images, a stratified subset (default: all)")
    p.add_argument(
        "--arch",
        default=None,
        help="encoder spec, e.g. c32-a-p-c64-p (cN: 3x3 conv, dN: dense, p: 2x2 max-pool, a: activation after "
        "the layer before; no 'a' at all: after every layer), or a name: "
        + ", ".join(ARCHS) + " (default: per data set, " + ", ".join(f"{k}: {v}" for k, v in DEFAULT_ARCH.items())
        + ")",
    )
    p.add_argument("--act", choices=sorted(ACTIVATIONS), default=d.act,
                   help="activation, at the layers marked 'a' in --arch (default: %(default)s)")
    p.add_argument(
        "--negatives",
        type=_negatives,
        default=None,
        metavar="K",
        help="use the offset diagonals: pairs (i, i+k), k < K, i+k < B, negatives weighted 1/K (default: all)",
    )
    p.add_argument("--negatives-wrap", action="store_true",
                   help="with --negatives K, pairs (i, (i+k) mod B) instead (default: off, as the authors)")
    p.add_argument("--views", choices=VIEWS, default=d.views,
                   help="clean+deformed: the image and one deformed copy (the authors' CIFAR code); two: two "
                   "independent deformations (their STL-10 code) (default: %(default)s)")
    p.add_argument("--grad-block", action="store_true",
                   help="no error into the deformed branch (default: off)")
    p.add_argument("--tau", type=float, default=d.tau,
                   help="hinge threshold τ of positive pairs (default: %(default)s)")
    p.add_argument("--delta", type=float, default=d.delta, help="margin δ of negative pairs (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs,
                   help="epoch budget (default: %(default)s; 0: no training, the random-encoder baseline; "
                   "GLL shares them equally among the stages); training ends earlier at a loss plateau")
    p.add_argument("--plateau-tol", type=float, default=d.plateau_tol,
                   help="stop when the epoch loss fell by less than this fraction over --plateau-window epochs "
                   "(GLL: go to the next stage) (default: %(default)s; 0: train the whole budget)")
    p.add_argument("--plateau-window", type=int, default=d.plateau_window,
                   help="epochs over which the plateau is judged (default: %(default)s)")
    p.add_argument("--rll-budget", choices=RLL_BUDGETS, default=d.rll_budget,
                   help="RLL epoch: theirs = L passes over the data (each stage sees every image once), "
                   "shared = one pass shared among the L stages (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="images per batch, >= 2 (the other images are the negatives; default: %(default)s)")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate of every unit (default: the authors', 1e-4; RF 1e-5)")
    p.add_argument("--dtp-step", type=float, default=d.dtp_step, help="DTP top-target step η (default: %(default)s)")
    p.add_argument("--dtp-noise", type=float, default=d.dtp_noise,
                   help="DTP inverse-training noise σ (default: %(default)s)")
    p.add_argument("--probe", choices=PROBES, default=d.probe,
                   help="linear probe: adam = one linear layer, cross-entropy, Adam 1e-3 (the authors'); svc / ridge "
                   "= the exact readouts of dynsim.readouts (default: %(default)s)")
    p.add_argument("--probe-epochs", type=int, default=d.probe_epochs,
                   help="epochs of the adam probe on the frozen embedding (default: %(default)s)")
    p.add_argument("--probe-batch-size", type=int, default=d.probe_batch_size,
                   help="mini-batch of the adam probe (default: %(default)s)")
    p.add_argument("--probe-standardize", action="store_true",
                   help="standardise each feature before the probe (default: off, as the authors)")
    p.add_argument("--probe-every", type=int, default=d.probe_every,
                   help="probe accuracy and effective rank every K epochs during training (default: %(default)s; "
                   "0: only at the end)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of weights, order and augmentations (default: 0)")
    p.add_argument("--device", default=d.device, help="cpu or cuda (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")


def add_run_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``dynsim run ssl`` flags to ``parser``."""
    _add_common_arguments(parser)
    parser.add_argument("--schedule", choices=SCHEDULES, default="e2e",
                        help="learning schedule: end to end, greedy or random layer-wise (default: %(default)s)")
    parser.add_argument("--rule", choices=RULES, default="bp",
                        help="update rule: backprop, random or updated random feedback, target prop "
                        "(default: %(default)s)")
    parser.add_argument("--out", default=None,
                        help="result JSON (default: runs/ssl-<data>-<schedule>-<rule>-<time>.json)")
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        metavar="K",
        help="write <out>.ckpt.pt every K epochs and at the end (default: %(default)s; 0: never)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run whose result is --out from its checkpoint (same final numbers)",
    )
    return parser


def _config_from_args(args: argparse.Namespace, **override: Any) -> SSLConfig:
    fields = {f.name for f in dataclasses.fields(SSLConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values.update(override)
    return SSLConfig(**values)


def run_from_args(args: argparse.Namespace) -> dict:
    """Run ``dynsim run ssl`` from parsed arguments; writes the JSON and returns it.

    A diverged run writes its JSON and then raises :class:`DivergenceError` with the message.
    """
    config = _config_from_args(args)
    resume = getattr(args, "resume", False)
    if resume and not config.out:
        raise ConfigError(
            "--resume needs --out PATH: the result file of the run to continue "
            "(its checkpoint <out>.ckpt.pt lies beside it)"
        )
    if config.out is None:
        config.out = str(
            Path("runs") / f"ssl-{config.data}-{config.schedule}-{config.rule}-s{config.seed}.json"
        )
    result = run_ssl(
        config, checkpoint_every=getattr(args, "checkpoint_every", 1), resume=resume
    )
    if result["final"]["diverged"]:
        raise DivergenceError(result["final"]["divergence"])
    return result


# -------------------------------------------------------------- CLI: dynsim study ssl


def study_cells(base: SSLConfig, seeds: list[int] | None = None) -> list[dict]:
    """One cell (config dict plus ``name``) per row of :data:`STUDY_GRID` and seed
    (``seeds``; default: ``base.seed`` alone), seed by seed: every row's first seed runs
    before any row's second, so a study cut short still covers every row."""
    cells = []
    for seed in seeds or [base.seed]:
        for schedule, rule in STUDY_GRID:
            cfg = dataclasses.asdict(base)
            cfg.update(random_baseline=False, out=None, seed=seed)
            if schedule == "random":
                cfg.update(schedule="e2e", rule="bp", epochs=0)
            else:
                cfg.update(schedule=schedule, rule=rule)
            cells.append({"name": f"{schedule}-{rule}".replace("--", ""), **cfg})
    return cells


def run_study_cell(cell: dict) -> dict:
    """Run one study cell (top-level, so worker processes can pickle it)."""
    cfg = {k: v for k, v in cell.items() if k != "name"}
    result = run_ssl(SSLConfig(**cfg), progress=False)
    result["name"] = cell["name"]
    return result


def resolve_study_cell(cell: dict) -> dict:
    """A study cell's full :class:`SSLConfig` (every default filled in; hashed into its file)."""
    return {"name": cell["name"], **dataclasses.asdict(SSLConfig(**{k: v for k, v in cell.items() if k != "name"}))}


def study_rows(results: list[dict]) -> list[dict]:
    """Table rows (learning, update, accuracy % as mean and s.e. over the seeds of the row,
    published CIFAR %, seconds) from results, in the order rows first appear."""
    from dynsim.studies.seeds import mean_sem

    groups: dict[tuple, list] = {}
    for r in results:
        cfg = r["config"]
        key = ("random", "-") if cfg["epochs"] == 0 else (cfg["schedule"], cfg["rule"])
        groups.setdefault(key, []).append(r)
    rows = []
    for key, runs in groups.items():
        accs = [r["final"]["test_accuracy"] for r in runs]
        m, s = mean_sem(accs)
        pub = PUBLISHED_CIFAR.get(key, (None, None))
        losses = [r["history"][-1]["loss"] for r in runs if r["history"]]
        rows.append(
            {
                "learning": "random encoder" if key[0] == "random" else key[0].upper(),
                "update": key[1].upper() if key[1] != "-" else "",
                "accuracy": None if m is None else 100 * m,
                "accuracy_sem": None if s is None else 100 * s,
                "accuracy_per_seed": [None if a is None else 100 * a for a in accs],
                "seeds": [r["config"]["seed"] for r in runs],
                "published": pub[0],
                "published_block5": pub[1],
                "train_seconds": mean_sem([r["final"]["train_seconds"] for r in runs])[0],
                "final_loss": mean_sem(losses)[0] if losses else None,
            }
        )
    return rows


def study_table(rows: list[dict], header: str = "") -> str:
    """Markdown table of :func:`study_rows`."""

    def fmt(v, spec=".2f"):
        return "–" if v is None else format(v, spec)

    lines = [header] if header else []
    lines += [
        "| learning | update | ours: probe acc. (%) | final loss / image | train s "
        "| published CIFAR (%) | published +block, 5 neg. (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = fmt(r["accuracy"])
        if r.get("accuracy_sem") is not None:
            acc += f" ± {r['accuracy_sem']:.2f} ({len(r['seeds'])} seeds)"
        lines.append(
            f"| {r['learning']} | {r['update']} | {acc} | {fmt(r['final_loss'])} "
            f"| {fmt(r['train_seconds'], '.0f')} | {fmt(r['published'])} "
            f"| {fmt(r['published_block5'])} |"
        )
    return "\n".join(lines) + "\n"


def plot_study(rows: list[dict], ours: str = "ours"):
    """Bar plot of ours vs published CIFAR accuracy per row (from :func:`study_rows`).

    Takes data only and returns the matplotlib Figure (in dynsim's plot style); ``ours``
    labels our bars.
    """
    import matplotlib.pyplot as plt

    from dynsim.plots import STYLE

    with plt.rc_context(STYLE):
        return _plot_study(rows, ours)


def _plot_study(rows: list[dict], ours: str):
    import matplotlib.pyplot as plt

    labels = [f"{r['learning']} {r['update']}".strip() for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar([i - 0.2 for i in x], [r["accuracy"] or 0 for r in rows], 0.4, label=ours)
    ax.bar(
        [i + 0.2 for i in x], [r["published"] or 0 for r in rows], 0.4, label="published (CIFAR)"
    )
    ax.set_xticks(list(x), labels, rotation=30, ha="right")
    ax.set_ylabel("linear-probe test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower left", ncol=2, framealpha=0.9)
    fig.tight_layout()
    return fig


def add_study_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``dynsim study ssl`` flags (the run flags minus schedule/rule, plus workers,
    backend and Ray address)."""
    _add_common_arguments(parser)
    parser.add_argument("--workers", type=int, default=1, help="parallel cells (default: %(default)s)")
    parser.add_argument("--backend", default="local", choices=BACKENDS,
                        help="where cells run: local processes or Ray (default: %(default)s)")
    parser.add_argument(
        "--ray-address", default=None, help="Ray cluster address (implies --backend ray)"
    )
    parser.add_argument("--out", default=None, help="study folder (default: runs/ssl-study-<data>)")
    parser.add_argument("--seeds", default=None, metavar="LIST",
                        help="every row once per seed (e.g. 0,1,2): mean ± s.e. per row (default: --seed alone)")
    parser.add_argument("--format", default="text", choices=("text", "csv"),
                        help="the table printed at the end: Markdown text or CSV (default: %(default)s)")
    return parser


def check_study(base: SSLConfig, seeds: list[int] | None = None) -> list[dict]:
    """The study's cells (each row once per seed of ``seeds``), every one's settings checked
    (before the first one runs)."""
    if base.epochs == 0:
        raise ConfigError("study ssl with --epochs 0 trains nothing: every cell would be the random encoder; "
                          "give --epochs >= 3 (GLL shares them among the stages)")
    cells = study_cells(base, seeds)
    for cell in cells:
        SSLConfig(**{k: v for k, v in cell.items() if k != "name"}).validate()
    return cells


def run_study(
    base: SSLConfig,
    out_dir: Path,
    *,
    workers: int | None = 1,
    backend: str = "local",
    ray_address: str | None = None,
    progress: bool = True,
    seeds: list[int] | None = None,
) -> dict:
    """Run the Table-1 grid on ``base``'s data (each row once per seed of ``seeds``); write
    ``ssl_study.{md,json,png}`` in ``out_dir``.

    The cells run through :func:`dynsim.sweeps.run_grid` (one result file per cell under
    ``out_dir/cells``, reused when the same command runs again; ``backend="ray"`` or a
    ``ray_address`` sends the cells to Ray).
    """
    out_dir = Path(out_dir)
    cells = check_study(base, seeds)
    results = run_grid(
        cells,
        run_study_cell,
        results_dir=out_dir / "cells",
        workers=workers,
        backend=backend,
        ray_address=ray_address,
        progress=progress,
        resolve=resolve_study_cell,
    )
    order = {c["name"]: i for i, c in enumerate(cells)}
    results = sorted(results, key=lambda r: order.get(r.get("name"), 0))
    rows = study_rows(results)
    ds = results[0]["dataset"]
    neg = "all" if base.negatives is None else base.negatives
    header = (
        f"SSL study on {ds['name']}: {ds['n_train']} train / {ds['n_test']} test images, "
        f"encoder {results[0]['encoder']['spec']}, {base.epochs} epochs (GLL: shared equally "
        f"among stages; training ends at a loss plateau: < {base.plateau_tol:g} relative decrease over "
        f"{base.plateau_window} epochs), batch {base.batch_size}, Adam lr "
        f"{'1e-4 (RF 1e-5, the authors)' if base.lr is None else base.lr}, tau {base.tau}, "
        f"delta {base.delta}, negatives {neg}, grad block {base.grad_block}, "
        f"views {base.views}, probe {base.probe} ({base.probe_epochs} epochs"
        f"{', standardised' if base.probe_standardize else ''}), "
        + (f"seed {base.seed} (one seed).\n" if not seeds or len(seeds) == 1 else
           f"mean ± s.e. over seeds {', '.join(map(str, seeds))}.\n")
    )
    table = study_table(rows, header)
    summary = {
        **result_header("study ssl", base),
        "dataset": ds,
        "rows": rows,
    }
    # the table, the JSON and the plot as one set (the JSON last)
    write_result(out_dir / "ssl_study.json", summary, {"plot": ("", plot_study(rows, ours=f"ours ({ds['name']})"))},
                 extra={"table": (out_dir / "ssl_study.md", table)})
    summary["table"] = table
    return summary


def study_from_args(args: argparse.Namespace) -> dict:
    """Run ``dynsim study ssl`` from parsed arguments."""
    from dynsim.studies.seeds import parse_seeds

    base = _config_from_args(args, out=None)
    out_dir = Path(args.out or f"runs/ssl-study-{base.data}")
    seeds = None if getattr(args, "seeds", None) is None else parse_seeds(args.seeds)
    return run_study(
        base,
        out_dir,
        workers=args.workers,
        backend=args.backend,
        ray_address=args.ray_address,
        seeds=seeds,
    )


if __name__ == "__main__":  # pragma: no cover
    # older commands: ``python -m dynsim.pipelines.ssl run|study ...`` = ``dynsim run|study ssl ...``
    import sys

    from dynsim.cli import main

    sys.exit(main([*sys.argv[1:2], "ssl", *sys.argv[2:]]))
