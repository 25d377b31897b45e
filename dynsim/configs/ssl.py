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
from dynsim.ssl.signals import VIEWS
from dynsim.ssl.stages import ACTIVATIONS, ARCHS, parse_spec

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
    among the stages and a plateau ends a stage. The hinge loss ``Σ_ij [δ − y_ij (τ − d_ij)]₊``
    is summed over pairs (Tang et al. 2022); the history reports it per image. ``lr = None`` is
    the authors' (1e-4; RF 1e-5). The defaults are the authors' (:data:`AUTHORS`); every
    difference is listed in the result's ``departures``.
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
    arch: str | None = setting(None, help="encoder spec, e.g. c32-a-p-c64-p (cN: 3x3 conv, dN: dense, p: 2x2 "
                               "max-pool, a: the activation after the layer before; no 'a' at all: after every "
                               "layer), or a name: " + ", ".join(ARCHS),
                               shown_default="per data set, " + ", ".join(f"{k}: {v}" for k, v in DEFAULT_ARCH.items()))
    act: str = setting("hardtanh", choices=tuple(sorted(ACTIVATIONS)),
                       help="activation, at the layers marked 'a' in --arch")
    negatives: int | None = setting(None, metavar="K", help="use the offset diagonals: pairs (i, i+k), k < K, "
                                    "i+k < B, negatives weighted 1/K ('all': every other image)")
    negatives_wrap: bool = setting(False, help="with --negatives K, pairs (i, (i+k) mod B) instead (default: off, "
                                   "as the authors)")
    grad_block: bool = setting(False, help="no error into the deformed branch (default: off)")
    views: str = setting("clean+deformed", choices=VIEWS, help="clean+deformed: the image and one deformed copy "
                         "(the authors' CIFAR code); two: two independent deformations (their STL-10 code)")
    tau: float = setting(6.0, help="hinge threshold τ of positive pairs")
    delta: float = setting(3.0, help="margin δ of negative pairs")
    head_dim: int = setting(64, help="width of each stage's linear loss head")
    head_pool: int = setting(2, help="side of the average-pooled map the loss head sees")
    epochs: int = setting(200, help="epoch budget (0: no training, the random-encoder baseline; GLL shares them "
                          "equally among the stages); training ends earlier at a loss plateau")
    plateau_tol: float = setting(0.01, help="stop when the epoch loss fell by less than this fraction over "
                                 "--plateau-window epochs (GLL: go to the next stage; 0: train the whole budget)")
    plateau_window: int = setting(5, help="epochs over which the plateau is judged")
    batch_size: int = setting(500, help="images per batch, >= 2 (the other images are the negatives)")
    lr: float | None = setting(None, help="Adam learning rate of every unit",
                               shown_default="the authors', 1e-4; RF 1e-5")
    rll_budget: str = setting("theirs", choices=RLL_BUDGETS, help="RLL epoch: theirs = L passes over the data "
                              "(each stage sees every image once), shared = one pass shared among the L stages")
    dtp_step: float = setting(0.1, help="DTP top-target step η")
    dtp_noise: float = setting(0.1, help="DTP inverse-training noise σ")
    flip: bool | None = setting(None, cli=False, help="horizontal flips among the deformations (None: the data "
                                "set's default; config files only)")
    probe: str = setting("adam", choices=PROBES, help="linear probe: adam = one linear layer, cross-entropy, Adam "
                         "1e-3 (the authors'); svc / ridge = the exact readouts of dynsim.readouts")
    probe_epochs: int = setting(400, help="epochs of the adam probe on the frozen embedding")
    probe_batch_size: int = setting(500, help="mini-batch of the adam probe")
    probe_standardize: bool = setting(False, help="standardise each feature before the probe (default: off, as "
                                      "the authors)")
    probe_every: int = setting(5, help="probe accuracy and effective rank every K epochs during training (0: only "
                               "at the end)")
    random_baseline: bool = setting(True, help="skip the random-encoder probe before training (default: run it)")
    seed: int = setting(0, help="seed of weights, order and augmentations")
    device: str = setting("cpu", help="cpu or cuda")
    threads: int | None = setting(1, help="torch threads ('none': torch's default)")
    out: str | None = setting(None, help="result JSON", shown_default="runs/ssl-<data>-<learning>-<rule>-<time>.json")

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
        check_settings(self, command="ssl")  # each value against its description (choices, range)
        for name in ("grad_block", "random_baseline", "negatives_wrap", "probe_standardize"):
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
