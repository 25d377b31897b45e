"""``dynsim run dssm``: the flags of :class:`~dynsim.configs.dssm.DSSMConfig` and the command."""

from __future__ import annotations

import argparse
import time
from dataclasses import fields
from pathlib import Path

from dynsim.cli.common import checkpoint_of, optional, per_layer
from dynsim.config import add_config_argument, reject_unknown
from dynsim.errors import ConfigError
from dynsim.outputs import OutputSpec, timestamped
from dynsim.readouts import READOUTS


def add_dssm_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``dynsim run dssm`` (defaults: Obeid, Ramambason & Pehlevan 2019)."""
    from dynsim.data import DATASETS
    from dynsim.pipelines.dssm import DSSMConfig

    d = DSSMConfig()
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data, choices=DATASETS, help="data set (default: %(default)s, embedded)")
    g.add_argument("--data-dir", default=None, help="directory with the data files (MNIST, CIFAR-10, ...)")
    g = p.add_argument_group("network")
    g.add_argument("--layers", type=int, default=d.layers,
                   help="number of layers; > 1 builds a deep network (the four flags below take per-layer lists)")
    g.add_argument("--gamma", type=float, default=d.gamma, help="feedback strength of a deep network (default: 0)")
    g.add_argument("--lateral-rule", default=d.lateral_rule, choices=("code", "scaled"),
                   help="deep: 1/(1+γ) on the hidden lateral decay term (authors code, default) or whole update")
    g.add_argument("--gains", type=per_layer(float), default=d.gains,
                   help="deep: g_p in r_p = tanh(g_p u_p), one value or one per layer (authors' tanh_factors; 1)")
    g.add_argument("--mult-factors", type=per_layer(float), default=d.mult_factors,
                   help="deep: m_p in W_p r_{p-1}/m_p and γ m_{p+1} W_{p+1}ᵀ r_{p+1} (authors' mult_factors; 1)")
    g.add_argument("--layer-stop", default=d.layer_stop, choices=("each", "state"),
                   help="deep: stop when every layer's ‖du_p/ds‖/‖u_p‖ < T (authors, default) or the whole state's")
    g.add_argument("--nps", type=per_layer(int), default=d.nps, help="neurons per site, e.g. 4 or 4,4 (default: 4)")
    g.add_argument("--stride", type=per_layer(int), default=None,
                   help="site spacing in pixels (default: 2; upper layers 1), e.g. 2,1")
    g.add_argument("--radius", type=per_layer(float), default=None,
                   help="receptive-field radius in pixels (28x28: 4, 8x8: 3; upper layers 2), e.g. 4,2")
    g.add_argument("--lateral-distance", type=per_layer(float), default=d.lateral_distance,
                   help="lateral links between sites up to this grid distance (default: 0, same site)")
    g.add_argument("--lateral-sign", type=int, default=d.lateral_sign, choices=(-1, 1),
                   help="s in τ du/ds = −u + Wx + s(L−I)r; −1 = authors' inhibition (default)")
    g.add_argument("--activation", default=d.activation, help="rate function f: tanh, linear, relu")
    g = p.add_argument_group("settling")
    g.add_argument("--solver", default=d.solver,
                   help="solver spec NAME[,KEY=VALUE...]: auto, euler, newton, heun, rk4, dopri5,rtol=..,atol=.., "
                   "anderson,beta=0.5, torchdiffeq/torchode,rtol=..,atol=.. (default: %(default)s = per-site "
                   "newton for one layer (block: Gauss–Seidel over layers + per-site newton for a deep net) "
                   "with lateral distance 0 and a field-residual threshold, else euler; "
                   "'euler' gives the seed's method)")
    g.add_argument("--schedule", default=d.schedule,
                   help="Euler step sizes: 'seed' = max(0.2/(1+0.005n), 0.05), 'constant:DT', 'decaying:DT0,DECAY,MIN'")
    g.add_argument("--threshold", type=optional(float), default=d.threshold,
                   help="stop a sample when ‖du/ds‖/‖u‖ < T (default: %(default)s; 'none': cap only)")
    g.add_argument("--max-steps", type=optional(int), default=d.max_steps,
                   help="iteration cap per input (default: %(default)s; 'none': no cap)")
    g.add_argument("--residual", default=d.residual, choices=("field", "increment"),
                   help="judge T on the vector field ‖du/ds‖/‖u‖ (default: the test of the authors' and the "
                        "report's code) or on the last step's relative change ‖Δu‖/‖u‖ (looser by 1/dt)")
    g.add_argument("--stream-every", type=optional(int), default=None,
                   help="streaming input: keep the state between inputs, switch input every K steps")
    g.add_argument("--stream-carry", default=d.stream_carry, choices=("u", "r"),
                   help="streaming carries the state u (default) or the rates r with u restarted at 0 "
                        "(the reproduction report's code; needs --solver euler)")
    g.add_argument("--on-divergence", default=d.on_divergence, choices=("raise", "skip"))
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=d.epochs, help="epochs (default: %(default)s)")
    g.add_argument("--images-per-epoch", type=int, default=d.images_per_epoch,
                   help="training images drawn with replacement per epoch (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="inputs settled together (default: 1, online)")
    g.add_argument("--batch-rule", default=d.batch_rule, choices=("sum", "mean"),
                   help="batch > 1: sum the B online updates (default) or take their mean")
    g.add_argument("--eta0", type=float, default=d.eta0, help="η_e = max(eta0/(1+decay·e), eta_min)")
    g.add_argument("--eta-decay", type=float, default=d.eta_decay)
    g.add_argument("--eta-min", type=float, default=d.eta_min)
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="epochs between readouts (and at the end)")
    g.add_argument("--eval-solver", default=None,
                   help="settle the readout sets with this solver (same stop rule), e.g. newton (default: the run's)")
    g.add_argument("--readout", default=d.readout, choices=READOUTS,
                   help="svc: LinearSVC(C=1, balanced)'s problem solved exactly by Newton (the papers' number, "
                        "default); liblinear: sklearn's LinearSVC itself (slow, for cross-checks); ridge: exact "
                        "one-vs-rest least squares (cheap, for relative comparisons)")
    g.add_argument("--eval-train-size", type=optional(int), default=None, help="subsample train set for the readout")
    g.add_argument("--eval-test-size", type=optional(int), default=None, help="subsample test set for the readout")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--seeds", default=None, metavar="LIST",
                   help="run once per seed (e.g. 0,1,2 or 0-4), in parallel, and report mean ± s.e. over seeds; "
                        "each seed's result lies in <out stem>_seeds/")
    g.add_argument("--workers", type=int, default=None, help="with --seeds: processes (default: min(seeds, 2))")
    g.add_argument("--device", default=d.device, help="cpu or cuda")
    g.add_argument("--threads", type=optional(int), default=d.threads,
                   help="torch CPU threads (default 1: fastest for batch-1 settling on 2 cores)")
    g.add_argument("--out", default=None, help="result JSON path (default: runs/dssm-<data>-<time>.json)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="write <out>.ckpt.pt every K epochs and at the end (default: %(default)s; 0: never)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run whose result is --out from its checkpoint (same final numbers)")
    add_config_argument(p)


def config_from_args(args: argparse.Namespace):
    from dynsim.pipelines.dssm import DSSMConfig

    names = [f.name for f in fields(DSSMConfig)]
    from_file = dict(getattr(args, "config_values", {}))
    reject_unknown(from_file, names, source=f"config file {args.config}")
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(from_file)  # settings without a flag (tau, extra, progress)
    if not isinstance(from_file.get("progress", True), bool):
        raise ConfigError(f"config file {args.config}: progress = {from_file['progress']!r} must be a boolean "
                          "(true or false, no quotes)")
    values["progress"] = not args.no_progress and from_file.get("progress", True)
    if getattr(args, "resume", False) and not values.get("out"):
        raise ConfigError("--resume needs --out PATH: the result file of the run to continue "
                          "(its checkpoint <out>.ckpt.pt lies beside it)")
    if not values.get("out"):
        values["out"] = str(Path("runs") / f"dssm-{values['data']}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    return DSSMConfig(**values)


def cmd_run_dssm(args: argparse.Namespace) -> int:
    from dynsim.pipelines.dssm import run_dssm

    config = config_from_args(args)
    if args.seeds is not None:
        return _run_dssm_seeds(config, args)
    result = run_dssm(config, resume=args.resume)
    f = result["final"]
    acc = f["test_accuracy"]
    print(
        f"test accuracy {100 * acc:.2f} % (raw pixels {100 * f['raw_pixel_accuracy']:.2f} %), "
        f"mean iterations {f['mean_iterations']:.1f}, converged {100 * f['fraction_converged']:.1f} %, "
        f"train {f['train_seconds']:.1f} s, eval {f['eval_seconds']:.1f} s"
        if acc is not None
        else "no evaluation was run"
    )
    for key, path in result.get("files", {}).items():
        print(f"{key}: {path}")
    return 0


def _run_dssm_seeds(config, args: argparse.Namespace) -> int:
    from dynsim.studies.seeds import parse_seeds, run_dssm_seeds

    seeds = parse_seeds(args.seeds)
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    result = run_dssm_seeds(config, seeds, workers=args.workers)
    f = result["final"]
    n = f["n_seeds"]

    def pm(mean, sem, unit="%"):
        return f"{100 * mean:+.2f} {unit}" if unit == "pt" and sem is None else (
            f"{100 * mean:.2f}" + (f" ± {100 * sem:.2f} {unit}" if sem is not None else f" {unit} (one seed)"))

    print(f"test accuracy {pm(f['test_accuracy_mean'], f['test_accuracy_sem'])} (mean ± s.e. over {n} seeds: "
          + ", ".join(f"{100 * a:.2f}" for a in f["test_accuracy_per_seed"]) + ")")
    raw = f["raw_pixel_accuracy"]
    if isinstance(raw, float):
        print(f"raw pixels {100 * raw:.2f} %; gain over raw pixels "
              f"{pm(f['gain_over_raw_mean'], f['gain_over_raw_sem'], 'pt')} (paired, same split)")
    for key, path in result.get("files", {}).items():
        print(f"{key}: {path}")
    return 0


def register(run_sub: argparse._SubParsersAction) -> None:
    """Add ``dynsim run dssm`` to the ``run`` subcommands ``run_sub``."""
    from dynsim.pipelines.dssm import DSSMConfig

    dssm = run_sub.add_parser("dssm", help="similarity-matching network (Obeid et al. 2019)")
    add_dssm_arguments(dssm)
    dssm.set_defaults(func=cmd_run_dssm, config_extra_keys=tuple(f.name for f in fields(DSSMConfig)),
                      output=OutputSpec(timestamped("dssm", "data"), related=checkpoint_of, can_resume=True,
                                        validate=lambda args: config_from_args(args).validate()),
                      kernels=True)
