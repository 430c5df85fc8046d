"""Continual-learning scores from an accuracy matrix, and result tables.

All functions take the accuracy matrix ``A`` of shape ``(T, T)``, where
``A[i, j]`` is the accuracy on test experience ``j`` after training experience
``i`` (see :func:`avalanche_maskrkr.evaluation.collect_accuracy_matrix`); the
class-incremental scores also take the test-set sizes ``n_j`` of the experiences.
Two kinds of summary table: task-incremental (:data:`SUMMARY_COLUMNS`) and
class-incremental (:data:`CLASS_SUMMARY_COLUMNS`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

SUMMARY_COLUMNS = (
    "strategy",
    "avg_accuracy",
    "forgetting",
    "total_params",
    "overhead_pct",
    "train_seconds",
)
CLASS_SUMMARY_COLUMNS = (
    "strategy",
    "avg_incremental_accuracy",
    "last_accuracy",
    "forgetting",
    "task_id_accuracy",
    "total_params",
    "overhead_pct",
    "train_seconds",
)
ROW_LABEL = "after exp {}"
COLUMN_LABEL = "exp {}"


def as_accuracy_matrix(matrix: np.ndarray | pd.DataFrame) -> np.ndarray:
    """``matrix`` as a float array, checked to be ``(T, T)`` with ``T >= 1``."""
    array = np.asarray(matrix, dtype=float)
    if array.ndim != 2 or array.shape[0] != array.shape[1] or array.shape[0] == 0:
        raise ValueError(f"expected a non-empty square matrix, got shape {array.shape}")
    return array


def strategy_slug(strategy: str) -> str:
    """Lower-cased ``strategy`` usable in a file name (``"Mask-RKR"`` -> ``"mask-rkr"``)."""
    slug = re.sub(r"[^a-z0-9_-]+", "_", strategy.strip().lower()).strip("_")
    if not slug:
        raise ValueError(f"strategy name {strategy!r} has no usable characters")
    return slug


def accuracy_matrix_frame(matrix: np.ndarray) -> pd.DataFrame:
    """``A`` as a ``(T, T)`` frame; rows ``"after exp i"``, columns ``"exp j"``."""
    array = as_accuracy_matrix(matrix)
    n = array.shape[0]
    return pd.DataFrame(
        array,
        index=pd.Index([ROW_LABEL.format(i) for i in range(n)], name="trained"),
        columns=pd.Index([COLUMN_LABEL.format(j) for j in range(n)], name="evaluated"),
    )


def average_accuracy(matrix: np.ndarray) -> float:
    """Mean accuracy over all ``T`` experiences after the last one: ``mean(A[T-1, :])``."""
    return float(as_accuracy_matrix(matrix)[-1].mean())


def forgetting(matrix: np.ndarray) -> float:
    """Mean over ``j < T-1`` of ``max_{j <= i <= T-2} A[i, j] - A[T-1, j]``; 0 if ``T == 1``.

    This is the usual definition (Chaudhry et al., 2018). Avalanche's
    ``StreamForgetting`` uses ``A[j, j]`` instead of the column maximum, i.e.
    it equals ``-bwt(matrix)``; the two agree whenever no experience's accuracy
    rose above its value right after being trained.
    """
    array = as_accuracy_matrix(matrix)
    last = array.shape[0] - 1
    if last == 0:
        return 0.0
    drops = [array[j:last, j].max() - array[last, j] for j in range(last)]
    return float(np.mean(drops))


def bwt(matrix: np.ndarray) -> float:
    """Backward transfer: mean over ``j < T-1`` of ``A[T-1, j] - A[j, j]``; 0 if ``T == 1``."""
    array = as_accuracy_matrix(matrix)
    last = array.shape[0] - 1
    if last == 0:
        return 0.0
    return float(np.mean(array[last, :last] - np.diag(array)[:last]))


def seen_class_accuracies(matrix: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """``(T,)`` accuracy on all classes seen so far after each stage: entry ``i`` is
    the mean of ``A[i, :i+1]`` weighted by the test-set sizes ``sizes[:i+1]``, i.e.
    the accuracy over the union of those test sets."""
    array = as_accuracy_matrix(matrix)
    weights = np.asarray(sizes, dtype=float)
    if weights.shape != (array.shape[0],) or (weights <= 0).any():
        raise ValueError(
            f"expected {array.shape[0]} positive test-set sizes, got {list(sizes)}"
        )
    return np.array(
        [np.average(array[i, : i + 1], weights=weights[: i + 1]) for i in range(len(array))]
    )


def average_incremental_accuracy(matrix: np.ndarray, sizes: Sequence[int]) -> float:
    """Mean over the ``T`` stages of :func:`seen_class_accuracies` (as PyCIL and
    LAMDA-PILOT report it)."""
    return float(seen_class_accuracies(matrix, sizes).mean())


def last_accuracy(matrix: np.ndarray, sizes: Sequence[int]) -> float:
    """Accuracy on all classes after the last stage: the size-weighted mean of ``A[T-1, :]``."""
    return float(seen_class_accuracies(matrix, sizes)[-1])


def _cost_fields(total_params: int, overhead_pct: float, train_seconds: float
                 ) -> dict[str, Any]:
    return {
        "total_params": int(total_params),
        "overhead_pct": float(overhead_pct),
        "train_seconds": float(train_seconds),
    }


def summary_row(
    strategy: str,
    matrix: np.ndarray,
    total_params: int,
    overhead_pct: float,
    train_seconds: float,
) -> dict[str, Any]:
    """One task-incremental summary record with the keys of ``SUMMARY_COLUMNS``, in order."""
    return {
        "strategy": strategy.lower(),
        "avg_accuracy": average_accuracy(matrix),
        "forgetting": forgetting(matrix),
        **_cost_fields(total_params, overhead_pct, train_seconds),
    }


def class_summary_row(
    strategy: str,
    matrix: np.ndarray,
    sizes: Sequence[int],
    total_params: int,
    overhead_pct: float,
    train_seconds: float,
    task_id_accuracy: float | None = None,
) -> dict[str, Any]:
    """One class-incremental summary record with the keys of ``CLASS_SUMMARY_COLUMNS``,
    in order. ``sizes``: the test-set size of each experience. ``forgetting`` is
    :func:`forgetting` of the per-experience accuracies under the all-classes head.
    ``task_id_accuracy``: how often a method that infers the task picks the right one;
    NaN (an empty CSV cell) when None."""
    return {
        "strategy": strategy.lower(),
        "avg_incremental_accuracy": average_incremental_accuracy(matrix, sizes),
        "last_accuracy": last_accuracy(matrix, sizes),
        "forgetting": forgetting(matrix),
        "task_id_accuracy": np.nan if task_id_accuracy is None else float(task_id_accuracy),
        **_cost_fields(total_params, overhead_pct, train_seconds),
    }


def summary_columns(columns: Iterable[str]) -> tuple[str, ...]:
    """``CLASS_SUMMARY_COLUMNS`` if ``columns`` hold ``avg_incremental_accuracy``, else
    ``SUMMARY_COLUMNS``, checked to be exactly ``columns`` (in any order).

    Raises:
        ValueError: naming the missing and unexpected columns.
    """
    got = set(columns)
    expected = CLASS_SUMMARY_COLUMNS if "avg_incremental_accuracy" in got else SUMMARY_COLUMNS
    if got != set(expected):
        missing = sorted(set(expected) - got)
        extra = sorted(got - set(expected))
        raise ValueError(f"summary columns: missing {missing}, unexpected {extra}")
    return expected


def summary_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Frame of summary records, one row each, all of one kind: columns
    ``SUMMARY_COLUMNS`` or ``CLASS_SUMMARY_COLUMNS`` (the former when empty)."""
    records = [dict(row) for row in rows]
    kinds = {summary_columns(record) for record in records}
    if len(kinds) > 1:
        raise ValueError("summary rows mix task- and class-incremental columns")
    columns = kinds.pop() if kinds else SUMMARY_COLUMNS
    return pd.DataFrame(records, columns=list(columns))


