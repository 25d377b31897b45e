"""The SSL study of Tang, Yang & Amit (2022) Table 1: every learning schedule (E2E, GLL, RLL)
× update rule (BP, RF, URF, DTP), plus the random encoder, trained with the contrastive
hinge loss and read out by a linear probe; a Markdown table, a JSON file and a bar plot
against the published CIFAR numbers.

>>> from dynsim.pipelines.ssl import SSLConfig
>>> from dynsim.studies.ssl import study_cells
>>> [c["name"] for c in study_cells(SSLConfig(epochs=3))][:3]
['e2e-bp', 'e2e-rf', 'e2e-urf']
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dynsim.errors import ConfigError
from dynsim.pipelines.ssl import SSLConfig, run_ssl
from dynsim.results import result_header, write_result
from dynsim.sweeps import run_grid

# Tang, Yang & Amit (2022) Table 1: SSL on CIFAR-100, linear probe on CIFAR-10 (%):
# (all negatives, gradient block + 5 negatives)
PUBLISHED_CIFAR = {
    ("e2e", "bp"): (71.44, 70.35),
    ("e2e", "dtp"): (71.29, 67.74),
    ("e2e", "rf"): (61.70, 63.61),
    ("gll", "bp"): (72.76, 71.14),
    ("gll", "urf"): (72.76, 71.14),
    ("gll", "rf"): (67.83, 66.52),
    ("rll", "bp"): (71.35, 71.17),
    ("rll", "urf"): (71.35, 71.17),
    ("rll", "rf"): (65.94, 65.49),
    ("random", "-"): (61.23, None),
}


STUDY_GRID: tuple[tuple[str, str], ...] = (
    ("e2e", "bp"),
    ("e2e", "rf"),
    ("e2e", "urf"),
    ("e2e", "dtp"),
    ("gll", "bp"),
    ("gll", "urf"),
    ("gll", "rf"),
    ("rll", "bp"),
    ("rll", "urf"),
    ("rll", "rf"),
    ("random", "-"),
)


def study_cells(base: SSLConfig, seeds: list[int] | None = None) -> list[dict]:
    """One cell (config dict plus ``name``) per row of :data:`STUDY_GRID` and seed
    (``seeds``; default: ``base.seed`` alone), seed by seed: every row's first seed runs
    before any row's second, so a study cut short still covers every row."""
    cells = []
    for seed in seeds or [base.seed]:
        for schedule, rule in STUDY_GRID:
            cfg = dataclasses.asdict(base)
            cfg.update(random_baseline=False, out=None, seed=seed)
            if schedule == "random":
                cfg.update(schedule="e2e", rule="bp", epochs=0)
            else:
                cfg.update(schedule=schedule, rule=rule)
            cells.append({"name": f"{schedule}-{rule}".replace("--", ""), **cfg})
    return cells


def run_study_cell(cell: dict) -> dict:
    """Run one study cell (top-level, so worker processes can pickle it)."""
    cfg = {k: v for k, v in cell.items() if k != "name"}
    result = run_ssl(SSLConfig(**cfg), progress=False)
    result["name"] = cell["name"]
    return result


def resolve_study_cell(cell: dict) -> dict:
    """A study cell's full :class:`SSLConfig` (every default filled in; hashed into its file)."""
    return {"name": cell["name"], **dataclasses.asdict(SSLConfig(**{k: v for k, v in cell.items() if k != "name"}))}


def study_rows(results: list[dict]) -> list[dict]:
    """Table rows (learning, update, accuracy % as mean and s.e. over the seeds of the row,
    published CIFAR %, seconds) from results, in the order rows first appear."""
    from dynsim.studies.seeds import mean_sem

    groups: dict[tuple, list] = {}
    for r in results:
        cfg = r["config"]
        key = ("random", "-") if cfg["epochs"] == 0 else (cfg["schedule"], cfg["rule"])
        groups.setdefault(key, []).append(r)
    rows = []
    for key, runs in groups.items():
        accs = [r["final"]["test_accuracy"] for r in runs]
        m, s = mean_sem(accs)
        pub = PUBLISHED_CIFAR.get(key, (None, None))
        losses = [r["history"][-1]["loss"] for r in runs if r["history"]]
        rows.append(
            {
                "learning": "random encoder" if key[0] == "random" else key[0].upper(),
                "update": key[1].upper() if key[1] != "-" else "",
                "accuracy": None if m is None else 100 * m,
                "accuracy_sem": None if s is None else 100 * s,
                "accuracy_per_seed": [None if a is None else 100 * a for a in accs],
                "seeds": [r["config"]["seed"] for r in runs],
                "published": pub[0],
                "published_block5": pub[1],
                "train_seconds": mean_sem([r["final"]["train_seconds"] for r in runs])[0],
                "final_loss": mean_sem(losses)[0] if losses else None,
            }
        )
    return rows


