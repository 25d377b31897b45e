"""Command line: ``dynsim run dssm ...`` (and, as they land, ``study``, ``bench``, ``plot``, ``sweep``).

Every command that trains or measures writes a JSON result (``--out``, default under
``runs/``) and PNG plots beside it. Bad settings exit with status 2 and a message that
names the value and the fix.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack, redirect_stdout
from dataclasses import fields
from pathlib import Path

from dynsim.config import add_config_argument, add_config_everywhere, parse_args_with_config, reject_unknown
from dynsim.errors import ConfigError, DynsimError
from dynsim.outputs import OutputSpec, timestamped
from dynsim.readouts import READOUTS


def _optional(kind):
    """``kind``, or None for 'none'/'off' (each flag's help says what None means; 'inf' is a
    number, refused by the range check where it would mean nothing)."""

    def parse(text: str):
        return None if text.lower() in ("none", "off") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _per_layer(kind):
    """``"4"`` -> 4, ``"4,8"`` -> [4, 8] (one value per layer)."""

    def parse(text: str):
        parts = [kind(v) for v in text.split(",") if v.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__} or a comma-separated list, got {text!r}")
        return parts[0] if len(parts) == 1 else parts

    parse.__name__ = kind.__name__
    return parse


def add_dssm_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``dynsim run dssm`` (defaults: DESIGN §2)."""
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
    g.add_argument("--gains", type=_per_layer(float), default=d.gains,
                   help="deep: g_p in r_p = tanh(g_p u_p), one value or one per layer (authors' tanh_factors; 1)")
    g.add_argument("--mult-factors", type=_per_layer(float), default=d.mult_factors,
                   help="deep: m_p in W_p r_{p-1}/m_p and γ m_{p+1} W_{p+1}ᵀ r_{p+1} (authors' mult_factors; 1)")
    g.add_argument("--layer-stop", default=d.layer_stop, choices=("each", "state"),
                   help="deep: stop when every layer's ‖du_p/ds‖/‖u_p‖ < T (authors, default) or the whole state's")
    g.add_argument("--nps", type=_per_layer(int), default=d.nps, help="neurons per site, e.g. 4 or 4,4 (default: 4)")
    g.add_argument("--stride", type=_per_layer(int), default=None,
                   help="site spacing in pixels (default: 2; upper layers 1), e.g. 2,1")
    g.add_argument("--radius", type=_per_layer(float), default=None,
                   help="receptive-field radius in pixels (28x28: 4, 8x8: 3; upper layers 2), e.g. 4,2")
    g.add_argument("--lateral-distance", type=_per_layer(float), default=d.lateral_distance,
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
    g.add_argument("--threshold", type=_optional(float), default=d.threshold,
                   help="stop a sample when ‖du/ds‖/‖u‖ < T (default: %(default)s; 'none': cap only)")
    g.add_argument("--max-steps", type=_optional(int), default=d.max_steps,
                   help="iteration cap per input (default: %(default)s; 'none': no cap)")
    g.add_argument("--residual", default=d.residual, choices=("field", "increment"),
                   help="judge T on the vector field ‖du/ds‖/‖u‖ (default: the test of the authors' and the "
                        "report's code) or on the last step's relative change ‖Δu‖/‖u‖ (looser by 1/dt)")
    g.add_argument("--stream-every", type=_optional(int), default=None,
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
    g.add_argument("--eval-train-size", type=_optional(int), default=None, help="subsample train set for the readout")
    g.add_argument("--eval-test-size", type=_optional(int), default=None, help="subsample test set for the readout")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--seeds", default=None, metavar="LIST",
                   help="run once per seed (e.g. 0,1,2 or 0-4), in parallel, and report mean ± s.e. over seeds; "
                        "each seed's result lies in <out stem>_seeds/")
    g.add_argument("--workers", type=int, default=None, help="with --seeds: processes (default: min(seeds, 2))")
    g.add_argument("--device", default=d.device, help="cpu or cuda")
    g.add_argument("--threads", type=_optional(int), default=d.threads,
                   help="torch CPU threads (default 1: fastest for batch-1 settling on 2 cores)")
    g.add_argument("--out", default=None, help="result JSON path (default: runs/dssm-<data>-<time>.json)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="write <out>.ckpt.pt every K epochs and at the end (default: %(default)s; 0: never)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run whose result is --out from its checkpoint (same final numbers)")
    add_config_argument(p)


def _config_from_args(args: argparse.Namespace):
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

    config = _config_from_args(args)
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


def command_group(sub: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    """The subcommands of group ``name`` (``study``, ``bench``, ``plot``), created on first use
    so that several modules can add commands to one group (``dynsim study convergence``,
    ``dynsim study ssl``)."""
    if name not in sub.choices:
        group = sub.add_parser(name, help=help)
        group.set_defaults(_commands=group.add_subparsers(dest=f"{name}_command", required=True))
    return sub.choices[name].get_default("_commands")


def cmd_run_ssl(args: argparse.Namespace) -> int:
    from dynsim.pipelines.ssl import run_from_args

    if args.epochs == 0:
        logging.getLogger("dynsim").warning(
            "dynsim: --epochs 0 trains nothing: the result is the random-encoder baseline")
    if args.seeds is not None:
        from dynsim.pipelines.ssl import _config_from_args
        from dynsim.studies.seeds import parse_seeds, run_ssl_seeds

        seeds = parse_seeds(args.seeds)
        result = run_ssl_seeds(_config_from_args(args), seeds, workers=args.workers)
        f = result["final"]

        def pm(m, s):
            return "-" if m is None else f"{100 * m:.2f}" + (f" ± {100 * s:.2f}" if s is not None else " (one seed)")

        print(f"test accuracy {pm(f['test_accuracy_mean'], f['test_accuracy_sem'])} %, random encoder "
              f"{pm(f['random_encoder_accuracy_mean'], f['random_encoder_accuracy_sem'])} %, gain "
              f"{pm(f['gain_over_random_mean'], f['gain_over_random_sem'])} pt (mean ± s.e. over {f['n_seeds']} seeds)")
        print(f"result: {result['files']['result']}")
        return 0
    result = run_from_args(args)
    f = result["final"]
    print(f"test accuracy {100 * f['test_accuracy']:.2f} % (linear probe on the frozen encoder), "
          f"train {f['train_seconds']:.1f} s, eval {f['eval_seconds']:.1f} s")
    if result.get("config", {}).get("out"):
        print(f"result: {result['config']['out']}")
    return 0


def cmd_study_ssl(args: argparse.Namespace) -> int:
    from dynsim.pipelines.ssl import study_from_args

    summary = study_from_args(args)
    print_table(args, summary, summary["table"])
    return 0


def print_table(args: argparse.Namespace, result: dict, text: str) -> None:
    """Print a command's table: ``text`` (Markdown), or with ``--format csv`` the result's
    rows (:func:`dynsim.results.table`) as CSV on the standard output, which then holds
    nothing else (progress went to stderr)."""
    if getattr(args, "format", "text") == "csv":
        from dynsim.results import table

        table(result).to_csv(getattr(args, "_stdout", None) or sys.stdout, index=False)
    else:
        print(text)


def register_ssl(sub: argparse._SubParsersAction, run_sub: argparse._SubParsersAction) -> None:
    """``dynsim run ssl`` and ``dynsim study ssl`` (Tang, Yang & Amit 2022; see dynsim/pipelines/ssl.py)."""
    from dynsim.pipelines import ssl

    run = run_sub.add_parser("ssl", help="self-supervised encoder with local learning rules (Tang et al. 2022)")
    ssl.add_run_arguments(run)
    run.add_argument("--seeds", default=None, metavar="LIST",
                     help="run once per seed (e.g. 0,1,2), in parallel, and report mean ± s.e.; needs --out")
    run.add_argument("--workers", type=int, default=None, help="with --seeds: processes (default: min(seeds, 2))")
    run.set_defaults(func=cmd_run_ssl, output=OutputSpec(timestamped("ssl", "data", "schedule", "rule"),
                                                         related=_checkpoint_of, can_resume=True, plots=False,
                                                         validate=lambda args: ssl._config_from_args(args).validate()))
    study = command_group(sub, "study", help="parameter studies").add_parser(
        "ssl", help="the learning-schedule x update-rule grid of Tang et al. Table 1")
    ssl.add_study_arguments(study)
    study.set_defaults(func=cmd_study_ssl, output=OutputSpec(
        lambda args: f"runs/ssl-study-{args.data}", directory=True, can_resume=True,
        validate=lambda args: ssl.check_study(ssl._config_from_args(args, out=None)) and None,
        result=lambda out: out / "ssl_study.json", related=lambda out: [out / "cells"]))


def build_parser() -> argparse.ArgumentParser:
    from dynsim import __version__

    parser = argparse.ArgumentParser(prog="dynsim", description="Continuous-time Hebbian network simulator")
    parser.add_argument("--version", action="version", version=f"dynsim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and evaluate a pipeline")
    run_sub = run.add_subparsers(dest="pipeline", required=True)
    dssm = run_sub.add_parser("dssm", help="similarity-matching network (Obeid et al. 2019)")
    add_dssm_arguments(dssm)
    from dynsim.pipelines.dssm import DSSMConfig

    dssm.set_defaults(func=cmd_run_dssm, config_extra_keys=tuple(f.name for f in fields(DSSMConfig)),
                      output=OutputSpec(timestamped("dssm", "data"), related=_checkpoint_of, can_resume=True,
                                        validate=lambda args: _config_from_args(args).validate()),
                      kernels=True)
    from dynsim.cli import deep, studies

    studies.register(sub)
    deep.register(sub)
    register_ssl(sub, run_sub)
    add_output_flags(parser)  # --overwrite, --resume, --plot-format on every command that writes
    add_config_everywhere(parser)  # --config FILE on every command (dynsim.config)
    return parser


def _checkpoint_of(out):
    """What holds an unfinished run of ``out``: its checkpoint, and with ``--seeds`` the
    per-seed results and cells in ``<out stem>_seeds/``."""
    from dynsim.checkpoint import checkpoint_path
    from dynsim.studies.seeds import seeds_dir

    return [checkpoint_path(out), seeds_dir(Path(out))]


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """Give every command with an :class:`~dynsim.outputs.OutputSpec` (``set_defaults(output=...)``)
    ``--overwrite``, ``--resume`` where it can continue a run, and ``--plot-format`` where it
    draws plots (unless it defines them itself)."""
    from dynsim.config import _leaves
    from dynsim.results import PLOT_FORMATS

    for leaf in _leaves(parser):
        spec = leaf.get_default("output")
        if spec is None:
            continue
        dests = {a.dest for a in leaf._actions}
        if "overwrite" not in dests:
            leaf.add_argument("--overwrite", action="store_true",
                              help="replace the result in --out (and delete its checkpoint or cells); "
                                   "without it an existing result or unfinished run is refused")
        if spec.can_resume and "resume" not in dests:
            leaf.add_argument("--resume", action="store_true",
                              help="continue the unfinished run in --out (finished cells are reused)")
        if spec.plots and "plot_format" not in dests:
            leaf.add_argument("--plot-format", default="png", metavar="FMT[,FMT]",
                              help=f"plot file formats, among {', '.join(PLOT_FORMATS)} (default: %(default)s)")


def _run(args: argparse.Namespace) -> int:
    """Run the chosen command with its output claimed (checked, locked) and plot formats set."""
    from dynsim.results import plot_formats

    with ExitStack() as stack:
        if getattr(args, "format", "text") == "csv":  # stdout holds the CSV table only
            args._stdout = sys.stdout
            stack.enter_context(redirect_stdout(sys.stderr))
        if getattr(args, "plot_format", None):
            stack.enter_context(plot_formats(args.plot_format.split(",")))
        spec = getattr(args, "output", None)
        if spec is not None:
            stack.enter_context(spec.claim(args))
        if getattr(args, "kernels", False) and str(getattr(args, "device", "cpu")).startswith("cpu"):
            from dynsim.warmup import warm_up

            warm_up()  # compile (announced) or load the kernels before any progress bar starts
        return args.func(args)


class _CurrentStderr(logging.StreamHandler):
    """A stderr handler that writes to whatever ``sys.stderr`` is *now* (not the stream it was
    created with): ``main`` may be called many times in one process (tests, notebooks) while
    ``sys.stderr`` is replaced and closed in between."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property ignores it
        pass


def _configure_logging() -> None:
    """Library messages (``logging``) go to stderr as plain lines; the CLI prints results."""
    logger = logging.getLogger("dynsim")
    if not any(isinstance(h, _CurrentStderr) for h in logger.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = None
    try:
        args = parse_args_with_config(parser, argv)
        _configure_logging()
        return _run(args)
    except DynsimError as exc:
        print(f"dynsim: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # an optional extra that is not installed
        extra = {"torchdiffeq": "adapters", "torchode": "adapters", "ray": "ray", "pandas": ""}.get(exc.name or "")
        hint = f"pip install 'dynsim[{extra}]'" if extra else f"pip install {exc.name}"
        print(f"dynsim: error: this needs the package {exc.name!r}, which is not installed: {hint}", file=sys.stderr)
        return 2
    except OSError as exc:  # an I/O error no check foresaw: one line, not a traceback
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"dynsim: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resumable = getattr(args, "checkpoint_every", 0) and getattr(args, "out", None)
        hint = "; rerun the same command with --resume to continue from the last checkpoint" if resumable else ""
        print(f"dynsim: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