def _format_cell(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return "" if np.isnan(value) else f"{value:.4f}"
    return str(value).replace("|", "\\|")


def format_table(df: pd.DataFrame) -> str:
    """GitHub markdown table of ``df`` (index dropped; floats with 4 decimals).

    Numeric columns are right-aligned. The result has ``len(df) + 2`` lines.
    """
    header = [str(c) for c in df.columns]
    align = [
        "---:" if pd.api.types.is_numeric_dtype(df[c]) else ":---" for c in df.columns
    ]
    body = [[_format_cell(v) for v in row] for row in df.itertuples(index=False)]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, align, *body])


def write_results(
    out_dir: str | Path,
    summary: pd.DataFrame,
    matrices: Mapping[str, np.ndarray],
) -> list[Path]:
    """Write ``summary.csv``, ``summary.md`` and ``accuracy_matrix_<slug>.csv``.

    ``summary.csv`` has exactly the columns of its kind (:func:`summary_columns`),
    in that order, and no index; NaN cells (``task_id_accuracy`` where it does not
    apply) are written empty, in both files. Each matrix file is
    :func:`accuracy_matrix_frame` with its row labels, named after
    :func:`strategy_slug` of its key. ``out_dir`` is created if needed.
    Returns the written paths in that order.
    """
    columns = summary_columns(summary.columns)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ordered = summary[list(columns)]
    csv_path = out / "summary.csv"
    ordered.to_csv(csv_path, index=False)
    md_path = out / "summary.md"
    md_path.write_text(format_table(ordered) + "\n")
    paths = [csv_path, md_path]
    for name, matrix in matrices.items():
        path = out / f"accuracy_matrix_{strategy_slug(name)}.csv"
        if path in paths:
            raise ValueError(f"two strategies map to the same file {path.name}")
        accuracy_matrix_frame(matrix).to_csv(path)
        paths.append(path)
    return paths
