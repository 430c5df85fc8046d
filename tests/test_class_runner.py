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
from avalanche_maskrkr.config import ConfigError, Variant, resolve
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
    variants = [Variant(name, name) for name in ("simplecil", "ranpac", "aper", "piggyback",
                                                 "naive")]
    variants.insert(2, Variant("ranpac-rkr", "ranpac", {"ranpac_adapter": "rkr"}))
    full = runner.run(parse([*argv, "--out", str(tmp_path / "full")]), variants)
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
    assert summary["task_id_accuracy"].notna().tolist() == [False] * 4 + [True, False]
    assert 0 < summary.loc["piggyback", "task_id_accuracy"] <= 1
    # killed after the first experience of the adapted RanPAC, of APER, then of
    # Piggyback, resumed each time where it stopped: the same results
    resumed = [*argv, "--out", str(tmp_path / "killed")]
    trained = []

    def record_then_kill_at(label: str, experience: int):
        kill = kill_at(label, experience)
        return lambda *at: (trained.append(at), kill(*at))

    for point in [("ranpac-rkr", 0), ("aper", 0), ("piggyback", 0)]:
        with pytest.raises(Killed):
            runner.run(parse(resumed), variants, after_experience=record_then_kill_at(*point))
    result = runner.run(parse(resumed), variants,
                        after_experience=lambda *at: trained.append(at))
    assert trained == [(v.label, k) for v in variants for k in (0, 1)]  # each trained once
    for name, matrix in full.matrices.items():
        np.testing.assert_array_equal(result.matrices[name], matrix)
    pd.testing.assert_frame_equal(result.summary.drop(columns="train_seconds"),
                                  full.summary.drop(columns="train_seconds"))


def test_ranpac_adapter_option_adapts_once_with_the_run_options():
    """--ranpac-adapter: RanPAC's first-session adaptation from the command line. The
    module is the named method with the run's options (rank 3), trains for the run's
    epochs on the first experience only, and the ridge classifier then reads its
    features; without the option nothing trains."""
    argv = [*ARGV, "--strategies", "ranpac", "--rank", "3", "--epochs", "2"]
    config = resolve(parse([*argv, "--ranpac-adapter", "rkr"]))
    scenario = runner.build_benchmark(config)
    runner.seed_everything(config.seed)
    strategy = runner.build_strategy(config, Variant("ranpac", "ranpac"), 10)
    network = strategy.model.backbone.network
    assert network.options.rank == 3 and strategy.train_epochs == 2
    base = {name for name, _ in network.named_parameters()}
    strategy.train(scenario.train_stream[0])
    module = {k: v.clone() for k, v in network.named_parameters() if k not in base}
    right = [v for k, v in module.items() if k.endswith(".rm")]
    assert right and all(v.shape[1] == 3 for v in right)
    # zero at initialisation; trained wherever gradient reaches (this random ResNet's
    # residual branches end in a zero-initialised BatchNorm weight and get none)
    assert any(v.abs().sum() > 0 for v in right)
    assert strategy.model.backbone.frozen
    strategy.train(scenario.train_stream[1])
    assert all(torch.equal(v, module[k]) for k, v in network.named_parameters() if k in module)
    plain = runner.build_strategy(resolve(parse(argv)), Variant("ranpac", "ranpac"), 10)
    assert not hasattr(plain.model.backbone, "network")
    assert not any(p.requires_grad for p in plain.model.parameters())


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
