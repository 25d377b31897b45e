"""Where the seconds of one `dynsim study nps` cell go (issue 15): train, settle 70k, readout, baseline.

Runs one full-size cell (Fashion-MNIST, 60,000 / 10,000 images, 15 epochs × 1000 images, seed 0)
exactly as the study's worker does, and splits its wall time into: training, settling all
70,000 images for the readout, the `svc` readout, the raw-pixel baseline, and the rest (data
loading, building). With the code of this branch the baseline is no longer part of a cell:
it is the study's own cell, timed here apart (``raw_pixel_cell``). The same script measures an
older checkout (where the baseline runs inside every cell) when that checkout is first on
``PYTHONPATH``, e.g. ``git worktree add /tmp/old 572445d``:

    PYTHONPATH=/tmp/old python benchmarks/nps_cell.py --nps 4 --out before.json
    PYTHONPATH=. python benchmarks/nps_cell.py --nps 4 --out benchmarks/results/nps_cell_after_nps4.json

``--cprofile`` adds the top of a cProfile listing (sorted by cumulative time) to the JSON.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    import dynsim
    import dynsim.pipelines.dssm as pipeline
    from dynsim.studies import nps as study_module

    study = study_module.NpsStudyConfig(data="fashion-mnist", nps=[a.nps], seeds=[a.seed], epochs=a.epochs)
    run_cell = getattr(study_module, "run_cell", study_module.train_cell)  # older checkouts: train_cell only
    captured = {}
    original = pipeline.run_dssm

    def keep(config, **kw):
        captured["result"] = original(config, **kw)
        return captured["result"]

    pipeline.run_dssm = keep
    load_before = os.getloadavg()[0]
    prof = cProfile.Profile() if a.cprofile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    row = run_cell(study.cells()[0])
    if prof:
        prof.disable()
    wall = time.perf_counter() - t0
    r = captured["result"]
    ev = [h for h in r["history"] if "test_accuracy" in h][-1]
    split = {
        "dynsim": dynsim.__file__, "nps": a.nps, "cell_wall_s": wall, "train_s": r["final"]["train_seconds"],
        "eval_settle_s": ev["eval_settle_seconds"], "readout_s": ev["readout_seconds"],
        "readout_iterations": ev["readout_iterations"], "baseline_in_cell_s": r["baseline"]["seconds"],
        "test_accuracy": row["test_accuracy"], "peak_rss_gib": row["peak_rss_gib"],
    }
    split["other_s"] = wall - split["train_s"] - ev["eval_seconds"] - split["baseline_in_cell_s"]
    if hasattr(study, "baseline_cells"):
        t0 = time.perf_counter()
        raw = run_cell(study.baseline_cells()[0])
        split["raw_pixel_cell_s"] = time.perf_counter() - t0
        split["raw_pixel_accuracy"] = raw["raw_pixel_accuracy"]
    else:
        split["raw_pixel_accuracy"] = row["raw_pixel_accuracy"]
    split["load"] = [load_before, os.getloadavg()[0]]
    out = {"split": split}
    if prof:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(40)
        out["profile"] = s.getvalue()
    for key, value in split.items():
        print(f"{key:>22}: {value:.2f}" if isinstance(value, float) else f"{key:>22}: {value}")
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
