"""PNG plots of accuracy matrices and strategy summaries.

Figures are built with ``matplotlib.figure.Figure`` and rendered by the Agg
canvas, without pyplot, so no global figure state or GUI backend is involved
and nothing stays open after a call. Each function returns the written path
and creates its parent folder if needed. Matrices are ``(T, T)`` accuracy
matrices (``A[i, j]``: accuracy on experience ``j`` after training experience
``i``); summary frames have the columns of :data:`results.SUMMARY_COLUMNS`
(task-incremental) or :data:`results.CLASS_SUMMARY_COLUMNS` (class-incremental).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from avalanche_maskrkr.results import as_accuracy_matrix, strategy_slug

STRATEGY_BARS_FILE = "strategy_bars.png"
ACCURACY_VS_OVERHEAD_FILE = "accuracy_vs_overhead.png"
TASK_CURVES_FILE = "task_curves_{}.png"
ACCURACY_HEATMAP_FILE = "accuracy_heatmap_{}.png"

_WIDE_RANGE_RATIO = 100.0


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=120)
    return out


def _summary_columns(summary_df: pd.DataFrame, *columns: str) -> None:
    missing = [c for c in ("strategy", *columns) if c not in summary_df.columns]
    if missing:
        raise ValueError(f"summary frame lacks columns {missing}")
    if summary_df.empty:
        raise ValueError("summary frame has no rows")


def _accuracy_scores(summary_df: pd.DataFrame) -> tuple[tuple[str, str], ...]:
    """``(column, label)`` of the summary's accuracy scores, the headline first: average
    accuracy (task-incremental), or last and average incremental accuracy (class)."""
    if "avg_incremental_accuracy" in summary_df.columns:
        return (("last_accuracy", "last accuracy"),
                ("avg_incremental_accuracy", "average incremental accuracy"))
    return (("avg_accuracy", "average accuracy"),)


def plot_task_curves(
    matrix: np.ndarray, path: str | Path, title: str = "Accuracy per experience"
) -> Path:
    """One line per experience ``j``: ``A[i, j]`` against ``i`` for ``i >= j``."""
    array = as_accuracy_matrix(matrix)
    n = array.shape[0]
    fig = _new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    for j in range(n):
        ax.plot(np.arange(j, n), array[j:, j], marker="o", label=f"exp {j}")
    ax.set_xticks(range(n))
    ax.set_xlabel("after training experience")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title="evaluated", fontsize="small")
    return _save(fig, path)


def plot_strategy_bars(summary_df: pd.DataFrame, path: str | Path) -> Path:
    """One panel of bars per strategy for each accuracy score, then forgetting: average
    accuracy (task-incremental), or last and average incremental accuracy (class)."""
    scores = (*_accuracy_scores(summary_df), ("forgetting", "forgetting"))
    _summary_columns(summary_df, *(column for column, _ in scores))
    names = summary_df["strategy"].astype(str).tolist()
    fig = _new_figure(max(6.0, 1.2 * len(names) + 2.0) * len(scores) / 2, 3.8)
    panels = fig.subplots(1, len(scores))
    for ax, (column, label) in zip(panels, scores):
        bars = ax.bar(names, summary_df[column].to_numpy(dtype=float))
        ax.bar_label(bars, fmt="%.3f", fontsize="small")
        ax.set_title(label)
        ax.tick_params(axis="x", labelrotation=30)
        ax.margins(y=0.15)
    return _save(fig, path)


def plot_accuracy_heatmap(
    matrix: np.ndarray, path: str | Path, title: str = "Accuracy matrix"
) -> Path:
    """Heatmap of ``A`` on a fixed [0, 1] colour scale, each cell annotated."""
    array = as_accuracy_matrix(matrix)
    n = array.shape[0]
    fig = _new_figure(1.0 + 0.8 * n + 1.5, 1.0 + 0.8 * n)
    ax = fig.add_subplot()
    image = ax.imshow(array, vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(n):
        for j in range(n):
            if np.isfinite(array[i, j]):
                colour = "white" if array[i, j] < 0.5 else "black"
                ax.text(j, i, f"{array[i, j]:.2f}", ha="center", va="center", color=colour)
    ax.set_xticks(range(n), [f"exp {j}" for j in range(n)])
    ax.set_yticks(range(n), [f"after exp {i}" for i in range(n)])
    ax.set_xlabel("evaluated experience")
    ax.set_ylabel("trained up to")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="accuracy")
    return _save(fig, path)


def plot_accuracy_vs_overhead(summary_df: pd.DataFrame, path: str | Path) -> Path:
    """Scatter of the headline accuracy (average accuracy, or last accuracy for a
    class-incremental summary) against parameter overhead (%), one labelled point per
    strategy.

    When the positive overheads span a factor of 100 or more the x axis is
    logarithmic, switching to symlog (linear around 0) if an overhead is 0.
    """
    column, label = _accuracy_scores(summary_df)[0]
    _summary_columns(summary_df, column, "overhead_pct")
    overhead = summary_df["overhead_pct"].to_numpy(dtype=float)
    accuracy = summary_df[column].to_numpy(dtype=float)
    fig = _new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    ax.scatter(overhead, accuracy)
    for name, x, y in zip(summary_df["strategy"].astype(str), overhead, accuracy):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4))
    positive = overhead[overhead > 0]
    if positive.size >= 2 and positive.max() / positive.min() >= _WIDE_RANGE_RATIO:
        if positive.size == overhead.size:
            ax.set_xscale("log")
        else:
            ax.set_xscale("symlog", linthresh=float(positive.min()))
    ax.set_xlabel("parameter overhead (%)")
    ax.set_ylabel(label)
    ax.margins(0.15)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_all(
    out_dir: str | Path,
    summary_df: pd.DataFrame,
    matrices: Mapping[str, np.ndarray],
) -> list[Path]:
    """Write every plot into ``out_dir`` and return the paths.

    File names: ``strategy_bars.png``, ``accuracy_vs_overhead.png``, then per
    strategy ``task_curves_<slug>.png`` and ``accuracy_heatmap_<slug>.png``,
    where ``<slug>`` is :func:`results.strategy_slug` of the matrix key.
    """
    out = Path(out_dir)
    paths = [
        plot_strategy_bars(summary_df, out / STRATEGY_BARS_FILE),
        plot_accuracy_vs_overhead(summary_df, out / ACCURACY_VS_OVERHEAD_FILE),
    ]
    for name, matrix in matrices.items():
        slug = strategy_slug(name)
        paths.append(
            plot_task_curves(
                matrix, out / TASK_CURVES_FILE.format(slug), f"{name}: accuracy per experience"
            )
        )
        paths.append(
            plot_accuracy_heatmap(
                matrix, out / ACCURACY_HEATMAP_FILE.format(slug), f"{name}: accuracy matrix"
            )
        )
    return paths
