"""Plots. Each function takes data (a result dict) and returns a matplotlib ``Figure``;
none runs an experiment. Save with :func:`dynsim.results.write_result` (PNG, PDF or SVG:
``--plot-format``) or :func:`dynsim.results.save_figure_atomic`.

Every figure is drawn in one house style (:data:`STYLE`): the Okabe–Ito colour-blind-safe
palette (Okabe & Ito 2008, "Color Universal Design"), no text smaller than 8 pt at the
figure's own (printed) size, and no point labels that could overlap (legends instead).
Where several seeds are given, curves are their mean with a band of ± one standard error.
"""

from __future__ import annotations

import functools
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.lines  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
from cycler import cycler  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

# Okabe & Ito (2008): distinguishable with every common colour-vision deficiency
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
MIN_FONT_PT = 8
STYLE = {
    "axes.prop_cycle": cycler(color=OKABE_ITO),
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "xtick.labelsize": MIN_FONT_PT,
    "ytick.labelsize": MIN_FONT_PT,
    "legend.fontsize": MIN_FONT_PT,
    "legend.title_fontsize": MIN_FONT_PT,
    "figure.titlesize": 9,
    "image.cmap": "cividis",  # perceptually uniform and colour-blind safe
    "savefig.bbox": "tight",
}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def styled(fn):
    """Draw ``fn``'s figure in :data:`STYLE` (colours ``C0``... are the Okabe–Ito palette)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with plt.rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper


def mean_and_se(rows: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error (``std(ddof=1)/sqrt(n)``, 0 for one seed) over seeds, per column
    of ``rows`` (seeds × points); columns missing in some seeds use the seeds that have them."""
    n = max(len(r) for r in rows)
    a = np.full((len(rows), n), np.nan)
    for i, r in enumerate(rows):
        a[i, : len(r)] = r
    count = np.sum(np.isfinite(a), axis=0)
    mean = np.nanmean(a, axis=0)
    centred = np.where(np.isfinite(a), a - mean, 0.0)
    var = np.sum(centred**2, axis=0) / np.maximum(count - 1, 1)
    se = np.where(count > 1, np.sqrt(var / np.maximum(count, 1)), 0.0)
    return mean, se


def _title(result: dict[str, Any]) -> str:
    c = result.get("config", {})
    parts = [f"{c.get('data', '?')}", f"NpS {c.get('nps', '?')}", f"T={c.get('threshold')}",
             f"cap {c.get('max_steps')}"]
    if c.get("stream_every"):
        parts.append(f"stream k={c['stream_every']}")
    return ", ".join(parts)


@styled
def plot_accuracy(result: dict[str, Any] | list[dict[str, Any]]) -> Figure:
    """Test accuracy vs images seen, with the raw-pixel LinearSVC baseline as a dashed line.

    ``result``: one run's result, or a list of results of the same run with different seeds:
    then the mean over seeds with a band of ± one standard error.
    """
    results = result if isinstance(result, list) else [result]
    result = results[0]
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    per_seed = [[h for h in r["history"] if h.get("test_accuracy") is not None] for r in results]
    xs = [h["images_seen"] for h in max(per_seed, key=len)]
    mean, se = mean_and_se([[100 * h["test_accuracy"] for h in ev] for ev in per_seed]) if xs else ([], [])
    label = "DSSM representation" + (f" (mean ± SE, {len(results)} seeds)" if len(results) > 1 else "")
    ax.plot(xs, mean, "o-", label=label)
    if len(results) > 1 and len(xs):
        ax.fill_between(xs, mean - se, mean + se, alpha=0.25, color="C0", lw=0)
    raw = result.get("baseline", {}).get("raw_pixel_accuracy")
    if raw is not None:
        ax.axhline(100 * raw, ls="--", color="grey", label=f"raw pixels ({100 * raw:.2f} %)")
    ax.set_xlabel("training images seen")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(_title(result))
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


