"""The settings of a DSSM run (``dynsim run dssm``): :class:`DSSMConfig` and its validation.

Defaults follow Obeid, Ramambason & Pehlevan (NeurIPS 2019) and their public code: NpS = 4,
stride 2, radius 4, the Euler step sizes ``dt_n = max(0.2/(1+0.005 n), 0.05)``, the stop
test ``‖du/ds‖/‖u‖ < 1e-4`` or 3000 steps, ``η_e = max(5e-3/(1+0.5 e), 1e-4)``, 120 epochs of
1000 images, a LinearSVC readout every 15 epochs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynsim.builders import DEEP_GEOMETRY, DEFAULT_GEOMETRY, build_system
from dynsim.data import DATASETS
from dynsim.engine import STREAM_CARRIES
from dynsim.errors import ConfigError
from dynsim.evaluation import READOUTS
from dynsim.plasticity import BATCH_RULES
from dynsim.plasticity.deep import LATERAL_RULES
from dynsim.settings import check_settings, setting
from dynsim.solvers import parse_schedule, parse_solver_spec, solver_from_spec
from dynsim.systems import ACTIVATIONS
from dynsim.systems.deep import LAYER_STOPS

NEWTON_CG_MIN_NPS = 32  # auto picks newton-cg from here (measured: benchmarks/nps100.py, issue 15)


@dataclass
class DSSMConfig:
    """Every setting of a DSSM run. Defaults follow Obeid, Ramambason & Pehlevan (2019) and their code."""

    # data
    data: str = setting("digits", help="data set (digits is embedded)", choices=DATASETS, group="data")
    data_dir: str | None = setting(None, help="directory with the data files (MNIST, CIFAR-10, ...)", group="data",
                                   shown_default="the data set's own")
    # network
    layers: int = setting(1, help="number of layers; > 1 builds a deep network (the structure flags below take "
                          "per-layer lists)", group="network")
    gamma: float = setting(0.0, help="feedback strength γ of a deep network", group="network")
    lateral_rule: str = setting("code", choices=LATERAL_RULES, group="network",
                                help="deep: 1/(1+γ) on the hidden lateral decay term (the authors' code) or on the "
                                "whole update")
    gains: float | list[float] = setting(1.0, per_layer=True, group="network",
                                         help="deep: g_p in r_p = tanh(g_p u_p), one value or one per layer "
                                         "(the authors' tanh_factors)")
    mult_factors: float | list[float] = setting(1.0, per_layer=True, group="network",
                                                help="deep: m_p in W_p r_{p-1}/m_p and γ m_{p+1} W_{p+1}ᵀ r_{p+1} "
                                                "(the authors' mult_factors)")
    layer_stop: str = setting("each", choices=LAYER_STOPS, group="network",
                              help="deep: stop when every layer's ‖du_p/ds‖/‖u_p‖ < T (the authors') or the whole "
                              "state's")
    nps: int | list[int] = setting(4, per_layer=True, group="network", help="neurons per site, e.g. 4 or 4,4")
    stride: int | list[int] | None = setting(None, per_layer=True, group="network",
                                             help="site spacing in pixels, e.g. 2,1",
                                             shown_default="2; upper layers 1")
    radius: float | list[float] | None = setting(None, per_layer=True, group="network",
                                                 help="receptive-field radius in pixels, e.g. 4,2",
                                                 shown_default="28x28: 4, 8x8: 3; upper layers 2")
    lateral_distance: float | list[float] = setting(0.0, per_layer=True, group="network",
                                                    help="lateral links between sites up to this grid distance "
                                                    "(0: same site)")
    lateral_sign: int = setting(-1, choices=(-1, 1), group="network",
                                help="s in τ du/ds = −u + Wx + s(L−I)r; −1: the authors' inhibition")
    activation: str = setting("tanh", choices=ACTIVATIONS, group="network", help="rate function f")
    tau: float = setting(1.0, group="network", help="time constant τ of the dynamics")
    # settling
    solver: str = setting("auto", group="settling",
                          help="solver spec NAME[,KEY=VALUE...]: auto, euler, newton, heun, rk4, "
                          "dopri5,rtol=..,atol=.., anderson,beta=0.5, torchdiffeq/torchode,rtol=..,atol=..; "
                          "auto = per-site newton for one "
                          "layer (block: Gauss–Seidel over layers + per-site newton for a deep net) with lateral "
                          "distance 0 and a field-residual threshold, else euler (the seed's method)")
    schedule: str = setting("seed", group="settling",
                            help="step sizes of fixed-step solvers: 'seed' = max(0.2/(1+0.005n), 0.05), "
                            "'constant:DT', 'decaying:DT0,DECAY,MIN'")
    threshold: float | None = setting(1e-4, group="settling",
                                      help="stop a sample when ‖du/ds‖/‖u‖ < T ('none': cap only)")
    max_steps: int | None = setting(3000, group="settling", help="iteration cap per input ('none': no cap)")
    residual: str = setting("field", choices=("field", "increment"), group="settling",
                            help="judge T on the vector field ‖du/ds‖/‖u‖ (the test of the authors' and the report's "
                            "code) or on the last step's relative change ‖Δu‖/‖u‖ (looser by 1/dt)")
    stream_every: int | None = setting(None, group="settling",
                                       help="streaming input: keep the state between inputs, switch input every K "
                                       "steps ('none': off)")
    stream_carry: str = setting("u", choices=STREAM_CARRIES, group="settling",
                                help="streaming carries the state u, or the rates r with u restarted at 0 (the "
                                "reproduction report's code; needs --solver euler)")
    on_divergence: str = setting("raise", choices=("raise", "skip"), group="settling",
                                 help="a sample whose state blows up stops the run, or is skipped")
    # training
    epochs: int = setting(120, group="training", help="epochs")
    images_per_epoch: int = setting(1000, group="training", help="training images drawn with replacement per epoch")
    batch_size: int = setting(1, group="training", help="inputs settled together (1: online)")
    batch_rule: str = setting("sum", choices=BATCH_RULES, group="training",
                              help="batch > 1: sum the B online updates or take their mean")
    eta0: float = setting(5e-3, group="training", help="η_e = max(eta0/(1 + eta_decay·e), eta_min)")
    eta_decay: float = setting(0.5, group="training", help="decay of the learning rate per epoch")
    eta_min: float = setting(1e-4, group="training", help="floor of the learning rate")
    # evaluation
    eval_every: int = setting(15, group="evaluation", help="epochs between readouts (and at the end; 0: at the end)")
    eval_solver: str | None = setting(None, group="evaluation",
                                      help="settle the readout sets with this solver (same stop rule), e.g. newton",
                                      shown_default="the run's")
    readout: str = setting("svc", choices=READOUTS, group="evaluation",
                           help="svc: LinearSVC(C=1, balanced)'s problem solved exactly by Newton (the papers' "
                           "number); liblinear: sklearn's LinearSVC itself (slow, for cross-checks); ridge: exact "
                           "one-vs-rest least squares (cheap, for relative comparisons)")
    readout_tol: float = setting(1e-4, group="evaluation",
                                 help="svc/liblinear: liblinear's stopping tolerance, "
                                 "‖∇f_c‖ ≤ tol·min(n⁺,n⁻)/n·‖∇f_c(0)‖ per class (LinearSVC's default; smaller stops "
                                 "nearer the minimum, see README 'Neurons per site')")
    eval_batch_size: int = setting(1000, group="evaluation", help="inputs settled together for the readout")
    eval_train_size: int | None = setting(None, group="evaluation",
                                          help="subsample the train set for the readout ('none': all)")
    raw_baseline: bool = setting(True, group="evaluation",
                                 help="skip the raw-pixel baseline (the same readout on the pixels; study nps "
                                 "computes it once per study instead of once per cell)")
    eval_test_size: int | None = setting(None, group="evaluation",
                                         help="subsample the test set for the readout ('none': all)")
    # run
    seed: int = setting(0, group="run", help="seed of the weights and the image order")
    device: str = setting("cpu", group="run", help="cpu or cuda")
    threads: int | None = setting(1, group="run", help="torch CPU threads (1: fastest for batch-1 settling on 2 "
                                  "cores; 'none': torch's default)")
    checkpoint_every: int = setting(1, group="run", help="write <out>.ckpt.pt every K epochs and at the end (0: never)")
    out: str | None = setting(None, group="run", help="result JSON path", shown_default="runs/dssm-<data>-<time>.json")
    progress: bool = setting(True, group="run", help="no progress bars")
    extra: dict[str, Any] = setting(default_factory=dict, cli=False,
                                    help="free-form notes recorded in the result (config files only)")

    def validate(self) -> DSSMConfig:
        """Raise :class:`ConfigError` naming the first bad value and the fix.

        Each value is first checked against its own description (choices, range: the same
        message as for a flag or a config-file key), then the settings against each other."""
        if self.readout == "probe":
            raise ConfigError("--readout probe (an unconverged L-BFGS fit) was removed: --readout svc solves "
                              "LinearSVC's problem exactly and faster; --readout ridge is the cheap exact one")
        check_settings(self)
        self.layer_structure()
        check_layer_memory(self)
        for name in ("eval_train_size", "eval_test_size"):
            if getattr(self, name) == 1:
                raise ConfigError(f"--{name.replace('_', '-')} 1 leaves one sample, too few for a readout; "
                                  "give at least one sample per class (e.g. 100) or 'none' for all")
        for name in ("solver", "schedule", "device"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"--{name.replace('_', '-')} must be a string, got {getattr(self, name)!r}")
        if not isinstance(self.extra, dict):
            raise ConfigError(f"extra must be a table/dict, got {self.extra!r}")
        if self.out is not None:
            if not isinstance(self.out, str) or not self.out:
                raise ConfigError(f"--out must be a file path, got {self.out!r}")
            if Path(self.out).is_dir():
                raise ConfigError(f"--out {self.out} is a directory; give a file name such as {self.out}/run.json")
        if self.threshold is None and self.max_steps is None:
            raise ConfigError("give --threshold, --max-steps or both; settling would never stop")
        for name in ("gains", "mult_factors"):
            if self.layers == 1 and any(v != 1 for v in self.per_layer(name)):
                raise ConfigError(f"--{name.replace('_', '-')} applies to deep networks only (--layers > 1); "
                                  "drop it for one layer")
        if self.stream_carry == "r" and self.stream_every is not None and not self.resolved_solver().startswith(
                ("euler", "heun", "rk4")):
            raise ConfigError("--stream-carry r restarts u at 0 with one Euler step; it needs a fixed-step "
                              f"--solver such as euler, not {self.resolved_solver()!r}")
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
        """The solver spec that runs. ``"auto"`` (the default) is ``"newton"`` (for a deep network
        ``"block,inner_tol=T"``: Gauss–Seidel over layers, each layer solved by per-site Newton to
        the threshold T within a sweep; with feedback γ > 0 ``"block"``, one Newton step per layer
        and sweep) — the per-site
        Newton solver, which reaches the same field-residual tolerance in a few steps where
        the seed's Euler schedule needs many (figures: benchmarks/README.md) — for a
        single layer with lateral distance 0, a field residual, a threshold, no streaming
        and the seed schedule; otherwise ``"euler"`` (the seed's method, e.g. when the
        residual is Euler's increment or settling is a fixed number of Euler steps). From NpS
        ``NEWTON_CG_MIN_NPS`` on, with the inhibitory lateral sign, ``"newton-cg,picard_start=false"``:
        the same Newton iteration with conjugate-gradient block solves, started from rest."""
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
        # deep: block Gauss–Seidel over layers with per-site Newton; without feedback each layer is
        # solved to T within a sweep, with feedback one Newton step per layer and sweep is cheaper
        # (benchmarks/deep_settle.py)
        if self.layers > 1:
            return f"block,inner_tol={self.threshold!r}" if self.gamma == 0 else "block"
        # from NpS 32 (faster than the compiled Newton kernels there), with the inhibitory sign (SPD
        # Newton systems): Newton–CG, no per-site factorisation (benchmarks/nps100.py)
        # Newton from rest, not from the Picard start: L ≻ 0 (the Hebbian rule keeps it so from L = I)
        # makes the energy line search converge from any start, and trained layers settle in fewer
        # steps from rest (benchmarks/nps100.py, issue 15)
        if self.per_layer("nps")[0] >= NEWTON_CG_MIN_NPS and self.lateral_sign == -1:
            return "newton-cg,picard_start=false"
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
    "threads", "on_divergence", "checkpoint_every", "out", "progress", "raw_baseline", "readout_tol",
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
