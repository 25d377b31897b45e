"""The settings of a DSSM run (``dynsim run dssm``): :class:`DSSMConfig` and its validation.

Defaults follow Obeid, Ramambason & Pehlevan (NeurIPS 2019) and their public code: NpS = 4,
stride 2, radius 4, the Euler step sizes ``dt_n = max(0.2/(1+0.005 n), 0.05)``, the stop
test ``‖du/ds‖/‖u‖ < 1e-4`` or 3000 steps, ``η_e = max(5e-3/(1+0.5 e), 1e-4)``, 120 epochs of
1000 images, a LinearSVC readout every 15 epochs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynsim.builders import DEEP_GEOMETRY, DEFAULT_GEOMETRY, build_system
from dynsim.errors import ConfigError
from dynsim.evaluation import READOUTS
from dynsim.plasticity import BATCH_RULES
from dynsim.plasticity.deep import LATERAL_RULES
from dynsim.settings import check_ranges
from dynsim.solvers import parse_schedule, parse_solver_spec, solver_from_spec
from dynsim.systems import ACTIVATIONS
from dynsim.systems.deep import LAYER_STOPS

NEWTON_CG_MIN_NPS = 32  # auto picks newton-cg from here (measured: benchmarks/nps100.py, issue 15)


@dataclass
class DSSMConfig:
    """Every setting of a DSSM run. Defaults follow Obeid, Ramambason & Pehlevan (2019) and their code."""

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
        Newton solver, which reaches the same field-residual tolerance in a few steps where
        the seed's Euler schedule needs many (figures: benchmarks/README.md) — for a
        single layer with lateral distance 0, a field residual, a threshold, no streaming
        and the seed schedule; otherwise ``"euler"`` (the seed's method, e.g. when the
        residual is Euler's increment or settling is a fixed number of Euler steps). From NpS
        ``NEWTON_CG_MIN_NPS`` on, with the inhibitory lateral sign, ``"newton-cg"``: the same
        Newton iteration with conjugate-gradient block solves."""
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
        if self.layers > 1:
            return "block"
        # from NpS 32 (faster than the compiled Newton kernels there), with the inhibitory sign (SPD
        # Newton systems): Newton–CG, no per-site factorisation (benchmarks/nps100.py)
        if self.per_layer("nps")[0] >= NEWTON_CG_MIN_NPS and self.lateral_sign == -1:
            return "newton-cg"
        return "newton"

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
