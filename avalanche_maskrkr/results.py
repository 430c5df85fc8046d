"""Continual-learning scores from an accuracy matrix, and result tables.

All functions take the accuracy matrix ``A`` of shape ``(T, T)``, where
``A[i, j]`` is the accuracy on test experience ``j`` after training experience
``i`` (see :func:`avalanche_maskrkr.evaluation.collect_accuracy_matrix`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
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


def summary_row(
    strategy: str,
    matrix: np.ndarray,
    total_params: int,
    overhead_pct: float,
    train_seconds: float,
) -> dict[str, Any]:
    """One summary record with the keys of ``SUMMARY_COLUMNS``, in that order."""
    return {
        "strategy": strategy.lower(),
        "avg_accuracy": average_accuracy(matrix),
        "forgetting": forgetting(matrix),
        "total_params": int(total_params),
        "overhead_pct": float(overhead_pct),
        "train_seconds": float(train_seconds),
    }


def _check_columns(columns: Iterable[str]) -> None:
    got = set(columns)
    if got != set(SUMMARY_COLUMNS):
        missing = sorted(set(SUMMARY_COLUMNS) - got)
        extra = sorted(got - set(SUMMARY_COLUMNS))
        raise ValueError(f"summary columns: missing {missing}, unexpected {extra}")


def summary_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Frame of summary records, one row each, columns ``SUMMARY_COLUMNS``."""
    records = [dict(row) for row in rows]
    for record in records:
        _check_columns(record)
    return pd.DataFrame(records, columns=list(SUMMARY_COLUMNS))


def _format_cell(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{value:.4f}"
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

    ``summary.csv`` has exactly the columns ``SUMMARY_COLUMNS`` and no index;
    each matrix file is :func:`accuracy_matrix_frame` with its row labels, named
    after :func:`strategy_slug` of its key. ``out_dir`` is created if needed.
    Returns the written paths in that order.
    """
    _check_columns(summary.columns)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ordered = summary[list(SUMMARY_COLUMNS)]
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
