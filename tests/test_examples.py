"""Every example script end to end with --smoke (in-process: avalanche is imported once)."""
from __future__ import annotations

import importlib.util
import runpy
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from avalanche_maskrkr.benchmarks import split_digits
from avalanche_maskrkr.results import CLASS_SUMMARY_COLUMNS

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


CLASS_STRATEGIES = ["simplecil", "ranpac", "aper", "rkr", "piggyback", "mask-rkr", "naive",
                    "lwf", "replay", "der", "icarl"]


def test_compare_class_incremental(tmp_path, capsys) -> None:
    run_example("compare_class_incremental", tmp_path)
    rows = summary(tmp_path / "simple_mlp").set_index("strategy")
    assert rows.index.tolist() == CLASS_STRATEGIES
    assert ["strategy", *rows.columns] == list(CLASS_SUMMARY_COLUMNS)
    # Only the methods infer a task; the others have no task to infer.
    routed = ["rkr", "piggyback", "mask-rkr"]
    assert rows.loc[routed, "task_id_accuracy"].notna().all()
    assert rows.drop(routed)["task_id_accuracy"].isna().all()
    # Naive fine-tuning forgets the first task; everything that keeps it (a frozen base,
    # a memory, distillation with a memory) ends above it. LwF alone keeps no memory.
    last = rows["last_accuracy"]
    assert (last.drop(["naive", "lwf"]) > last["naive"] + 0.2).all(), last
    assert "No published numbers for digits with 2 tasks" in capsys.readouterr().out


def test_published_class_incremental_table() -> None:
    published_table = runpy.run_path(
        str(EXAMPLES / "compare_class_incremental.py"))["published_table"]
    ours = pd.DataFrame({"strategy": ["simplecil", "aper", "rkr"],
                         "avg_incremental_accuracy": [0.5, 0.6, 0.7],
                         "last_accuracy": [0.4, 0.5, 0.6]})
    assert published_table(ours, "cifar100", 10) is None
    table = published_table(ours, "cifar100", 20).set_index("method")
    assert table.loc["SimpleCIL", ["strategy", "avg_incremental", "avg_incremental (paper)",
                                   "last", "last (paper)"]].tolist() == [
        "simplecil", 0.5, 0.8757, 0.4, 0.8126]
    assert table.loc["APER (ADAM) + Adapter", ["avg_incremental", "last (paper)"]].tolist() \
        == [0.6, 0.8515]
    assert np.isnan(table.loc["EASE", "avg_incremental"])  # not one of ours
    assert np.isnan(table.loc["LwF", "last"])  # ours did not run
    assert (table["source"] == "Zhou et al., CVPR 2024 (EASE), Table 1").all()
