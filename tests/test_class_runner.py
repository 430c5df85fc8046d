"""The runner on class-incremental streams: summary columns, task-free inference,
resuming, and settings that do not apply."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from test_runner import Killed, kill_at, parse

from avalanche_maskrkr import runner
from avalanche_maskrkr.baseline_accounting import baseline_cost
from avalanche_maskrkr.benchmarks import split_digits
from avalanche_maskrkr.checkpoint import can_resume
from avalanche_maskrkr.class_baselines import build_class_baseline
from avalanche_maskrkr.config import ConfigError, resolve
from avalanche_maskrkr.results import average_incremental_accuracy, forgetting, last_accuracy

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

HEADER = ("strategy,avg_incremental_accuracy,last_accuracy,forgetting,task_id_accuracy,"
          "total_params,overhead_pct,train_seconds")
ARGV = ["--scenario", "class", "--epochs", "1", "--tasks", "2", "--ranpac-dim", "256"]


def test_class_scenario_defaults():
    config = resolve(parse(["--scenario", "class"]))
    assert config.strategies == ("simplecil", "ranpac", "aper", "rkr", "piggyback",
                                 "mask-rkr", "naive", "lwf", "replay")
    assert resolve(parse([])).strategies[:3] == ("rkr", "piggyback", "mask-rkr")


def test_class_incremental_run_writes_the_class_summary_and_resumes(tmp_path):
    argv = [*ARGV, "--strategies", "simplecil,ranpac,aper,piggyback,naive"]
    full = runner.run(parse([*argv, "--out", str(tmp_path / "full")]))
    written = (tmp_path / "full" / "summary.csv").read_text().splitlines()
    assert written[0] == HEADER
    summary = pd.read_csv(tmp_path / "full" / "summary.csv").set_index("strategy")
    scenario = runner.build_benchmark(resolve(parse(argv)))
    sizes = [len(e.dataset) for e in scenario.test_stream]
    for name, matrix in full.matrices.items():
        row = summary.loc[name]
        assert row["avg_incremental_accuracy"] == pytest.approx(
            average_incremental_accuracy(matrix, sizes))
        assert row["last_accuracy"] == pytest.approx(last_accuracy(matrix, sizes))
        assert row["forgetting"] == pytest.approx(forgetting(matrix))
        assert np.isnan(matrix[np.triu_indices(2, 1)]).all()
        assert not np.isnan(matrix[np.tril_indices(2)]).any()
        assert row["train_seconds"] > 0
    # only the method that routes has a task-identification accuracy
    assert summary["task_id_accuracy"].notna().tolist() == [False, False, False, True, False]
    assert 0 < summary.loc["piggyback", "task_id_accuracy"] <= 1
    # killed after the first experience of APER, then of Piggyback, resumed each time
    # where it stopped: the same results
    resumed = [*argv, "--out", str(tmp_path / "killed")]
    trained = []

    def record_then_kill_at(label: str, experience: int):
        kill = kill_at(label, experience)
        return lambda *at: (trained.append(at), kill(*at))

    for point in [("aper", 0), ("piggyback", 0)]:
        with pytest.raises(Killed):
            runner.run(parse(resumed), after_experience=record_then_kill_at(*point))
    result = runner.run(parse(resumed), after_experience=lambda *at: trained.append(at))
    assert trained == [("simplecil", 0), ("simplecil", 1), ("ranpac", 0), ("ranpac", 1),
                       ("aper", 0), ("aper", 1), ("piggyback", 0), ("piggyback", 1),
                       ("naive", 0), ("naive", 1)]  # each experience trained once
    for name, matrix in full.matrices.items():
        np.testing.assert_array_equal(result.matrices[name], matrix)
    pd.testing.assert_frame_equal(result.summary.drop(columns="train_seconds"),
                                  full.summary.drop(columns="train_seconds"))


@pytest.mark.parametrize("argv, message", [
    (["--strategies", "simplecil"], "unknown task-incremental strategies"),
    (["--scenario", "class", "--strategies", "single"], "unknown class-incremental"),
    (["--scenario", "class", "--strategies", "rkr", "--task-inference", "oracle"],
     "task_inference 'oracle' does not apply to a class-incremental run"),
    (["--strategies", "rkr", "--task-inference", "energy"],
     "task_inference 'energy' does not apply to a task-incremental run"),
])
def test_settings_that_do_not_apply_are_refused(tmp_path, argv, message):
    with pytest.raises(ConfigError, match=message):
        runner.run(parse([*argv, "--epochs", "1", "--out", str(tmp_path)]))


@pytest.mark.parametrize("name, per_sample", [("der", 3 * 8 * 8 + 10), ("icarl", 3 * 8 * 8),
                                              ("replay", 3 * 8 * 8)])
def test_class_baselines_count_their_memory(name, per_sample):
    """A full memory of 200 samples: their input values (DER: and their 10 logits)
    beside the model's parameters; iCaRL also keeps a mean embedding for each of the
    stream's 10 classes (simple_mlp's 256 features)."""
    scenario = split_digits(scenario="class", channels=3, n_experiences=2)
    strategy = build_class_baseline(
        name, lambda n: timm.create_model("simple_mlp", num_classes=n), 10,
        lambda params: torch.optim.Adam(params, lr=1e-3), {"replay_mem_size": 200},
        train_mb_size=32, train_epochs=1, eval_mb_size=128)
    strategy.train(scenario.train_stream[0])
    model = sum(p.numel() for p in strategy.model.parameters())
    stored = baseline_cost(strategy.model, [*strategy.plugins, strategy])["total_params"]
    class_means = 10 * 256 if name == "icarl" else 0
    assert stored - model == 200 * per_sample + class_means
    assert not can_resume(strategy)  # the memory is not in a checkpoint: saved at the end
