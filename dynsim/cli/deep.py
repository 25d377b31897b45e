"""CLI of ``dynsim study deep`` (the study itself: :mod:`dynsim.studies.deep`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def _list(kind, none_words=()):
    def parse(text: str) -> list:
        try:
            return [None if v.strip().lower() in none_words else kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            msg = f"expected a comma-separated list of {kind.__name__}, got {text!r}"
            raise argparse.ArgumentTypeError(msg) from None
    return parse


def cmd_study_deep(args: argparse.Namespace) -> int:
    from dynsim.studies.deep import DeepStudyConfig, run_deep_study

    base = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            from dynsim.errors import ConfigError

            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        import json

        try:
            base[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            base[key.replace("-", "_")] = value
    config = DeepStudyConfig(
        data=args.data, data_dir=args.data_dir, layers=args.layers, streams=args.streams, caps=args.caps,
        seeds=args.seeds, nps=args.nps, gamma=args.gamma, gains=args.gains, mult_factors=args.mult_factors,
        threshold=args.threshold, solver=args.solver, epochs=args.epochs, images_per_epoch=args.images_per_epoch,
        eval_every=args.eval_every, eval_train_size=args.eval_train_size, eval_test_size=args.eval_test_size,
        readout=args.readout, base=base, workers=args.workers, backend=args.backend,
        ray_address=args.ray_address, progress=args.progress,
        out=args.out or str(Path("runs") / f"deep-{args.data}-{time.strftime('%Y%m%d-%H%M%S')}.json"),
    )
    result = run_deep_study(config)
    print(result["table"])
    for key, path in result.get("files", {}).items():
        print(f"{key}: {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``dynsim study deep`` to the top-level subparsers ``sub``."""
    from dynsim.cli.common import command_group
    from dynsim.data import DATASETS
    from dynsim.studies.deep import DeepStudyConfig

    d = DeepStudyConfig()
    p = command_group(sub, "study", "studies over grids of settings").add_parser(
        "deep", help="1, 2, 3 layers x streaming x cap x seeds: every layer's readout, saturation, settling")
    p.add_argument("--data", default=d.data, choices=DATASETS, help="data set (default: %(default)s)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--layers", type=_list(int), default=d.layers, help="layer counts, e.g. 1,2,3 (default)")
    p.add_argument("--streams", type=_list(int, ("off", "none", "0")), default=d.streams,
                   help="training input: 'off' (reset) or switch every k steps, e.g. off,10 (default)")
    p.add_argument("--caps", type=_list(int, ("none",)), default=d.caps, help="step caps, e.g. 10,3000 (default)")
    p.add_argument("--seeds", type=_list(int), default=d.seeds, help="seeds, e.g. 0,1,2 (default)")
    p.add_argument("--nps", type=int, default=d.nps, help="neurons per site in every layer (default: 4)")
    p.add_argument("--gamma", type=float, default=d.gamma, help="feedback strength (default: 0, the authors')")
    p.add_argument("--gains", type=_list(float), default=None,
                   help="g_p per layer of the deepest network (authors' tanh_factors; default all 1)")
    p.add_argument("--mult-factors", type=_list(float), default=None,
                   help="m_p per layer of the deepest network (authors' mult_factors; default all 1)")
    p.add_argument("--threshold", type=float, default=d.threshold, help="T (default: %(default)s)")
    p.add_argument("--solver", default=d.solver, help="solver spec (default: auto = block/newton/euler)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs of 1000 images (default: %(default)s)")
    p.add_argument("--images-per-epoch", type=int, default=d.images_per_epoch)
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="0: read out after training only (default)")
    p.add_argument("--eval-train-size", type=int, default=None, help="readout train images (default: all)")
    p.add_argument("--eval-test-size", type=int, default=None, help="readout test images (default: all)")
    p.add_argument("--readout", default=d.readout, help="readout by name (dynsim.evaluation; default: svc)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other run-dssm setting for every cell")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--backend", default="local", choices=("local", "ray"))
    p.add_argument("--ray-address", default=None)
    p.add_argument("--out", default=None, help="study JSON (cells beside it in <out>_cells/; PNG beside it)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress output")
    p.set_defaults(func=cmd_study_deep)
