"""The settings of an SSL run (``dynsim run ssl``, ``dynsim study ssl``): :class:`SSLConfig`.

Tang, Yang & Amit (2022), "Biologically plausible training mechanisms for self-supervised
learning in deep networks": learning schedules E2E / GLL / RLL, update rules BP / RF / URF /
DTP, the contrastive hinge loss with threshold τ and margin δ.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from dynsim.errors import ConfigError
from dynsim.settings import check_settings, setting
from dynsim.ssl.loss import check_hinge_settings
from dynsim.ssl.rules import RULES
from dynsim.ssl.schedules import SCHEDULES
from dynsim.ssl.stages import ACTIVATIONS, parse_spec

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
    shared equally among the stages. The hinge loss ``Σ_ij [δ − y_ij (τ − d_ij)]₊`` is summed
    over pairs (Tang et al. 2022); the history reports it per image. ``lr`` applies to every rule.
    """

    data: str = setting("digits", choices=DATASETS, help="data set")
    data_dir: str | None = setting(None, help="folder of the dataset files", shown_default="the data set's own")
    n_train: int | None = setting(None, help="training images, a stratified subset ('all': all)")
    n_test: int | None = setting(None, help="test images, a stratified subset ('all': all)")
    schedule: str = setting("e2e", choices=SCHEDULES, flag="--learning", deprecated=("--schedule",),
                            help="learning schedule: end to end, greedy or random layer-wise (Python and result "
                            "files: 'schedule')")
    rule: str = setting("bp", choices=RULES, help="update rule: backprop, random or updated random feedback, "
                        "target propagation")
    arch: str | None = setting(None, help="encoder spec, e.g. c32-p-c64-p (cN: 3x3 conv, dN: dense, p: 2x2 "
                               "max-pool), or a name: cifar, vgg6, small, tiny",
                               shown_default="per data set, " + ", ".join(f"{k}: {v}" for k, v in DEFAULT_ARCH.items()))
    act: str = setting("relu", choices=tuple(sorted(ACTIVATIONS)), help="activation")
    negatives: int | None = setting(None, metavar="K", help="use pairs (i, i+k), k < K, negatives weighted 1/K "
                                    "('all': every other image)")
    grad_block: bool = setting(False, help="no error into the deformed branch (default: off)")
    tau: float = setting(6.0, help="hinge threshold τ of positive pairs")
    delta: float = setting(3.0, help="margin δ of negative pairs")
    head_dim: int = setting(64, help="width of each stage's linear loss head")
    head_pool: int = setting(2, help="side of the average-pooled map the loss head sees")
    epochs: int = setting(10, help="training epochs (0: no training, the random-encoder baseline; GLL shares them "
                          "equally among the stages)")
    batch_size: int = setting(250, help="images per batch, >= 2 (the other images are the negatives)")
    lr: float = setting(1e-3, help="Adam learning rate of every rule")
    dtp_step: float = setting(0.1, help="DTP top-target step η")
    dtp_noise: float = setting(0.1, help="DTP inverse-training noise σ")
    flip: bool | None = setting(None, cli=False, help="horizontal flips among the deformations (None: the data "
                                "set's default; config files only)")
    probe_epochs: int = setting(30, help="epochs of the linear probe on the frozen embedding")
    probe_batch_size: int = setting(256, help="batch size of the linear probe")
    random_baseline: bool = setting(True, help="skip the random-encoder probe before training (default: run it)")
    seed: int = setting(0, help="seed of weights, order and augmentations")
    device: str = setting("cpu", help="cpu or cuda")
    threads: int | None = setting(1, help="torch threads ('none': torch's default)")
    out: str | None = setting(None, help="result JSON", shown_default="runs/ssl-<data>-<learning>-<rule>-<time>.json")

    def validate(self) -> SSLConfig:
        """Raise :class:`ConfigError` naming the first bad value; return ``self``."""
        check_settings(self, command="ssl")  # each value against its description (choices, range)
        for name in ("grad_block", "random_baseline"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.flip is not None and not isinstance(self.flip, bool):
            raise ConfigError(f"flip must be true, false or None (the data set's default), got {self.flip!r}")
        layers = parse_spec(self.arch or DEFAULT_ARCH[self.data])
        if self.schedule == "gll" and 0 < self.epochs < len(layers):
            raise ConfigError(f"GLL (--learning gll) with {len(layers)} stages needs --epochs >= {len(layers)} "
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