@styled
def plot_iterations(result: dict[str, Any]) -> Figure:
    """Steps to settle for every training input (log scale), with a running mean."""
    its = np.asarray(result["iterations_per_input"], dtype=float)
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    idx = np.arange(1, its.size + 1)
    ax.plot(idx, np.maximum(its, 1), ".", ms=2, alpha=0.4, label="per input")
    if its.size:
        w = max(1, min(200, its.size // 20))
        run = np.convolve(its, np.ones(w) / w, mode="valid")
        ax.plot(idx[w - 1 :], np.maximum(run, 1), "-", color="C3", label=f"running mean ({w})")
    cap = result.get("config", {}).get("max_steps")
    if cap:
        ax.axhline(cap, ls=":", color="k", label=f"cap {cap}")
    ax.set_yscale("log")
    ax.set_xlabel("training input")
    ax.set_ylabel("steps to settle")
    ax.set_title(_title(result))
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return fig


def _solver_family(spec: str) -> str:
    return spec.split(",", 1)[0]


@styled
def plot_solver_pareto(result: dict[str, Any]) -> Figure:
    """``dynsim bench solvers``: wall time (left) and field evaluations (right) per input vs
    the distance to the reference fixed point, one row per network state, one marker per
    setting (colour = solver family, shape = setting within it; hollow: not every input
    settled), named in the legend."""
    states = list(result["states"])
    fig, axes = plt.subplots(len(states), 2, figsize=(11, 3.6 * len(states) + 1.2), squeeze=False,
                             layout="constrained")
    specs = list(dict.fromkeys(r["solver"] for b in result["states"].values() for r in b["rows"]))
    families = list(dict.fromkeys(_solver_family(s) for s in specs))
    style = {}
    for spec in specs:
        fam = _solver_family(spec)
        k = sum(_solver_family(s) == fam for s in style)
        style[spec] = (f"C{families.index(fam) % len(OKABE_ITO)}", MARKERS[k % len(MARKERS)])
    for row_axes, state in zip(axes, states, strict=True):
        for r in result["states"][state]["rows"]:
            colour, marker = style[r["solver"]]
            y = max(r["distance_max"], 1e-12)
            full = r["fraction_settled"] >= 1
            for ax, key in zip(row_axes, ("ms_per_input", "evals_per_input"), strict=True):
                ax.scatter(r[key], y, marker=marker, s=40, edgecolors=colour,
                           facecolors=colour if full else "none", linewidths=1.2)
        row_axes[0].set_ylabel(f"{state} network\nmax ‖u − u*‖ / ‖u*‖ at stop")
        row_axes[0].set_xlabel("wall time per input (ms)")
        row_axes[1].set_xlabel("vector-field evaluations per input")
        for ax in row_axes:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.grid(alpha=0.3, which="both")
    handles = [matplotlib.lines.Line2D([], [], ls="", marker=m, color=c, label=spec)
               for spec, (c, m) in style.items()]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(3, len(handles)), frameon=False)
    c = result["config"]
    fig.suptitle(f"solvers on {result['data']['name']}: T = {c['threshold']}, batch {c['batch_size']}, "
                 f"{result['data']['n_inputs']} inputs")
    return fig


@styled
def plot_trajectories(result: dict[str, Any]) -> Figure:
    """``dynsim plot trajectories``: per input, the selected units vs step (top) and the
    residual ``‖du/ds‖/‖u‖`` vs step on a log scale (bottom), one colour per solver."""
    inputs = result["inputs"]
    fig, axes = plt.subplots(2, len(inputs), figsize=(5.5 * len(inputs), 7), squeeze=False, sharex="col",
                             layout="constrained")
    for j, item in enumerate(inputs):
        top, bottom = axes[0, j], axes[1, j]
        for k, run in enumerate(item["runs"]):
            steps = np.maximum(np.asarray(run["steps"], dtype=float), 0) + 1
            u = np.asarray(run["u"], dtype=float)
            top.plot(steps, u, "-", color=f"C{k}", lw=1, alpha=0.8)
            bottom.plot(steps, np.maximum(np.asarray(run["residual"], dtype=float), 1e-16), ".-",
                        color=f"C{k}", ms=3, lw=1, label=f"{run['solver']} ({run['n_evals']} evals)")
        for v in item["u_ref"]:
            top.axhline(v, ls=":", color="grey", lw=0.8)
        thr = result["config"].get("threshold")
        if thr:
            bottom.axhline(thr, ls="--", color="k", lw=0.8, label=f"T = {thr}")
        top.set_title(f"test input {item['index']} (label {item['label']}), units {item['units']}")
        top.set_ylabel("u (dotted: reference u*)")
        bottom.set_ylabel("‖du/ds‖ / ‖u‖")
        bottom.set_xlabel("solver step + 1")
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.grid(alpha=0.3, which="both")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        top.tick_params(labelbottom=False)  # the column shares the bottom panel's x axis
        bottom.set_yscale("log")
        bottom.legend()
    # room between the panels, so that the tick labels at their edges do not touch
    fig.get_layout_engine().set(h_pad=0.15, w_pad=0.15, hspace=0.06, wspace=0.08)
    return fig


def _cell_label(cell: dict[str, Any]) -> str:
    stream = cell.get("stream_every")
    return f"T={cell['threshold']:g}, cap {cell['max_steps']}" + (f", stream {stream}" if stream else "")


@styled
def plot_convergence_accuracy(study: dict[str, Any]) -> Figure:
    """Test accuracy vs epoch, one line per grid setting (colour = T, line style = cap), one
    panel per streaming setting (the reproduction report's Figure 1); with several seeds per
    setting the line is their mean and the band ± one standard error. The legend names the
    colours and the line styles once each, below the panels."""
    cells = study["cells"]
    streams = sorted({c["cell"].get("stream_every") or 0 for c in cells})
    ts = sorted({c["cell"]["threshold"] for c in cells}, reverse=True)
    caps = sorted({c["cell"]["max_steps"] or 10**9 for c in cells})
    styles = ["-", "--", "-.", ":", (0, (1, 3))]
    groups: dict[tuple, list] = {}
    for c in cells:
        cell = c["cell"]
        groups.setdefault((cell["threshold"], cell["max_steps"], cell.get("stream_every") or 0), []).append(c)
    fig, axes = plt.subplots(1, len(streams), figsize=(5 * len(streams), 4.5), squeeze=False, sharey=True,
                             layout="constrained")
    for ax, stream in zip(axes[0], streams, strict=True):
        for (t, cap, s), runs in groups.items():
            if s != stream:
                continue
            evs = [[h for h in c["history"] if h.get("test_accuracy") is not None] for c in runs]
            xs = [h["epoch"] + 1 for h in evs[0]]
            acc = 100 * np.array([[h["test_accuracy"] for h in ev] for ev in evs])
            colour = f"C{ts.index(t) % len(OKABE_ITO)}"
            ax.plot(xs, acc.mean(0), marker="o", ms=3, color=colour, ls=styles[caps.index(cap or 10**9) % len(styles)])
            if len(runs) > 1:
                se = acc.std(0, ddof=1) / np.sqrt(len(runs))
                ax.fill_between(xs, acc.mean(0) - se, acc.mean(0) + se, color=colour, alpha=0.2, lw=0)
        raw = cells[0].get("baseline", {}).get("raw_pixel_accuracy")
        if raw is not None:
            ax.axhline(100 * raw, color="grey", ls="--", lw=0.8)
        ax.set_title("streaming off" if not stream else f"streaming, input switches every {stream} steps")
        ax.set_xlabel("epoch")
        last = max((h["epoch"] + 1 for c in cells for h in c["history"]), default=1)
        ax.set_xlim(0.5, last + 0.5)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("test accuracy (%)")
    Line = matplotlib.lines.Line2D
    handles = [Line([], [], color=f"C{i % len(OKABE_ITO)}", label=f"T = {t:g}") for i, t in enumerate(ts)]
    handles += [Line([], [], color="k", ls=styles[i % len(styles)], label=f"cap {_cap(cap)}")
                for i, cap in enumerate(caps)]
    if cells and cells[0].get("baseline", {}).get("raw_pixel_accuracy") is not None:
        handles.append(Line([], [], color="grey", ls="--", lw=0.8, label="raw pixels"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), frameon=False)
    return fig


def _cap(cap: int | None) -> str:
    return "none" if cap is None or cap >= 10**9 else str(cap)


@styled
def plot_convergence_heatmap(study: dict[str, Any]) -> Figure:
    """Final test accuracy as a heat map over threshold T (rows) × step cap (columns), one
    panel per streaming setting; each cell shows its value (empty: not evaluated)."""
    cells = study["cells"]
    streams = sorted({c["cell"].get("stream_every") or 0 for c in cells})
    ts = sorted({c["cell"]["threshold"] for c in cells}, reverse=True)
    caps = sorted({c["cell"]["max_steps"] or 10**9 for c in cells})
    grids = {s: np.full((len(ts), len(caps)), np.nan) for s in streams}
    for c in cells:
        acc = c["final"].get("test_accuracy")
        if acc is not None:
            cell = c["cell"]
            row, col = ts.index(cell["threshold"]), caps.index(cell["max_steps"] or 10**9)
            grids[cell.get("stream_every") or 0][row, col] = 100 * acc
    values = np.concatenate([g.ravel() for g in grids.values()]) if grids else np.array([])
    finite = values[np.isfinite(values)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 100.0)
    width = 1.0 + 0.9 * len(caps)
    fig, axes = plt.subplots(1, len(streams), figsize=(width * len(streams) + 1.2, 0.6 * len(ts) + 1.6),
                             squeeze=False, layout="constrained")
    image = None
    for ax, stream in zip(axes[0], streams, strict=True):
        grid = grids[stream]
        image = ax.imshow(grid, vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1, aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                dark = (v - vmin) / max(vmax - vmin, 1e-9) < 0.5
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="w" if dark else "k")
        ax.set_xticks(range(len(caps)), [_cap(c) for c in caps])
        ax.set_yticks(range(len(ts)), [f"{t:g}" for t in ts])
        ax.set_xlabel("step cap")
        ax.set_title("streaming off" if not stream else f"streaming every {stream} steps")
    axes[0, 0].set_ylabel("threshold T")
    if image is not None:
        fig.colorbar(image, ax=axes[0, -1], label="test accuracy (%)")
    return fig


@styled
def plot_convergence_iterations(study: dict[str, Any], max_cells: int = 8) -> Figure:
    """Steps to settle per training input (log scale) for up to ``max_cells`` cells: the
    largest cap of each (T, streaming) pair (the reproduction report's Figure 2)."""
    chosen: dict[tuple, dict] = {}
    for c in study["cells"]:
        cell = c["cell"]
        key = (cell["threshold"], cell.get("stream_every"))
        if key not in chosen or (cell["max_steps"] or 10**9) > (chosen[key]["cell"]["max_steps"] or 10**9):
            chosen[key] = c
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for k, c in enumerate(list(chosen.values())[:max_cells]):
        its = np.maximum(np.asarray(c["iterations_per_input"], dtype=float), 1)
        x = np.arange(its.size) * c.get("iterations_stride", 1) + 1
        w = max(1, min(100, its.size // 20))
        ax.plot(x, its, ".", ms=1.5, alpha=0.25, color=f"C{k}")
        if its.size >= w:
            ax.plot(x[w - 1 :], np.convolve(its, np.ones(w) / w, mode="valid"), "-", color=f"C{k}",
                    label=_cell_label(c["cell"]))
    ax.set_yscale("log")
    ax.set_xlabel("training input")
    ax.set_ylabel("steps to settle (dots: per input, line: running mean)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return fig


def _pareto_front(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    order = np.argsort(xs)
    front, best = [], -np.inf
    for i in order:
        if ys[i] > best:
            front.append(i)
            best = ys[i]
    return np.asarray(front, dtype=int)


@styled
def plot_convergence_pareto(study: dict[str, Any]) -> Figure:
    """Final test accuracy vs training cost (seconds, field evaluations), Pareto front drawn;
    colour = threshold T, marker = step cap, hollow = streaming (named in the legend)."""
    cells = [c for c in study["cells"] if c["final"].get("test_accuracy") is not None]
    ts = sorted({c["cell"]["threshold"] for c in cells}, reverse=True)
    caps = sorted({c["cell"]["max_steps"] or 10**9 for c in cells})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True, layout="constrained")
    acc = np.asarray([100 * c["final"]["test_accuracy"] for c in cells])
    for ax, key, label in ((axes[0], "train_seconds", "training time (s)"),
                           (axes[1], "train_evals", "vector-field evaluations in training")):
        xs = np.asarray([max(c["final"]["train_seconds"] if key == "train_seconds" else c["train_evals"], 1e-9)
                         for c in cells], dtype=float)
        for i, c in enumerate(cells):
            colour = f"C{ts.index(c['cell']['threshold']) % len(OKABE_ITO)}"
            marker = MARKERS[caps.index(c["cell"]["max_steps"] or 10**9) % len(MARKERS)]
            stream = bool(c["cell"].get("stream_every"))
            ax.scatter(xs[i], acc[i], marker=marker, s=36, edgecolors=colour,
                       facecolors="none" if stream else colour, linewidths=1.2)
        if len(cells):
            front = _pareto_front(xs, acc)
            ax.plot(xs[front], acc[front], "k-", lw=1, alpha=0.6)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels collide
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("final test accuracy (%)")
    Line = matplotlib.lines.Line2D
    handles = [Line([], [], ls="", marker="o", color=f"C{i % len(OKABE_ITO)}", label=f"T = {t:g}")
               for i, t in enumerate(ts)]
    handles += [Line([], [], ls="", marker=MARKERS[i % len(MARKERS)], color="grey", label=f"cap {_cap(cap)}")
                for i, cap in enumerate(caps)]
    handles += [Line([], [], ls="", marker="o", mfc="none", color="grey", label="streaming"),
                Line([], [], color="k", lw=1, alpha=0.6, label="Pareto front")]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), frameon=False)
    return fig


@styled
def plot_seed_accuracy(result: dict[str, Any]) -> Figure:
    """``run dssm --seeds``: test accuracy vs images seen, mean ± standard error over the seeds
    (band), each seed thin, and the raw-pixel baseline dashed."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in result["per_seed"]:
        ax.plot([h["images_seen"] for h in r["history"]], [100 * h["test_accuracy"] for h in r["history"]],
                "-", lw=0.7, alpha=0.5, color="C0")
    rows = result["history_mean"]
    xs = np.array([h["images_seen"] for h in rows], dtype=float)
    m = np.array([100 * h["test_accuracy_mean"] for h in rows])
    se = np.array([100 * (h["test_accuracy_sem"] or 0.0) for h in rows])
    n = result["final"]["n_seeds"]
    ax.plot(xs, m, "o-", color="C0", label=f"DSSM, mean ± s.e. over {n} seed{'s' if n > 1 else ''}")
    ax.fill_between(xs, m - se, m + se, color="C0", alpha=0.25, lw=0)
    raw = result["final"].get("raw_pixel_accuracy")
    if isinstance(raw, float):
        ax.axhline(100 * raw, ls="--", color="grey", label=f"raw pixels ({100 * raw:.2f} %)")
    ax.set_xlabel("training images seen")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(_title(result), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


@styled
def plot_repro_accuracy(study: dict[str, Any], panels: tuple[tuple[str, ...], tuple[str, ...]]) -> Figure:
    """``study repro`` Figure 1: test accuracy vs epochs, left the thresholds and batching, right
    the caps and streaming (the setting names of each panel: ``panels``; mean ± s.e. band where a
    setting has several seeds), raw pixels dashed."""
    settings = study["settings"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    for ax, names, title in zip(axes, panels, ("thresholds and batching", "step caps and streaming"), strict=True):
        for i, name in enumerate(n for n in names if n in settings):
            s = settings[name]
            m = 100 * np.asarray(s["test_accuracy_mean"])
            n = len(s["seeds"])
            label = f"{name} ({'mean ± s.e., ' + str(n) + ' seeds' if n > 1 else 'one seed'})"
            ax.plot(s["epochs"], m, "o-", ms=3, color=f"C{i}", label=label)
            if s["test_accuracy_sem"] is not None:
                se = 100 * np.asarray(s["test_accuracy_sem"])
                ax.fill_between(s["epochs"], m - se, m + se, color=f"C{i}", alpha=0.25, lw=0)
        raws = [settings[n]["raw_pixel_accuracy"] for n in names if n in settings]
        if raws:
            ax.axhline(100 * raws[0], ls="--", color="grey", label=f"raw pixels ({100 * raws[0]:.2f} %)")
        ax.set_xlabel("epoch (1000 images each)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if names is panels[1]:  # between the capped runs near 85 % and the one-step runs below 70 %
            ax.legend(fontsize=8, loc="upper right", bbox_to_anchor=(1.0, 0.8))
        else:
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"{study['config']['data']}: the reproduction report's settings", fontsize=10)
    fig.tight_layout()
    return fig


@styled
def plot_repro_iterations(study: dict[str, Any], names: tuple[str, ...]) -> Figure:
    """``study repro`` Figure 2: Euler iterations to settle for each training input (log scale)
    of the settings ``names`` (T = 1e-4 vs T = 1e-2), with running means."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, name in enumerate(names):
        runs = [c for c in study["cells"] if c["setting"] == name and "iterations_per_input" in c]
        if not runs:
            continue
        its = np.asarray(runs[0]["iterations_per_input"], dtype=float)
        idx = np.arange(1, its.size + 1)
        step = max(1, its.size // 20000)  # at most ~20k dots
        ax.plot(idx[::step], np.maximum(its[::step], 1), ".", ms=1.5, alpha=0.25, color=f"C{i}")
        w = max(1, min(1000, its.size // 50))
        run = np.convolve(its, np.ones(w) / w, mode="valid")
        ax.plot(idx[w - 1:], np.maximum(run, 1), "-", color=f"C{i}", lw=1.5,
                label=f"{name} (seed {runs[0]['seed']}; running mean of {w})")
    ax.set_yscale("log")
    ax.set_xlabel("training input")
    ax.set_ylabel("Euler iterations to settle")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("iterations to settle per training input", fontsize=10)
    fig.tight_layout()
    return fig


def plot_deep_study(study: dict[str, Any]) -> Figure:
    """``dynsim study deep``: each layer's readout accuracy (mean ± s.e. over seeds) per setting,
    the raw-pixel baseline (dashed), and each layer's mean |r| (saturation, right panel)."""
    rows = study["rows"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['layers']}L {'reset' if not r['stream_every'] else 'stream'} cap {r['cap']}" for r in rows]
    depth = max(r["layers"] for r in rows)
    width = 0.8 / depth
    for p in range(depth):
        xs = [i + (p - (depth - 1) / 2) * width for i, r in enumerate(rows) if r["layers"] > p]
        ys = [100 * r["layer_accuracy"][p] for r in rows if r["layers"] > p]
        es = [100 * (r["layer_accuracy_se"][p] or 0) for r in rows if r["layers"] > p]
        ax.bar(xs, ys, width, yerr=es, color=f"C{p}", label=f"layer {p + 1}", capsize=2)
        acts = [(i, r["layer_mean_abs_rate"][p]) for i, r in enumerate(rows)
                if r["layers"] > p and r.get("layer_mean_abs_rate")]
        if acts:
            ax2.plot([a[0] for a in acts], [a[1] for a in acts], "o", color=f"C{p}", label=f"layer {p + 1}")
    raw = [100 * r["raw_pixel_accuracy"] for r in rows]
    ax.axhline(sum(raw) / len(raw), color="grey", ls="--", lw=0.8, label="raw pixels")
    for a in (ax, ax2):
        a.set_xticks(range(len(rows)))
        a.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    ax.set_ylabel("test accuracy (%)")
    ax2.set_ylabel("mean |r| over training (1 = saturated)")
    ax2.set_ylim(0, 1)
    fig.tight_layout()
    return fig


def plot_nps_study(study: dict[str, Any]) -> Figure:
    """``dynsim study nps``: test error vs NpS — ours (mean ± s.e. over seeds, on ``study['data']``)
    beside the published MNIST errors (Obeid et al. 2019), each with its data set in the label, and
    the raw-pixel baseline; right: seconds and peak memory per cell."""
    rows = study["rows"]
    data = study.get("data", "ours")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ns = [r["nps"] for r in rows]
    err = [100 * (1 - r["test_accuracy"]) for r in rows]
    se = [100 * (r["test_accuracy_se"] or 0) for r in rows]
    ax.errorbar(ns, err, yerr=se, marker="o", color="C0", capsize=3, label=f"{data} (dynsim, mean ± s.e.)")
    raw = [100 * (1 - r["raw_pixel_accuracy"]) for r in rows]
    ax.axhline(sum(raw) / len(raw), color="C0", ls="--", lw=0.8, label=f"{data} raw pixels, same readout")
    pub = study["published"]["test_error_percent"]
    pn = sorted(int(k) for k in pub)
    ax.plot(pn, [pub[str(k)] for k in pn], marker="s", color="C1",
            label="MNIST (Obeid et al. 2019, published)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sorted(set(ns) | set(pn)))
    ax.set_xticklabels([str(n) for n in sorted(set(ns) | set(pn))])
    ax.set_xlabel("neurons per site (NpS)")
    ax.set_ylabel("test error (%)")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_yticks([1, 1.5, 2, 3, 4, 6, 8, 10, 15, 20, 30])
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax2.plot(ns, [r["wall_seconds"] for r in rows], marker="o", color="C2", label="seconds per cell")
    ax2.set_xscale("log")
    ax2.set_xticks(ns)
    ax2.set_xticklabels([str(n) for n in ns])
    ax2.xaxis.set_minor_formatter(NullFormatter())
    ax2.set_xlabel("neurons per site (NpS)")
    ax2.set_ylabel("seconds per cell (train + readout)")
    ax3 = ax2.twinx()
    ax3.plot(ns, [r["peak_rss_gib"] for r in rows], marker="^", color="C3", label="peak memory (GiB)")
    ax3.set_ylabel("peak resident memory (GiB)")
    ax2.legend(handles=ax2.get_lines() + ax3.get_lines(), fontsize=8, loc="upper left")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return fig
