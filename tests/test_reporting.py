"""Tests of the evaluator, the results tables and the plots."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.evaluation.metrics import timing_metrics
from avalanche.logging import InteractiveLogger
from avalanche.models import SimpleMLP
from avalanche.training import Naive
from torch.utils.data import TensorDataset

from avalanche_maskrkr.evaluation import (
    collect_accuracy_matrix,
    make_evaluator,
    total_train_time,
)
from avalanche_maskrkr.plots import plot_all, plot_accuracy_vs_overhead
from avalanche_maskrkr.results import (
    accuracy_matrix_frame,
    average_accuracy,
    bwt,
    format_table,
    forgetting,
    summary_frame,
    summary_row,
    write_results,
)

HEADER = "strategy,avg_accuracy,forgetting,total_params,overhead_pct,train_seconds"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A[1, 0] > A[0, 0]: the column maximum, not the diagonal, is the reference.
MATRIX = np.array(
    [
        [0.6, 0.1, 0.0],
        [0.9, 0.8, 0.2],
        [0.7, 0.5, 0.9],
    ]
)


def test_scores_by_hand() -> None:
    assert average_accuracy(MATRIX) == pytest.approx((0.7 + 0.5 + 0.9) / 3)
    # j=0: max(0.6, 0.9) - 0.7 = 0.2; j=1: 0.8 - 0.5 = 0.3
    assert forgetting(MATRIX) == pytest.approx(0.25)
    # j=0: 0.7 - 0.6 = 0.1; j=1: 0.5 - 0.8 = -0.3
    assert bwt(MATRIX) == pytest.approx(-0.1)


def test_scores_single_task_and_bad_shape() -> None:
    single = np.array([[0.8]])
    assert average_accuracy(single) == pytest.approx(0.8)
    assert forgetting(single) == 0.0
    assert bwt(single) == 0.0
    with pytest.raises(ValueError, match="square"):
        forgetting(np.ones((2, 3)))


def test_accuracy_matrix_frame_labels() -> None:
    frame = accuracy_matrix_frame(MATRIX)
    assert list(frame.index) == ["after exp 0", "after exp 1", "after exp 2"]
    assert list(frame.columns) == ["exp 0", "exp 1", "exp 2"]
    assert frame.loc["after exp 1", "exp 0"] == 0.9


def _summary() -> pd.DataFrame:
    return summary_frame(
        [
            summary_row("Naive", MATRIX, 1000, 0.0, 1.5),
            summary_row("Mask-RKR", np.eye(3), 1030, 3.0, 2.5),
            summary_row("Piggyback", np.full((3, 3), 0.5), 1500, 300.0, 2.0),
        ]
    )


def test_summary_row_and_frame() -> None:
    row = summary_row("Mask-RKR", MATRIX, 1234, 2.5, 10.0)
    assert list(row) == HEADER.split(",")
    assert row["strategy"] == "mask-rkr"
    assert row["forgetting"] == pytest.approx(0.25)
    assert list(_summary().columns) == HEADER.split(",")
    with pytest.raises(ValueError, match="missing"):
        summary_frame([{"strategy": "naive"}])


def test_write_results(tmp_path) -> None:
    summary = _summary()
    paths = write_results(tmp_path / "out", summary, {"Naive": MATRIX, "Mask-RKR": np.eye(3)})
    names = [p.name for p in paths]
    assert names == [
        "summary.csv",
        "summary.md",
        "accuracy_matrix_naive.csv",
        "accuracy_matrix_mask-rkr.csv",
    ]
    csv_text = paths[0].read_text().splitlines()
    assert csv_text[0] == HEADER
    assert len(csv_text) == 1 + len(summary)
    pd.testing.assert_frame_equal(pd.read_csv(paths[0]), summary)

    md_lines = paths[1].read_text().strip().splitlines()
    assert md_lines == format_table(summary).splitlines()
    matrix = pd.read_csv(paths[2], index_col=0)
    np.testing.assert_allclose(matrix.to_numpy(), MATRIX)
    assert matrix.index[2] == "after exp 2"


def test_format_table_shape() -> None:
    summary = _summary()
    lines = format_table(summary).splitlines()
    assert len(lines) == len(summary) + 2
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines)
    assert all(line.count("|") == len(HEADER.split(",")) + 1 for line in lines)
    assert lines[0] == "| " + " | ".join(HEADER.split(",")) + " |"
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in lines]
    assert cells[1] == [":---"] + ["---:"] * 5
    assert cells[2] == ["naive", "0.7000", "0.2500", "1000", "0.0000", "1.5000"]


def test_plots_write_png(tmp_path) -> None:
    summary = _summary()
    paths = plot_all(tmp_path, summary, {"Naive": MATRIX, "Mask-RKR": np.eye(3)})
    assert sorted(p.name for p in paths) == sorted(
        [
            "strategy_bars.png",
            "accuracy_vs_overhead.png",
            "task_curves_naive.png",
            "accuracy_heatmap_naive.png",
            "task_curves_mask-rkr.png",
            "accuracy_heatmap_mask-rkr.png",
        ]
    )
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, path.name


def test_overhead_plot_all_positive_wide_range(tmp_path) -> None:
    summary = _summary().assign(overhead_pct=[0.5, 3.0, 300.0])
    path = plot_accuracy_vs_overhead(summary, tmp_path / "scatter.png")
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_collect_partial_and_repeated_evaluations() -> None:
    name = "Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{:03}"
    history = {
        # exp 0 evaluated twice at step 5 (no training in between): last kept
        name.format(0): ([5, 5, 9], [0.4, 0.5, 0.3]),
        name.format(1): ([9], [0.8]),
        "Top1_Acc_Exp/eval_phase/train_stream/Task000/Exp000": ([5, 7], [1.0, 1.0]),
    }
    matrix = collect_accuracy_matrix(history, 2)
    np.testing.assert_array_equal(matrix, [[0.5, np.nan], [0.3, 0.8]])
    with pytest.raises(ValueError, match="2 evaluation points"):
        collect_accuracy_matrix(history, 3)
    with pytest.raises(ValueError, match="no Top1_Acc_Exp"):
        collect_accuracy_matrix(history, 2, stream="valid")


def test_make_evaluator_loggers_and_extra_metrics() -> None:
    extra = timing_metrics(minibatch=True)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = make_evaluator(extra_metrics=[extra])
    assert list(quiet.loggers) == []
    assert quiet.metrics[-1] is extra
    verbose = make_evaluator(verbose=True)
    assert [type(lg) for lg in verbose.loggers] == [InteractiveLogger]


N_EXP = 3
N_CLASSES = 6
DIM = 8


def _blobs(centers: torch.Tensor, per_class: int) -> TensorDataset:
    y = torch.arange(N_CLASSES).repeat_interleave(per_class)
    x = centers[y] + torch.randn(len(y), DIM)
    dataset = TensorDataset(x, y)
    dataset.targets = y.tolist()
    return dataset


@pytest.fixture(scope="module")
def avalanche_run():
    """Class-incremental run with one task label per experience.

    Returns the evaluator and the dictionaries returned by each ``eval`` call.
    Every test experience has 2 classes x 20 samples.
    """
    torch.manual_seed(0)
    centers = torch.randn(N_CLASSES, DIM) * 3
    benchmark = nc_benchmark(
        _blobs(centers, 40),
        _blobs(centers, 20),
        n_experiences=N_EXP,
        task_labels=True,
        shuffle=False,
    )
    model = SimpleMLP(
        num_classes=N_CLASSES, input_size=DIM, hidden_size=32, hidden_layers=1, drop_rate=0
    )
    evaluator = make_evaluator()
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_mb_size=16,
        train_epochs=1,
        eval_mb_size=64,
        evaluator=evaluator,
    )
    eval_results = []
    for experience in benchmark.train_stream:
        strategy.train(experience, num_workers=0)
        eval_results.append(strategy.eval(benchmark.test_stream, num_workers=0))
    return evaluator, eval_results


def test_collect_matches_avalanche(avalanche_run) -> None:
    evaluator, eval_results = avalanche_run
    matrix = collect_accuracy_matrix(evaluator, N_EXP)
    assert matrix.shape == (N_EXP, N_EXP)
    for i, results in enumerate(eval_results):
        for j in range(N_EXP):
            name = f"Top1_Acc_Exp/eval_phase/test_stream/Task{j:03}/Exp{j:03}"
            assert matrix[i, j] == pytest.approx(results[name])
    final = eval_results[-1]
    stream_acc = final[f"Top1_Acc_Stream/eval_phase/test_stream/Task{N_EXP - 1:03}"]
    assert average_accuracy(matrix) == pytest.approx(stream_acc)
    np.testing.assert_allclose(matrix, final["EvalStream/Acc_Matrix"].numpy(), atol=1e-6)


def test_scores_match_avalanche(avalanche_run) -> None:
    evaluator, eval_results = avalanche_run
    matrix = collect_accuracy_matrix(evaluator, N_EXP)
    # The run learns each experience and then forgets it.
    assert np.diag(matrix).min() > 0.9
    final = eval_results[-1]
    avalanche_forgetting = final["StreamForgetting/eval_phase/test_stream"]
    assert avalanche_forgetting > 0.1
    # Avalanche measures forgetting from A[j, j]; it equals the max-based
    # definition here because no column rises above its diagonal.
    for j in range(N_EXP - 1):
        assert matrix[j, j] == matrix[j : N_EXP - 1, j].max()
    assert forgetting(matrix) == pytest.approx(avalanche_forgetting)
    assert bwt(matrix) == pytest.approx(final["StreamBWT/eval_phase/test_stream"])


def test_training_times_logged(avalanche_run) -> None:
    evaluator, _ = avalanche_run
    history = evaluator.get_all_metrics()
    epoch_times, experience_times = (
        [v for k, (_, vals) in history.items() if k.startswith(prefix) for v in vals]
        for prefix in ("Time_Epoch/", "Time_Exp/train_phase/"))
    assert len(epoch_times) == len(experience_times) == N_EXP
    assert all(e >= epoch > 0 for e, epoch in zip(experience_times, epoch_times))
    assert total_train_time(evaluator) == pytest.approx(sum(experience_times))
