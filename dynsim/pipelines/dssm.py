"""The similarity-matching (DSSM) experiment of DESIGN §2, end to end.

``run_dssm(DSSMConfig(...))`` loads data, builds a structured :class:`HebbianLayer`, and
trains it online on the event loop: each epoch draws ``images_per_epoch`` training images
with replacement, every image settles (Euler with the seed's step schedule by default,
stopping per sample at ``‖du/ds‖/‖u‖ < T`` or the cap), then the Hebbian/anti-Hebbian
rule updates ``W`` and ``L``. Every ``eval_every`` epochs the representations of all train
and test images are read out linearly. The result dict follows DESIGN §4.
With ``layers > 1`` the system is a :class:`~dynsim.systems.deep.DeepHebbianNet` (per-layer
structure lists, feedback ``gamma``) and each layer's representation is read out
separately (``final.layer_test_accuracy``); see ``docs/deep.md``.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynsim.checkpoint import Checkpoint, checkpoint_path
from dynsim.engine import DynamicsSettler, Engine, EpochDraws
from dynsim.errors import ConfigError, DivergenceError
from dynsim.evaluation import READOUTS, Evaluator, readout_accuracy
from dynsim.layer_monitor import LayerMonitor
from dynsim.monitors import SettlingMonitor
from dynsim.plasticity import BATCH_RULES, DecayingRate, SimilarityMatchingRule
from dynsim.plasticity.deep import LATERAL_RULES, DeepSimilarityMatchingRule
from dynsim.readouts import paired_difference
from dynsim.results import result_header
from dynsim.settings import check_ranges
from dynsim.solvers import parse_schedule, parse_solver_spec, solver_from_spec
from dynsim.stopping import Status, stop_rule
from dynsim.streaming import SwitchMonitor
from dynsim.systems import ACTIVATIONS, HebbianLayer
from dynsim.systems.deep import LAYER_STOPS, DeepHebbianNet, LayerSpec

# receptive-field geometry per image size when the user gives none: (stride, radius)
DEFAULT_GEOMETRY = {
    (8, 8): (2, 3.0),  # digits: 4x4 sites, 32-pixel discs (half the image; digits are ~4x coarser)
    (28, 28): (2, 4.0),  # MNIST-like: DESIGN §2, 14x14 sites, 52-pixel discs
    (32, 32): (2, 4.0),
}
DEEP_GEOMETRY = (1, 2.0)  # (stride, radius) of layers above the first, in sites of the layer below


@dataclass
class DSSMConfig:
    """Every setting of a DSSM run. Defaults follow DESIGN §2 (Obeid et al. 2019)."""

    data: str = "digits"
    data_dir: str | None = None
    nps: int | list[int] = 4
    stride: int | list[int] | None = None
    radius: float | list[float] | None = None
    lateral_distance: float | list[float] = 0.0
    layers: int = 1  # > 1: DeepHebbianNet; nps/stride/radius/lateral_distance may be per-layer lists
    gamma: float = 0.0  # feedback strength of the deep network
    lateral_rule: str = "code"  # deep: where 1/(1+γ) enters hidden lateral updates (plasticity/deep.py)
    gains: float | list[float] = 1.0  # deep: g_p in r_p = f(g_p u_p), the authors' tanh_factors
    mult_factors: float | list[float] = 1.0  # deep: W_p r_{p-1}/m_p, γ m_{p+1} W_{p+1}ᵀ r_{p+1} (authors' mult_factors)
    layer_stop: str = "each"  # deep: stop when every layer's residual < T (authors) or the whole state's ("state")
    lateral_sign: int = -1
    activation: str = "tanh"
    tau: float = 1.0
    solver: str = "auto"  # newton where it applies (see resolved_solver), else euler
    schedule: str = "seed"
    threshold: float | None = 1e-4
    max_steps: int | None = 3000
    residual: str = "field"
    stream_every: int | None = None
    stream_carry: str = "u"  # what streaming carries: the state u, or the rates r with u restarted (the report)
    epochs: int = 120
    images_per_epoch: int = 1000
    batch_size: int = 1
    batch_rule: str = "sum"
    eta0: float = 5e-3
    eta_decay: float = 0.5
    eta_min: float = 1e-4
    eval_every: int = 15
    eval_solver: str | None = None  # settle the evaluation sets with another solver (same stop rule); None: same
    readout: str = "svc"
    eval_batch_size: int = 1000
    eval_train_size: int | None = None
    eval_test_size: int | None = None
    seed: int = 0
    device: str = "cpu"
    threads: int | None = 1
    on_divergence: str = "raise"
    checkpoint_every: int = 1
    out: str | None = None
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> DSSMConfig:
        """Raise :class:`ConfigError` naming the first bad value and the fix."""
        from dynsim.data import DATASETS

        def positive_int(name: str, allow_none: bool = False, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            low = 0 if allow_zero else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {v!r}")

        if self.data not in DATASETS:
            raise ConfigError(f"unknown data set {self.data!r}; choose one of {', '.join(DATASETS)}")
        # one range per setting across commands (dynsim.settings); per-layer ones below
        check_ranges(self, skip=("nps", "stride", "radius", "lateral_distance"))
        for name in ("epochs", "images_per_epoch", "batch_size", "eval_batch_size", "layers"):
            positive_int(name)
        for name in ("eval_train_size", "eval_test_size", "stream_every", "threads"):
            positive_int(name, allow_none=True)
        self.layer_structure()
        check_layer_memory(self)
        positive_int("max_steps", allow_none=True)
        positive_int("eval_every", allow_zero=True)
        positive_int("checkpoint_every", allow_zero=True)
        positive_int("seed", allow_zero=True)
        for name in ("eval_train_size", "eval_test_size"):
            if getattr(self, name) == 1:
                raise ConfigError(f"--{name.replace('_', '-')} 1 leaves one sample, too few for a readout; "
                                  "give at least one sample per class (e.g. 100) or 'none' for all")
        for name in ("tau", "eta0", "eta_decay", "eta_min"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"--{name.replace('_', '-')} must be a number, got {v!r}")
        if not (np.isfinite(self.tau) and self.tau > 0):
            raise ConfigError(f"tau must be a finite time constant > 0 (e.g. 1.0), got {self.tau!r}")
        for name in ("data", "solver", "schedule", "activation", "device", "readout"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"--{name.replace('_', '-')} must be a string, got {getattr(self, name)!r}")
        if self.threshold is not None and (isinstance(self.threshold, bool)
                                           or not isinstance(self.threshold, (int, float))):
            raise ConfigError(f"--threshold must be a number (e.g. 1e-4) or 'none', got {self.threshold!r}")
        if not isinstance(self.extra, dict):
            raise ConfigError(f"extra must be a table/dict, got {self.extra!r}")
        if self.out is not None:
            if not isinstance(self.out, str) or not self.out:
                raise ConfigError(f"--out must be a file path, got {self.out!r}")
            if Path(self.out).is_dir():
                raise ConfigError(f"--out {self.out} is a directory; give a file name such as {self.out}/run.json")
        if self.threshold is not None and not (np.isfinite(self.threshold) and self.threshold > 0):
            raise ConfigError(f"--threshold must be > 0 (e.g. 1e-4), got {self.threshold!r}")
        if self.threshold is None and self.max_steps is None:
            raise ConfigError("give --threshold, --max-steps or both; settling would never stop")
        if self.lateral_rule not in LATERAL_RULES:
            raise ConfigError(f"--lateral-rule must be one of {', '.join(LATERAL_RULES)}, got {self.lateral_rule!r}")
        if not (isinstance(self.gamma, (int, float)) and np.isfinite(self.gamma) and self.gamma >= 0):
            raise ConfigError(f"--gamma (feedback strength) must be a number >= 0, got {self.gamma!r}")
        for name in ("gains", "mult_factors"):
            flag = "--" + name.replace("_", "-")
            for v in self.per_layer(name):
                if isinstance(v, bool) or not (isinstance(v, (int, float)) and np.isfinite(v) and v > 0):
                    raise ConfigError(f"{flag} must be finite numbers > 0 (default 1, the authors'), got {v!r}")
            if self.layers == 1 and any(v != 1 for v in self.per_layer(name)):
                raise ConfigError(f"{flag} applies to deep networks only (--layers > 1); drop it for one layer")
        if self.layer_stop not in LAYER_STOPS:
            raise ConfigError(f"--layer-stop must be one of {', '.join(LAYER_STOPS)}, got {self.layer_stop!r}")
        if self.lateral_sign not in (-1, 1):
            raise ConfigError(f"--lateral-sign must be -1 or +1, got {self.lateral_sign!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"--activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.residual not in ("field", "increment"):
            raise ConfigError(f"--residual must be 'field' or 'increment', got {self.residual!r}")
        if self.batch_rule not in BATCH_RULES:
            raise ConfigError(f"--batch-rule must be one of {', '.join(BATCH_RULES)}, got {self.batch_rule!r}")
        if self.readout == "probe":
            raise ConfigError("--readout probe (an unconverged L-BFGS fit) was removed: --readout svc solves "
                              "LinearSVC's problem exactly and faster; --readout ridge is the cheap exact one")
        if self.readout not in READOUTS:
            raise ConfigError(f"--readout must be one of {', '.join(READOUTS)}, got {self.readout!r}")
        from dynsim.engine import STREAM_CARRIES

        if self.stream_carry not in STREAM_CARRIES:
            raise ConfigError(f"--stream-carry must be one of {', '.join(STREAM_CARRIES)}, got {self.stream_carry!r}")
        if self.stream_carry == "r" and self.stream_every is not None and not self.resolved_solver().startswith(
                ("euler", "heun", "rk4")):
            raise ConfigError("--stream-carry r restarts u at 0 with one Euler step; it needs a fixed-step "
                              f"--solver such as euler, not {self.resolved_solver()!r}")
        if self.on_divergence not in ("raise", "skip"):
            raise ConfigError(f"--on-divergence must be 'raise' or 'skip', got {self.on_divergence!r}")
        for name in ("eta0", "eta_decay", "eta_min"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v >= 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number >= 0 "
                                  f"(default {getattr(DSSMConfig, name)}), got {v!r}")
        if self.batch_rule == "sum" and self.eta0 * self.batch_size >= 1.0:
            raise ConfigError(
                f"with --batch-rule sum the first update shrinks W by (1 − η·B) = "
                f"{1 - self.eta0 * self.batch_size:.3g} ≤ 0 (η = {self.eta0}, B = {self.batch_size}): "
                "use a smaller --batch-size, a smaller --eta0, or --batch-rule mean"
            )
        try:
            parse_schedule(self.schedule)
        except ConfigError as exc:
            raise ConfigError(f"--schedule {self.schedule!r}: {exc}") from None
        solver_from_spec(self.resolved_solver(), schedule=self.schedule)
        if self.eval_solver is not None:
            if not isinstance(self.eval_solver, str):
                raise ConfigError(f"--eval-solver must be a solver spec such as newton, got {self.eval_solver!r}")
            solver_from_spec(self.eval_solver, schedule=self.schedule)
        try:
            torch.device(self.device)
        except (RuntimeError, ValueError):
            raise ConfigError(f"--device {self.device!r} is not a torch device; use cpu or cuda") from None
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {self.device}: CUDA is not available on this machine; use --device cpu")
        check_geometry(self)  # last: builds the structure, after every cheaper check has passed
        return self

    def per_layer(self, name: str) -> list:
        """Setting ``name`` as one value per layer (a single value is used for every layer)."""
        value = getattr(self, name)
        values = list(value) if isinstance(value, (list, tuple)) else [value] * self.layers
        if len(values) != self.layers:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(
                f"{flag} has {len(values)} values for {self.layers} layer(s); give one value or {self.layers}"
            )
        return values

    def layer_structure(self) -> list[dict[str, Any]]:
        """Per-layer ``nps``, ``stride``, ``radius``, ``lateral_distance`` (None: geometry default)."""
        out = []
        names = ("nps", "stride", "radius", "lateral_distance")
        for p, vals in enumerate(zip(*(self.per_layer(n) for n in names), strict=True)):
            spec = dict(zip(names, vals, strict=True))
            where = f" (layer {p + 1})" if self.layers > 1 else ""
            for n in ("nps", "stride"):
                v = spec[n]
                if v is None and n == "stride":
                    continue
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise ConfigError(f"--{n} must be an integer >= 1{where}, got {v!r}")
            r = spec["radius"]
            if r is not None and not (isinstance(r, (int, float)) and np.isfinite(r) and r > 0):
                raise ConfigError(f"--radius must be > 0 pixels{where}, got {r!r}")
            d = spec["lateral_distance"]
            if isinstance(d, bool) or not (isinstance(d, (int, float)) and np.isfinite(d) and d >= 0):
                raise ConfigError(f"--lateral-distance must be a finite number >= 0 (0: same site){where}, got {d!r}")
            out.append(spec)
        return out

    def resolved_solver(self) -> str:
        """The solver spec that runs. ``"auto"`` (the default) is ``"newton"`` (``"block"`` for a deep
        network: Gauss–Seidel over layers, per-site Newton inside each) — the per-site
        Newton solver, which reaches the same field-residual tolerance in 3–6 steps where
        the seed's Euler schedule needs hundreds (measured, benchmarks/README.md) — for a
        single layer with lateral distance 0, a field residual, a threshold, no streaming
        and the seed schedule; otherwise ``"euler"`` (the seed's method, e.g. when the
        residual is Euler's increment or settling is a fixed number of Euler steps)."""
        if self.solver != "auto":
            return self.solver
        newton = (
            all(d == 0 for d in self.per_layer("lateral_distance"))
            and self.activation in ACTIVATIONS
            and self.residual == "field"
            and self.threshold is not None
            and self.stream_every is None
            and self.schedule == "seed"
        )
        if not newton:
            return "euler"
        # deep: block Gauss–Seidel over layers with per-site Newton (benchmarks/deep_settle.py)
        return "newton" if self.layers == 1 else "block"

    def solver_options(self) -> dict[str, Any]:
        """Options of ``solver`` (a spec such as ``"anderson,beta=0.2"``); fixed-step
        solvers get ``schedule`` unless the spec names one."""
        return parse_solver_spec(self.resolved_solver(), schedule=self.schedule)[1]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DSSMConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown DSSM setting(s): {', '.join(unknown)}")
        return cls(**values)


# settings that may change when a run is resumed (they do not shape the training trajectory);
# every other DSSMConfig field, including ones added later, must match the checkpoint
RESUME_MAY_CHANGE = (
    "epochs", "eval_every", "eval_solver", "readout", "eval_batch_size", "eval_train_size", "eval_test_size", "device",
    "threads", "on_divergence", "checkpoint_every", "out", "progress",
)


def training_settings(config: DSSMConfig) -> dict[str, Any]:
    """The settings a checkpoint must match to be resumed."""
    return {f.name: getattr(config, f.name) for f in fields(config) if f.name not in RESUME_MAY_CHANGE}


def check_layer_memory(config: DSSMConfig) -> None:
    """Refuse a network whose weights alone would not fit in this machine's memory, saying how
    much they would need (before any data is loaded). Estimate per layer: sites × NpS ×
    (fan-in × channels + NpS × lateral sites) weights, float32, ×3 for masks and updates."""
    from dynsim.data import IMAGE_SHAPES
    from dynsim.settings import check_memory

    c, h, w = IMAGE_SHAPES.get(config.data, (1, 28, 28))
    stride0, radius0 = DEFAULT_GEOMETRY.get((h, w), (2, 4.0))
    need = 0.0
    for p, spec in enumerate(config.layer_structure()):
        stride = spec["stride"] or (stride0 if p == 0 else DEEP_GEOMETRY[0])
        radius = spec["radius"] or (radius0 if p == 0 else DEEP_GEOMETRY[1])
        sites_h, sites_w = max(h // stride, 1), max(w // stride, 1)
        fan_in = min(math.pi * (radius + 1) ** 2, h * w) * c
        lateral_sites = min(math.pi * (spec["lateral_distance"] + 1) ** 2, sites_h * sites_w)
        need += 4 * 3 * sites_h * sites_w * spec["nps"] * (fan_in + spec["nps"] * lateral_sites)
        c, h, w = spec["nps"], sites_h, sites_w
    nps = config.nps if isinstance(config.nps, int) else ",".join(map(str, config.nps))
    check_memory(need, f"a network with --nps {nps} on {config.data}",
                 "use a smaller --nps (or --radius / --lateral-distance)")


def check_geometry(config: DSSMConfig) -> None:
    """Build the network's structure on the data set's image shape (known before loading), so
    that a stride or radius that leaves sites without inputs is refused before any data is
    loaded or any kernel compiled (the structure raises :class:`ConfigError` naming it)."""
    from dynsim.data import IMAGE_SHAPES

    if config.data in IMAGE_SHAPES:
        build_system(config, IMAGE_SHAPES[config.data])


def prepare_data(config: DSSMConfig):
    """Load the data set and apply the DSSM preprocessing (per-image mean removed)."""
    from dynsim.data import center_per_image, check_images, load_dataset

    ds = load_dataset(config.data, config.data_dir)
    x_train = center_per_image(check_images(ds.x_train, ds.n_features, name="x_train"))
    x_test = center_per_image(check_images(ds.x_test, ds.n_features, name="x_test"))
    return ds, x_train, x_test


def build_system(config: DSSMConfig, image_shape: tuple[int, int, int]) -> HebbianLayer | DeepHebbianNet:
    """``build_layer`` for one layer; a :class:`DeepHebbianNet` for ``config.layers > 1``.

    Layers above the first default to stride 1 and radius 2 (in sites of the layer below).
    """
    if config.layers == 1:
        return build_layer(config, image_shape)
    stride, radius = DEFAULT_GEOMETRY.get(tuple(image_shape[1:]), (2, 4.0))
    specs = [
        LayerSpec(
            nps=s["nps"],
            stride=s["stride"] or (stride if p == 0 else DEEP_GEOMETRY[0]),
            radius=s["radius"] or (radius if p == 0 else DEEP_GEOMETRY[1]),
            lateral_distance=s["lateral_distance"],
        )
        for p, s in enumerate(config.layer_structure())
    ]
    return DeepHebbianNet(
        image_shape,
        specs,
        gamma=config.gamma,
        gains=config.per_layer("gains"),
        mult_factors=config.per_layer("mult_factors"),
        layer_stop=config.layer_stop,
        lateral_sign=config.lateral_sign,
        activation=config.activation,
        tau=config.tau,
        seed=config.seed,
    )


def describe_system(system: HebbianLayer | DeepHebbianNet) -> dict[str, Any]:
    """Structure summary for the result file (per layer for a deep network)."""
    if isinstance(system, DeepHebbianNet):
        return {"n_neurons": system.state_size, "gamma": system.gamma, "layer_stop": system.layer_stop,
                "layers": system.describe()}
    return {
        "n_neurons": system.state_size,
        "n_sites": system.n_sites,
        "stride": system.stride,
        "radius": system.radius,
        "mean_fan_in": system.mean_fan_in,
        "ff_nonzeros": system.ff.nnz,
        "lateral_nonzeros": system.lateral.nnz,
    }


def build_layer(config: DSSMConfig, image_shape: tuple[int, int, int]) -> HebbianLayer:
    """The structured layer for ``image_shape``, geometry from the config or the defaults."""
    stride, radius = DEFAULT_GEOMETRY.get(tuple(image_shape[1:]), (2, 4.0))
    spec = config.layer_structure()[0]
    return HebbianLayer(
        image_shape,
        nps=spec["nps"],
        stride=spec["stride"] or stride,
        radius=spec["radius"] or radius,
        lateral_distance=spec["lateral_distance"],
        lateral_sign=config.lateral_sign,
        activation=config.activation,
        tau=config.tau,
        seed=config.seed,
    )


def epoch_batches(x: torch.Tensor, *, images: int, batch_size: int, seed: int) -> EpochDraws:
    """``batches(epoch)``: ``images`` draws with replacement per epoch, seeded by (seed, epoch)."""
    return EpochDraws(x, images=images, batch_size=batch_size, seed=seed)


def _subset(x: np.ndarray, y: np.ndarray, n: int | None, seed: int):
    if n is None or n >= len(x):
        return x, y
    idx = np.sort(np.random.default_rng(seed).choice(len(x), size=n, replace=False))
    return x[idx], y[idx]


def run_dssm(config: DSSMConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train and evaluate a DSSM network; write the result JSON and plots if ``config.out``.

    With ``config.out`` and ``checkpoint_every > 0`` a checkpoint ``<out>.ckpt.pt`` is written
    every ``checkpoint_every`` epochs and at the end; ``resume=True`` continues from it
    (same final numbers as an uninterrupted run).
    """
    config.validate()
    if resume and not config.out:
        raise ConfigError("--resume needs --out PATH: the result file of the run to continue "
                          "(its checkpoint lies beside it)")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    t_start = time.perf_counter()
    ds, x_train, x_test = prepare_data(config)
    y_train, y_test = ds.y_train, ds.y_test
    device = torch.device(config.device)
    layer = build_system(config, ds.image_shape).to(device)
    deep = isinstance(layer, DeepHebbianNet)

    stop = stop_rule(config.threshold, config.max_steps, on=config.residual)
    solver = solver_from_spec(config.resolved_solver(), schedule=config.schedule)
    settler = DynamicsSettler(layer, solver, stop, stream_every=config.stream_every,
                              on_divergence=config.on_divergence, carry=config.stream_carry)

    ev_xtr, ev_ytr = _subset(x_train, y_train, config.eval_train_size, config.seed)
    ev_xte, ev_yte = _subset(x_test, y_test, config.eval_test_size, config.seed + 1)
    for flag, y in (("--eval-train-size", ev_ytr), ("--eval-test-size", ev_yte)):
        if len(np.unique(y)) < 2:
            raise ConfigError(f"{flag} leaves {len(y)} sample(s) of a single class, too few for a readout; "
                              f"use at least {2 * ds.n_classes} or 'none' for all")
    t0 = time.perf_counter()  # raw-pixel baseline with the run's readout (LinearSVC takes minutes on 60k)
    baseline = readout_accuracy(config.readout, ev_xtr, ev_ytr, ev_xte, ev_yte, device=config.device)
    baseline.pop("weights", None)
    baseline_seconds = time.perf_counter() - t0

    monitor = SettlingMonitor()
    evaluator = Evaluator(
        layer,
        x_train=ev_xtr,
        y_train=ev_ytr,
        x_test=ev_xte,
        y_test=ev_yte,
        solver=solver if config.eval_solver is None else solver_from_spec(config.eval_solver, schedule=config.schedule),
        stop=stop,
        every=config.eval_every,
        epochs=config.epochs,
        readout=config.readout,
        batch_size=config.eval_batch_size,
        device=config.device,
        seed=config.seed,
        progress=config.progress,
        layer_slices=layer.layer_slices() if deep else None,
    )
    rate = DecayingRate(config.eta0, config.eta_decay, config.eta_min)
    rule_cls = DeepSimilarityMatchingRule if deep else SimilarityMatchingRule
    extra = {"lateral_rule": config.lateral_rule} if deep else {}
    rule = rule_cls(layer, rate=rate, batch_rule=config.batch_rule, **extra)
    callbacks = [rule, monitor, evaluator]
    if deep:  # before the rule: it reads the residuals at the weights the state settled with
        callbacks.insert(0, LayerMonitor(layer, tol=config.threshold or 1e-4))
    if config.stream_every is not None:
        callbacks.insert(0, SwitchMonitor(settler))
    ckpt = None
    if config.out and (config.checkpoint_every or resume):
        meta = training_settings(config)
        ckpt = Checkpoint(checkpoint_path(config.out), every=config.checkpoint_every, modules={"system": layer},
                          meta=meta)
        callbacks.append(ckpt)
    engine = Engine(settler, callbacks, progress=config.progress, desc=f"dssm {config.data}")
    x_train_t = torch.as_tensor(x_train, device=device)
    batches = epoch_batches(x_train_t, images=config.images_per_epoch, batch_size=config.batch_size, seed=config.seed)
    resumed_from = None
    if resume:
        resumed_from = ckpt.restore(engine) if ckpt.path.exists() else None
        if resumed_from is None:
            warnings.warn(f"no checkpoint at {ckpt.path}; starting from epoch 0", stacklevel=2)
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
    if evaluator.test_predictions is not None:
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
            "total_seconds": time.perf_counter() - t_start,
            "images_seen": engine.images_seen,
            "mean_iterations": float(its.mean()) if its.size else None,
            "fraction_converged": float(np.mean(np.asarray(monitor.status) == 1)) if its.size else None,
            "diverged_skipped": int(np.sum(np.asarray(monitor.status) == int(Status.DIVERGED))),
        },
        "resumed_from_epoch": resumed_from,
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
