"""Accuracy/cost frontier plots (needs matplotlib: ``pip install 'dgate[plot]'``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from .. import _io
from ..errors import SpecError


def check_plot_path(path: str | Path) -> None:
    """Refuse a plot path in a directory that does not exist (dgate creates no directories for it)."""
    parent = Path(path).parent
    if not parent.is_dir():
        raise SpecError(f"--plot {path}: the directory {parent} does not exist; create it or choose another path")


def plot_frontiers(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    title: str = "",
    baseline: float | None = None,
    marks: Mapping[str, tuple[float, float]] | None = None,
) -> Path:
    """Draw accuracy (%) against cost ratio for each curve of ``(cost_ratio, accuracy)`` points.

    Args:
        curves: label -> points.
        path: the PNG to write (atomically).
        title: the plot title.
        baseline: the backbone's accuracy, drawn as a horizontal line.
        marks: label -> a single point to mark (e.g. the chosen operating point).
    """
    check_plot_path(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SpecError("--plot needs matplotlib; install it with: pip install 'dgate[plot]'") from exc
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, pts in curves.items():
        pts = sorted(pts)
        ax.plot([100 * c for c, _ in pts], [100 * a for _, a in pts], marker="o", markersize=3, label=label)
    for label, (c, a) in (marks or {}).items():
        ax.scatter([100 * c], [100 * a], s=60, marker="*", zorder=5, label=label)
    if baseline is not None:
        ax.axhline(100 * baseline, color="grey", linestyle="--", linewidth=1, label="backbone")
    ax.set_xlabel("mean cost per image (% of the backbone's MACs, gates included)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with _io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
