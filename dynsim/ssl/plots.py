"""The SSL training figure: epoch loss, probe accuracy and effective rank against epochs."""

from __future__ import annotations

from typing import Any


def plot_training(result: dict[str, Any]):
    """Three panels from a ``run ssl`` result: hinge loss per image (log scale), probe test accuracy
    (with the random encoder's as a dashed line) and the embedding's effective rank (log scale),
    against epochs.

    Takes the result dict only (it runs nothing) and returns the matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    from dynsim.plots import STYLE

    rows = result["history"]
    final = result.get("final", {})
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
        epochs = [r["epoch"] + 1 for r in rows]
        axes[0].plot(epochs, [r["loss"] for r in rows], marker=".")
        axes[0].set_ylabel("hinge loss per image")
        axes[0].set_yscale("log")
        probed = [r for r in rows if r.get("probe_test_accuracy") is not None]
        pe = [r["epoch"] + 1 for r in probed]
        axes[1].plot(pe, [100 * r["probe_test_accuracy"] for r in probed], marker="o", label="trained")
        if final.get("random_encoder_accuracy") is not None:
            axes[1].axhline(100 * final["random_encoder_accuracy"], ls="--", color="0.4", label="random encoder")
        axes[1].set_ylabel("probe test accuracy (%)")
        axes[1].legend(loc="center right")
        axes[2].plot(pe, [r["effective_rank"] for r in probed], marker="o", label="trained")
        if final.get("random_encoder_effective_rank") is not None:
            axes[2].axhline(final["random_encoder_effective_rank"], ls="--", color="0.4", label="random encoder")
        axes[2].set_ylabel("effective rank of the embedding")
        axes[2].set_yscale("log")
        axes[2].legend(loc="best")
        for ax in axes:
            ax.set_xlabel("epoch")
        cfg = result.get("config", {})
        data = result.get("dataset", {}).get("name", "")
        fig.suptitle(f"{cfg.get('schedule', '')} / {cfg.get('rule', '')} on {data}")
        fig.tight_layout()
    return fig
