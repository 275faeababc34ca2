"""The ``graphopt tune`` front as a PNG: accuracy against size, and against latency.

Rules:

1. Two panels side by side: x = size on disk (MB), and x = latency relative to the original
   (median ratio, interleaved runs); y = 1 − min cosine on a log scale, inverted so that up is
   more accurate. Points without a measured latency appear only in the size panel.
2. Every evaluated candidate is a grey dot; the candidates on each panel's Pareto front are
   joined by a line in front order; the original is a black star (its error, zero, is drawn at
   the panel's floor and labelled); the chosen candidate is ringed in red; the accuracy bar is
   a dashed horizontal line.
3. matplotlib is imported inside :func:`plot_front` with the non-interactive ``Agg`` backend, so
   importing graphopt never pulls in a GUI toolkit. The file is written atomically (temp file +
   rename).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_MB = 1e6


@dataclass(frozen=True)
class PlotPoint:
    """One candidate as the plot needs it."""

    label: str
    cosine: float
    size_bytes: int
    latency_ratio: float | None
    on_size_front: bool
    on_latency_front: bool
    chosen: bool = False


def plot_front(
    path: Path,
    points: Sequence[PlotPoint],
    *,
    original_bytes: int,
    min_cosine: float,
    title: str,
) -> Path:
    """Draw the two panels (module rules) into ``path`` as PNG; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    errors = [1.0 - point.cosine for point in points if 1.0 - point.cosine > 0]
    bar_error = 1.0 - min_cosine
    floor = min([*errors, bar_error if bar_error > 0 else 1.0, 1e-3]) / 3.0
    figure, axes = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    panels = (
        (axes[0], "size on disk (MB)", lambda p: p.size_bytes / _MB, "on_size_front"),
        (axes[1], "latency / original (median)", lambda p: p.latency_ratio, "on_latency_front"),
    )
    for axis, xlabel, x_of, front_flag in panels:
        shown = [p for p in points if x_of(p) is not None]
        axis.scatter(
            [x_of(p) for p in shown],
            [max(1.0 - p.cosine, floor) for p in shown],
            s=18,
            color="0.65",
            label="candidates",
            zorder=2,
        )
        front = sorted((p for p in shown if getattr(p, front_flag)), key=lambda p: x_of(p))
        if front:
            axis.plot(
                [x_of(p) for p in front],
                [max(1.0 - p.cosine, floor) for p in front],
                "o-",
                color="tab:blue",
                markersize=5,
                label="Pareto front",
                zorder=3,
            )
        original_x = original_bytes / _MB if front_flag == "on_size_front" else 1.0
        axis.scatter(
            [original_x], [floor], marker="*", s=160, color="black", label="original", zorder=4
        )
        axis.annotate("original", (original_x, floor), textcoords="offset points", xytext=(6, 6))
        for point in shown:
            if point.chosen:
                axis.scatter(
                    [x_of(point)],
                    [max(1.0 - point.cosine, floor)],
                    s=180,
                    facecolors="none",
                    edgecolors="red",
                    linewidths=2,
                    label="chosen",
                    zorder=5,
                )
        if bar_error > 0:
            axis.axhline(
                bar_error, linestyle="--", color="tab:red", linewidth=1, label=f"bar {min_cosine:g}"
            )
        axis.set_yscale("log")
        axis.invert_yaxis()
        axis.set_xlabel(xlabel)
        axis.set_ylabel("1 − min cosine (log; up = more accurate)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(loc="best", fontsize=8)
        if not shown:
            axis.text(0.5, 0.5, "no latency measured", transform=axis.transAxes, ha="center")
    axes[0].set_title("accuracy vs size")
    axes[1].set_title("accuracy vs latency")
    figure.suptitle(title)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temp = Path(name)
    try:
        figure.savefig(temp, format="png", dpi=110)
        os.replace(temp, path)
    finally:
        plt.close(figure)
        temp.unlink(missing_ok=True)
    logger.info("wrote %s", path)
    return path
