"""Plots. Each function takes data (a result dict) and returns a matplotlib ``Figure``;
none runs an experiment. Save with :func:`dynsim.results.save_figure_atomic`."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def _title(result: dict[str, Any]) -> str:
    c = result.get("config", {})
    parts = [f"{c.get('data', '?')}", f"NpS {c.get('nps', '?')}", f"T={c.get('threshold')}",
             f"cap {c.get('max_steps')}"]
    if c.get("stream_every"):
        parts.append(f"stream k={c['stream_every']}")
    return ", ".join(parts)


def plot_accuracy(result: dict[str, Any]) -> Figure:
    """Test accuracy vs images seen, with the raw-pixel LinearSVC baseline as a dashed line."""
    fig, ax = plt.subplots(figsize=(6, 4))
    evaluated = [h for h in result["history"] if h.get("test_accuracy") is not None]
    xs = [h["images_seen"] for h in evaluated]
    ys = [100 * h["test_accuracy"] for h in evaluated]
    ax.plot(xs, ys, "o-", label="DSSM representation")
    raw = result.get("baseline", {}).get("raw_pixel_accuracy")
    if raw is not None:
        ax.axhline(100 * raw, ls="--", color="grey", label=f"raw pixels ({100 * raw:.2f} %)")
    ax.set_xlabel("training images seen")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(_title(result), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_iterations(result: dict[str, Any]) -> Figure:
    """Steps to settle for every training input (log scale), with a running mean."""
    its = np.asarray(result["iterations_per_input"], dtype=float)
    fig, ax = plt.subplots(figsize=(6, 4))
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
    ax.set_title(_title(result), fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
