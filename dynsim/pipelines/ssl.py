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
from dynsim.ssl.stages import ACTIVATIONS, build_encoder, parse_spec

DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10", "cifar100", "stl10")
DEFAULT_ARCH = {
    "digits": "tiny",
    "mnist": "small",
    "fashion-mnist": "small",
    "cifar10": "cifar",
    "cifar100": "cifar",
    "stl10": "vgg6",
}
FLIP_DEFAULT = {"digits": False, "mnist": False}  # flips make no sense for digits


@dataclass
class SSLConfig:
    """Settings of one SSL run (all keyword, all typed; see ``dynsim run ssl --help``).

    ``epochs = 0`` gives the random-encoder baseline (no training). For GLL the epochs are
    shared equally among the stages. The hinge loss is summed over pairs (SSL.md); the
    history reports it per image. ``lr`` applies to every rule.
    """

    data: str = "digits"
    data_dir: str | None = None
    n_train: int | None = None
    n_test: int | None = None
    schedule: str = "e2e"
    rule: str = "bp"
    arch: str | None = None
    act: str = "relu"
    negatives: int | None = None
    grad_block: bool = False
    tau: float = 6.0
    delta: float = 3.0
    head_dim: int = 64
    head_pool: int = 2
    epochs: int = 10
    batch_size: int = 250
    lr: float = 1e-3
    dtp_step: float = 0.1
    dtp_noise: float = 0.1
    flip: bool | None = None
    probe_epochs: int = 30
    probe_batch_size: int = 256
    random_baseline: bool = True
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    out: str | None = None

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
        check_ranges(self, command="ssl")  # one range per setting across commands (dynsim.settings)
        for name in ("grad_block", "random_baseline"):
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
        for name in ("lr", "dtp_step"):
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
    "epochs", "probe_epochs", "probe_batch_size", "random_baseline", "device", "threads", "out",
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
    f_train, f_test = encoder.embed(x_train), encoder.embed(x_test)
    if not (torch.isfinite(f_train).all() and torch.isfinite(f_test).all()):
        return {"test_accuracy": None, "train_accuracy": None, "note": "non-finite features"}
    return fit_linear_probe(
        f_train,
        y_train,
        f_test,
        y_test,
        epochs=config.probe_epochs,
        batch_size=config.probe_batch_size,
        seed=config.seed,
        device=config.device,
    )


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
    history = _History(config.lr, config.rule)
    engine = ckpt = None
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
            lr=config.lr,
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
            propagation="target" if config.rule == "dtp" else "error",
            inverses=inverses,
            target_step=config.dtp_step,
            generator=gen,
        )
        per_epoch = n // config.batch_size
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
            perm = torch.randperm(n, generator=order_gen)[: per_epoch * config.batch_size]
            for k, idx in enumerate(perm.split(config.batch_size)):
                yield Batch(
                    x=x_train[idx].flatten(1), y=y_train[idx], index=idx, epoch=epoch, number=k
                )

        callbacks: list[Callback] = [schedule, *rules, history]
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
    random_acc = None
    if config.random_baseline or config.epochs == 0:
        t0 = time.perf_counter()
        random_acc = _probe(encoder, x_train, y_train, x_test, y_test, config)["test_accuracy"]
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
        probe = {"test_accuracy": random_acc, "train_accuracy": None}
    elif divergence is not None:
        probe = {"test_accuracy": None, "train_accuracy": None}
    else:
        probe = _probe(encoder, x_train, y_train, x_test, y_test, config)
    t_eval += time.perf_counter() - t0
    result["history"] = history.rows
    result["final"] = {
        "test_accuracy": probe["test_accuracy"],
        "train_accuracy": probe.get("train_accuracy"),
        "random_encoder_accuracy": random_acc,
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
        write_result(Path(config.out), result)
    return result
