"""Class-incremental streams (global class ids, task label 0) and their scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.datasets import load_digits
from torchvision import transforms as T

from avalanche_maskrkr.benchmarks import (
    build_benchmark,
    split_cifar100,
    split_digits,
    split_imagenet,
)
from avalanche_maskrkr import plots
from avalanche_maskrkr.results import (
    average_incremental_accuracy,
    class_summary_row,
    forgetting,
    format_table,
    last_accuracy,
    seen_class_accuracies,
    summary_frame,
    summary_row,
    write_results,
)
from miniatures import class_colour, write_cifar100, write_imagenet

# np.random.seed(1993); np.random.permutation(100): the CIFAR-100 order of the published
# class-incremental protocols (PyCIL / LAMDA-PILOT with shuffle and seed 1993; FACIL's
# "cifar100_icarl" class_order lists it in full). The first 20 ids, copied from there:
PUBLISHED_CIFAR100_ORDER_HEAD = [68, 56, 78, 8, 23, 84, 90, 65, 74, 76,
                                 40, 89, 3, 92, 55, 9, 26, 80, 43, 38]


def check_class_stream(stream, n_experiences: int, classes_per_exp: int) -> None:
    """Task label 0 everywhere; experience i holds the global ids i*C..(i+1)*C-1."""
    assert len(stream) == n_experiences
    for i, exp in enumerate(stream):
        assert exp.task_labels == [0]
        ids = list(range(i * classes_per_exp, (i + 1) * classes_per_exp))
        assert sorted(exp.classes_in_this_experience) == ids
        assert sorted({int(y) for y in exp.dataset.targets}) == ids
        assert set(exp.dataset.targets_task_labels) == {0}


# ---------------------------------------------------------------- streams


def test_digits_class_stream_has_global_ids_in_order():
    bench = split_digits(scenario="class")
    check_class_stream(bench.train_stream, 5, 2)
    check_class_stream(bench.test_stream, 5, 2)
    digits = load_digits()
    label_of = {image.astype(np.float32).tobytes(): int(target)
                for image, target in zip(digits.images, digits.target)}
    for i, exp in enumerate(bench.test_stream):
        for x, y, t in exp.dataset:
            assert t == 0 and y in (2 * i, 2 * i + 1)
            assert label_of[(x[0].numpy() * 16).tobytes()] == y  # global id = the digit
    # same samples as the task stream, only the labels differ
    task = split_digits()
    assert [len(e.dataset) for e in bench.test_stream] == [len(e.dataset) for e in task.test_stream]


def test_digits_class_stream_at_the_proxy_size_through_the_catalog():
    bench = build_benchmark("digits", 16, tasks=10, scenario="class")
    check_class_stream(bench.train_stream, 10, 1)
    x, y, t = bench.test_stream[7].dataset[0]
    assert x.shape == (3, 16, 16) and (y, t) == (7, 0)


def test_cifar100_class_order_is_the_published_one(tmp_path):
    cifar_root = tmp_path
    write_cifar100(cifar_root, train_per_class=1, test_per_class=1)
    torch.manual_seed(123)
    expected_draw = torch.rand(1)
    np_state = np.random.get_state()
    torch.manual_seed(123)
    bench = split_cifar100(root=cifar_root, scenario="class", eval_transform=T.ToTensor())
    assert torch.equal(torch.rand(1), expected_draw), "global torch RNG must not be reseeded"
    assert np.array_equal(np.random.get_state()[1], np_state[1]), "nor numpy's"
    order = bench.classes_order_original_ids
    assert order[:20] == PUBLISHED_CIFAR100_ORDER_HEAD
    np.random.seed(1993)
    assert order == np.random.permutation(100).tolist()
    check_class_stream(bench.train_stream, 10, 10)  # B0-Inc10
    for i, exp in enumerate(bench.test_stream):
        for x, y, t in exp.dataset:
            original = round(float(x[0, 0, 0]) * 255)  # pixel value = class id
            assert (t, order[y]) == (0, original) and i * 10 <= y < (i + 1) * 10
    # the task scenario keeps its own order (seed 0); an explicit seed or order overrides
    assert split_cifar100(root=cifar_root).classes_order_original_ids[:20] != order[:20]
    seeded = split_cifar100(root=cifar_root, scenario="class", seed=0, n_experiences=20)
    assert seeded.classes_order_original_ids == np.random.RandomState(0).permutation(100).tolist()
    check_class_stream(seeded.train_stream, 20, 5)  # B0-Inc5
    fixed = split_cifar100(root=cifar_root, scenario="class", fixed_class_order=range(100))
    assert fixed.classes_order_original_ids == list(range(100))


def test_imagenet_class_stream(tmp_path):
    write_imagenet(tmp_path, n_classes=10, train_per_class=2)
    bench = split_imagenet(tmp_path, n_experiences=5, scenario="class",
                           eval_transform=T.ToTensor())
    check_class_stream(bench.train_stream, 5, 2)
    check_class_stream(bench.test_stream, 5, 2)
    order = bench.classes_order_original_ids
    assert order == np.random.RandomState(1993).permutation(10).tolist()
    for x, y, t in bench.test_stream[3].dataset:
        rgb = x.mean(dim=(1, 2)) * 255  # image colour = class_colour(original id)
        assert (rgb - torch.tensor(class_colour(order[y]))).abs().max() < 8


def test_decathlon_refuses_class_and_bad_scenarios_list_the_choices(tmp_path):
    with pytest.raises(ValueError, match="decathlon stays task-incremental"):
        build_benchmark("decathlon", 64, data_root=tmp_path, scenario="class")
    for build in (lambda: build_benchmark("digits", 8, scenario="domain"),
                  lambda: build_benchmark("decathlon", 64, data_root=tmp_path, scenario="Class"),
                  lambda: split_digits(scenario="tasks")):
        with pytest.raises(ValueError, match=r"unknown scenario .*\['task', 'class'\]"):
            build()


# ---------------------------------------------------------------- scores

# After exp 0 only exp 0's classes are known; columns of unseen experiences are ignored
# (NaN, or anything) by the class-incremental scores.
MATRIX = np.array([
    [0.9, np.nan, np.nan],
    [0.6, 0.8, 0.0],
    [0.5, 0.4, 0.7],
])
SIZES = [100, 300, 100]


def test_class_incremental_scores_by_hand():
    # stage 0: 0.9; stage 1: (100*0.6 + 300*0.8) / 400 = 0.75;
    # stage 2: (100*0.5 + 300*0.4 + 100*0.7) / 500 = 0.48
    np.testing.assert_allclose(seen_class_accuracies(MATRIX, SIZES), [0.9, 0.75, 0.48])
    assert average_incremental_accuracy(MATRIX, SIZES) == pytest.approx((0.9 + 0.75 + 0.48) / 3)
    assert last_accuracy(MATRIX, SIZES) == pytest.approx(0.48)
    # forgetting is per experience, unweighted: j=0: 0.9 - 0.5; j=1: 0.8 - 0.4
    assert forgetting(MATRIX) == pytest.approx(0.4)
    assert last_accuracy([[0.3]], [7]) == average_incremental_accuracy([[0.3]], [7]) == 0.3
    for bad in ([100, 300], [100, 0, 100]):
        with pytest.raises(ValueError, match="3 positive test-set sizes"):
            last_accuracy(MATRIX, bad)


CLASS_HEADER = ("strategy,avg_incremental_accuracy,last_accuracy,forgetting,"
                "task_id_accuracy,total_params,overhead_pct,train_seconds")


def _class_summary() -> pd.DataFrame:
    return summary_frame([
        class_summary_row("SimpleCIL", MATRIX, SIZES, 1000, 0.0, 1.5),
        class_summary_row("Mask-RKR", np.eye(3), SIZES, 1030, 3.0, 2.5, task_id_accuracy=0.75),
    ])


def test_class_summary_csv_columns_and_empty_task_id(tmp_path):
    summary = _class_summary()
    assert list(summary.columns) == CLASS_HEADER.split(",")
    row = summary.iloc[0]
    assert row["strategy"] == "simplecil" and row["last_accuracy"] == pytest.approx(0.48)
    paths = write_results(tmp_path, summary, {"SimpleCIL": MATRIX})
    lines = paths[0].read_text().splitlines()
    assert lines[0] == CLASS_HEADER
    assert lines[1].split(",")[4] == "" and lines[2].split(",")[4] == "0.75"
    pd.testing.assert_frame_equal(pd.read_csv(paths[0]), summary)
    markdown = paths[1].read_text().splitlines()
    assert markdown == format_table(summary).splitlines()
    assert [c.strip() for c in markdown[2].split("|")[1:-1]][4] == ""  # not "nan"
    with pytest.raises(ValueError, match=r"missing \['task_id_accuracy'\]"):
        write_results(tmp_path, summary.drop(columns="task_id_accuracy"), {})
    with pytest.raises(ValueError, match="mix"):
        summary_frame([class_summary_row("a", MATRIX, SIZES, 1, 0.0, 1.0),
                       summary_row("b", np.eye(3), 1, 0.0, 1.0)])


def test_plots_read_class_summaries(tmp_path, monkeypatch):
    figures = {}
    save = plots._save

    def record(fig, path):
        figures[Path(path).name] = fig
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", record)
    summary = _class_summary()
    plots.plot_strategy_bars(summary, tmp_path / "bars.png")
    plots.plot_accuracy_vs_overhead(summary, tmp_path / "scatter.png")
    panels = figures["bars.png"].axes
    for ax, column in zip(panels, ("last_accuracy", "avg_incremental_accuracy", "forgetting")):
        np.testing.assert_allclose([bar.get_height() for bar in ax.patches], summary[column])
    assert len(panels) == 3
    points = figures["scatter.png"].axes[0].collections[0].get_offsets()
    np.testing.assert_allclose(points, summary[["overhead_pct", "last_accuracy"]])
    assert (tmp_path / "scatter.png").read_bytes().startswith(b"\x89PNG")
