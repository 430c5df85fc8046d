"""Every example script end to end with --smoke (in-process: avalanche is imported once)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from avalanche_maskrkr.benchmarks import split_digits

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PAPER_ROWS = ["rkr", "piggyback", "mask-rkr", "mask-rkr-k+", "single", "multi-head"]


def run_example(name: str, out: Path, *argv: str) -> None:
    """``main(["--smoke", "--out", out, *argv])`` of ``examples/<name>.py``, on one CPU
    thread (the smoke models are tiny: more threads only contend for shared cores)."""
    sys.path.insert(0, str(EXAMPLES))  # ablations reuses reproduce_cifar100's data writer
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.main(["--smoke", "--out", str(out), *argv])
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(EXAMPLES))


def summary(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "summary.csv")


@pytest.mark.parametrize("name, tasks, swin_single, argv", [
    ("reproduce_cifar100", 2, "0.8760", []),
    ("reproduce_imagenet", 2, "0.9020", []),
    ("reproduce_decathlon", 5, "0.8420", ["--decathlon-test-split", "test"])])
def test_paper_reproductions(name, tasks, swin_single, argv, tmp_path, capsys) -> None:
    run_example(name, tmp_path, *argv)
    assert summary(tmp_path / "test_resnet")["strategy"].tolist() == PAPER_ROWS
    table = (tmp_path / "paper_table.md").read_text()
    assert f"{tasks} tasks" in table
    assert "| strategy | ResNet-18 | ResNet-18 (paper) | ViT | ViT (paper) |" in table
    single = next(line for line in table.splitlines() if line.startswith("| single |"))
    assert single.endswith(f"| {swin_single} |")
    if name == "reproduce_decathlon":
        assert "Decathlon score" in capsys.readouterr().out


def test_ablations(tmp_path) -> None:
    run_example("ablations", tmp_path)
    rows = summary(tmp_path / "test_resnet")
    assert rows["strategy"].tolist() == ["mask none", "mask rg", "mask sfg", "mask rg+sfg",
                                         "mask on product"]
    assert "| mask rg | " in (tmp_path / "paper_table.md").read_text()
    # No mask at all stores no bits: it costs what RKR does, more than masking.
    cost = rows.set_index("strategy")["total_params"]
    assert cost["mask none"] > cost["mask rg+sfg"]


def linear_probe_accuracy(tasks: int) -> tuple[float, float]:
    """(mean test accuracy, chance) over the tasks of split digits of a logistic
    regression per task on the pixels: the multi-head linear probe."""
    stream = split_digits(n_experiences=tasks, channels=3)
    accuracies = []
    for train, test in zip(stream.train_stream, stream.test_stream):
        (x, y), (x_test, y_test) = (
            (np.stack([sample[0].numpy().ravel() for sample in exp.dataset]),
             np.array([int(sample[1]) for sample in exp.dataset])) for exp in (train, test))
        accuracies.append(LogisticRegression(max_iter=1000).fit(x, y).score(x_test, y_test))
    return float(np.mean(accuracies)), 1 / len(stream.train_stream[0].classes_in_this_experience)


def test_compare_avalanche(tmp_path) -> None:
    run_example("compare_avalanche", tmp_path)
    rows = summary(tmp_path / "simple_mlp")
    assert rows["strategy"].tolist() == ["rkr", "piggyback", "mask-rkr", "naive", "ewc",
                                         "lwf", "si", "replay", "packnet"]
    # Two epochs on the smoke's two digits tasks: every strategy closes at least half the
    # gap from chance to the linear probe (0.99 over 5 classes a task).
    probe, chance = linear_probe_accuracy(tasks=2)
    assert probe > 0.95
    floor = chance + (probe - chance) / 2
    assert (rows["avg_accuracy"] > floor).all(), rows[["strategy", "avg_accuracy"]]


def test_dropin(tmp_path, capsys) -> None:
    run_example("dropin", tmp_path)
    matrix = pd.read_csv(tmp_path / "accuracy_matrix_rkr.csv", index_col=0)
    assert matrix.shape == (2, 2)
    assert "accuracy on each task" in capsys.readouterr().out