def study_table(rows: list[dict], header: str = "") -> str:
    """Markdown table of :func:`study_rows`."""

    def fmt(v, spec=".2f"):
        return "–" if v is None else format(v, spec)

    lines = [header] if header else []
    lines += [
        "| learning | update | ours: probe acc. (%) | final loss / image | train s "
        "| published CIFAR (%) | published +block, 5 neg. (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = fmt(r["accuracy"])
        if r.get("accuracy_sem") is not None:
            acc += f" ± {r['accuracy_sem']:.2f} ({len(r['seeds'])} seeds)"
        lines.append(
            f"| {r['learning']} | {r['update']} | {acc} | {fmt(r['final_loss'])} "
            f"| {fmt(r['train_seconds'], '.0f')} | {fmt(r['published'])} "
            f"| {fmt(r['published_block5'])} |"
        )
    return "\n".join(lines) + "\n"


def plot_study(rows: list[dict], ours: str = "ours"):
    """Bar plot of ours vs published CIFAR accuracy per row (from :func:`study_rows`).

    Takes data only and returns the matplotlib Figure (in dynsim's plot style); ``ours``
    labels our bars.
    """
    import matplotlib.pyplot as plt

    from dynsim.plots import STYLE

    with plt.rc_context(STYLE):
        return _plot_study(rows, ours)


def _plot_study(rows: list[dict], ours: str):
    import matplotlib.pyplot as plt

    labels = [f"{r['learning']} {r['update']}".strip() for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar([i - 0.2 for i in x], [r["accuracy"] or 0 for r in rows], 0.4, label=ours)
    ax.bar(
        [i + 0.2 for i in x], [r["published"] or 0 for r in rows], 0.4, label="published (CIFAR)"
    )
    ax.set_xticks(list(x), labels, rotation=30, ha="right")
    ax.set_ylabel("linear-probe test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower left", ncol=2, framealpha=0.9)
    fig.tight_layout()
    return fig


def check_study(base: SSLConfig, seeds: list[int] | None = None) -> list[dict]:
    """The study's cells (each row once per seed of ``seeds``), every one's settings checked
    (before the first one runs)."""
    if base.epochs == 0:
        raise ConfigError("study ssl with --epochs 0 trains nothing: every cell would be the random encoder; "
                          "give --epochs >= 3 (GLL shares them among the stages)")
    cells = study_cells(base, seeds)
    for cell in cells:
        SSLConfig(**{k: v for k, v in cell.items() if k != "name"}).validate()
    return cells


def run_study(
    base: SSLConfig,
    out_dir: Path,
    *,
    workers: int | None = 1,
    backend: str = "local",
    ray_address: str | None = None,
    progress: bool = True,
    seeds: list[int] | None = None,
) -> dict:
    """Run the Table-1 grid on ``base``'s data (each row once per seed of ``seeds``); write
    ``ssl_study.{md,json,png}`` in ``out_dir``.

    The cells run through :func:`dynsim.sweeps.run_grid` (one result file per cell under
    ``out_dir/cells``, reused when the same command runs again; ``backend="ray"`` or a
    ``ray_address`` sends the cells to Ray).
    """
    out_dir = Path(out_dir)
    cells = check_study(base, seeds)
    results = run_grid(
        sorted(cells, key=lambda c: c["epochs"] != 0),  # the random-encoder cells (one probe each) first
        run_study_cell,
        results_dir=out_dir / "cells",
        workers=workers,
        backend=backend,
        ray_address=ray_address,
        progress=progress,
        resolve=resolve_study_cell,
    )
    order = {c["name"]: i for i, c in enumerate(cells)}
    results = sorted(results, key=lambda r: order.get(r.get("name"), 0))
    rows = study_rows(results)
    ds = results[0]["dataset"]
    neg = "all" if base.negatives is None else base.negatives
    header = (
        f"SSL study on {ds['name']}: {ds['n_train']} train / {ds['n_test']} test images, "
        f"encoder {results[0]['encoder']['spec']}, {base.epochs} epochs (GLL: shared equally "
        f"among stages; training ends at a loss plateau: < {base.plateau_tol:g} relative decrease over "
        f"{base.plateau_window} epochs), batch {base.batch_size}, Adam lr "
        f"{'1e-4 (RF 1e-5, the authors)' if base.lr is None else base.lr}, tau {base.tau}, "
        f"delta {base.delta}, negatives {neg}, grad block {base.grad_block}, "
        f"views {base.views}, probe {base.probe} ({base.probe_epochs} epochs"
        f"{', standardised' if base.probe_standardize else ''}), "
        + (f"seed {base.seed} (one seed).\n" if not seeds or len(seeds) == 1 else
           f"mean ± s.e. over seeds {', '.join(map(str, seeds))}.\n")
    )
    table = study_table(rows, header)
    summary = {
        **result_header("study ssl", base),
        "dataset": ds,
        "rows": rows,
    }
    # the table, the JSON and the plot as one set (the JSON last)
    write_result(out_dir / "ssl_study.json", summary, {"plot": ("", plot_study(rows, ours=f"ours ({ds['name']})"))},
                 extra={"table": (out_dir / "ssl_study.md", table)})
    summary["table"] = table
    return summary
