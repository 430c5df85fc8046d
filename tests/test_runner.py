"""Tests of the experiment runner: the default job's outputs, resuming, checkpoint errors,
and weights files."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import timm
import torch
from matplotlib.figure import Figure
from miniatures import write_decathlon
from PIL import Image

from avalanche_maskrkr import cli, convert, plots, runner
from avalanche_maskrkr.benchmarks.decathlon import DEFAULT_DOMAINS
from avalanche_maskrkr.accounting import method_cost
from avalanche_maskrkr.checkpoint import WeightsError, load_weights
from avalanche_maskrkr.config import ConfigError, RunConfig, Variant, resolve

HEADER = "strategy,avg_accuracy,forgetting,total_params,overhead_pct,train_seconds"
FAST = ["--epochs", "1", "--tasks", "2"]


def parse(argv: list[str]) -> RunConfig:
    parser = argparse.ArgumentParser()
    cli.add_run_arguments(parser)
    return cli.config_from_args(parser.parse_args(argv))


class Killed(Exception):
    pass


def kill_at(label: str, experience: int) -> runner.ExperienceHook:
    def hook(name: str, k: int) -> None:
        if (name, k) == (label, experience):
            raise Killed
    return hook


def test_no_arguments_is_the_default_job() -> None:
    config = parse([])
    assert config == RunConfig()
    resolved = resolve(config)
    assert resolved.strategies == ("rkr", "piggyback", "mask-rkr", "naive", "single", "ewc",
                                   "lwf")
    assert (resolved.benchmark, resolved.model, resolved.img_size, resolved.threads) == (
        "digits", "test_resnet", 8, 1)
    assert resolved.options["train_base_first"] is True
    assert resolved.out == "results/digits-test_resnet"
    assert resolve(parse(["--weights", "w.pth"])).options["train_base_first"] is False
    assert parse(["--rank", "4", "--no-mask-sfg"]).options == {"rank": 4, "mask_sfg": False}


def _forgetting(matrix: np.ndarray) -> float:
    """Mean over the earlier tasks of their best accuracy before the last task minus the
    last (Chaudhry et al. 2018), by hand."""
    last = len(matrix) - 1
    return float(np.mean([max(matrix[i, j] for i in range(j, last)) - matrix[last, j]
                          for j in range(last)]))


@pytest.fixture
def figures(monkeypatch) -> dict[str, Figure]:
    """File name -> the matplotlib figure that the runner's plots saved there."""
    saved = {}
    save = plots._save

    def record(fig: Figure, path) -> Path:
        saved[Path(path).name] = fig
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", record)
    return saved


def test_default_job_writes_summary_matrices_and_plots(tmp_path, capsys, figures) -> None:
    cli.main(["run", "--epochs", "1", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "train_base_first" in printed and "| mask-rkr |" in printed
    lines = (tmp_path / "summary.csv").read_text().splitlines()
    assert lines[0] == HEADER
    summary = pd.read_csv(tmp_path / "summary.csv")
    strategies = ["rkr", "piggyback", "mask-rkr", "naive", "single", "ewc", "lwf"]
    assert summary["strategy"].tolist() == strategies
    by_name = summary.set_index("strategy")
    # The methods and separate models never change a finished task.
    assert (by_name.loc[["rkr", "piggyback", "mask-rkr", "single"], "forgetting"] == 0).all()
    assert by_name.loc["single", "overhead_pct"] == pytest.approx(400.0)  # 5 whole models
    assert by_name.loc["naive", "total_params"] < by_name.loc["rkr", "total_params"]
    for name in strategies:
        matrix = pd.read_csv(tmp_path / f"accuracy_matrix_{name}.csv", index_col=0).to_numpy()
        assert matrix.shape == (5, 5)
        assert np.isnan(matrix[np.triu_indices(5, 1)]).all()  # tasks evaluated once trained
        assert not np.isnan(matrix[np.tril_indices(5)]).any()
        # The summary is computed from the written matrix...
        assert by_name.loc[name, "avg_accuracy"] == pytest.approx(matrix[-1].mean(), abs=1e-12)
        assert by_name.loc[name, "forgetting"] == pytest.approx(_forgetting(matrix), abs=1e-12)
        # ...and its training time from the experiences the checkpoint's history timed,
        # each at least its epoch.
        history = torch.load(tmp_path / "checkpoints" / f"{name}.pt",
                             weights_only=True)["metrics"]
        times = {kind: [v for metric, (_, values) in history.items()
                        if metric.startswith(f"Time_{kind}/train_phase/") for v in values]
                 for kind in ("Exp", "Epoch")}
        assert len(times["Exp"]) == len(times["Epoch"]) == 5  # 1 epoch x 5 tasks
        assert all(e >= epoch > 0 for e, epoch in zip(times["Exp"], times["Epoch"]))
        assert by_name.loc[name, "train_seconds"] == pytest.approx(sum(times["Exp"]), rel=1e-9)
        # The plots show that matrix.
        heatmap = figures[f"accuracy_heatmap_{name}.png"].axes[0].images[0].get_array()
        np.testing.assert_array_equal(np.ma.filled(heatmap, np.nan), matrix)
        curves = figures[f"task_curves_{name}.png"].axes[0].lines
        assert len(curves) == 5
        for j, line in enumerate(curves):
            np.testing.assert_array_equal(line.get_ydata(), matrix[j:, j])
    accuracy_bars, forgetting_bars = figures["strategy_bars.png"].axes[:2]
    for axes, column in ((accuracy_bars, "avg_accuracy"), (forgetting_bars, "forgetting")):
        np.testing.assert_allclose([bar.get_height() for bar in axes.patches],
                                   summary[column], atol=1e-12)
    points = figures["accuracy_vs_overhead.png"].axes[0].collections[0].get_offsets()
    np.testing.assert_allclose(points, summary[["overhead_pct", "avg_accuracy"]], atol=1e-12)
    # Each PNG is its figure, rendered at the plots' 120 dpi.
    assert len(figures) == 2 + 2 * len(strategies)
    for file, fig in figures.items():
        with Image.open(tmp_path / file) as png:
            assert png.format == "PNG"
            assert png.size == tuple(round(side * 120) for side in fig.get_size_inches())
    # The checkpoint's model restores into a fresh network, whose cost is the summary's.
    state = torch.load(tmp_path / "checkpoints" / "rkr.pt", weights_only=True)
    net = convert(timm.create_model("test_resnet", num_classes=2), "rkr", train_base_first=True)
    net.load_state_dict(state["model"])
    assert net.trained_tasks == [0, 1, 2, 3, 4]
    assert by_name.loc["rkr", "total_params"] == round(method_cost(net)["total_params"])


def test_a_killed_run_resumes_to_the_uninterrupted_results(tmp_path) -> None:
    argv = ["--strategies", "mask-rkr,single,ewc,lwf", "--epochs", "1", "--tasks", "2"]
    full = runner.run(parse([*argv, "--out", str(tmp_path / "full")]))
    resumed_argv = [*argv, "--out", str(tmp_path / "killed")]
    for point in [("mask-rkr", 0), ("single", 1), ("ewc", 0), ("lwf", 0)]:
        with pytest.raises(Killed):
            runner.run(parse(resumed_argv), after_experience=kill_at(*point))
    trained = []
    result = runner.run(parse(resumed_argv), after_experience=lambda *at: trained.append(at))
    assert trained == [("lwf", 1)]  # finished strategies are kept
    for name, matrix in full.matrices.items():
        np.testing.assert_array_equal(result.matrices[name], matrix)
    pd.testing.assert_frame_equal(result.summary.drop(columns="train_seconds"),
                                  full.summary.drop(columns="train_seconds"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    cli.main(["run", "--strategies", "naive,rkr", *FAST, "--out", str(out)])
    return out


def test_mismatched_or_corrupt_checkpoint_is_an_error_and_kept(finished_run, tmp_path) -> None:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    checkpoint = out / "checkpoints" / "rkr.pt"
    before = checkpoint.read_bytes()
    mismatch = r"rkr\.pt was written by another configuration \(rank: None in the checkpoint, "
    with pytest.raises(SystemExit, match=mismatch + r"4 now\); pass --restart"):
        cli.main(["run", "--strategies", "naive,rkr", *FAST, "--rank", "4", "--out", str(out)])
    assert checkpoint.read_bytes() == before
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=r"cannot read checkpoint .*rkr\.pt.*--restart"):
        cli.main(["run", "--strategies", "naive,rkr", *FAST, "--out", str(out)])
    assert checkpoint.read_bytes() == b"not a checkpoint"
    cli.main(["run", "--strategies", "naive,rkr", *FAST, "--out", str(out), "--restart"])
    assert checkpoint.read_bytes() != b"not a checkpoint"
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "summary.csv").drop(columns="train_seconds"),
        pd.read_csv(finished_run / "summary.csv").drop(columns="train_seconds"))


def test_finished_run_is_reported_again_without_training(finished_run, tmp_path) -> None:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    trained = []
    result = runner.run(parse(["--strategies", "naive,rkr", *FAST, "--out", str(out)]),
                        after_experience=lambda *at: trained.append(at))
    assert trained == []
    assert result.summary["strategy"].tolist() == ["naive", "rkr"]


def _save(model: torch.nn.Module, path) -> None:
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(model.state_dict(), str(path))
    else:
        torch.save({"state_dict": model.state_dict()}, path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_fitting_weights_load_except_the_classifier(tmp_path, suffix) -> None:
    path = tmp_path / f"weights{suffix}"
    source = timm.create_model("test_resnet", num_classes=1000)
    _save(source, path)
    config = resolve(parse(["--weights", str(path)]))
    model = runner.build_backbone(config, num_classes=2)
    for name, tensor in model.state_dict().items():
        if not name.startswith("fc."):
            torch.testing.assert_close(tensor, source.state_dict()[name], rtol=0, atol=0)
    assert model.fc.out_features == 2


def test_weights_that_do_not_fit_name_the_keys_and_shapes(tmp_path) -> None:
    other = tmp_path / "vit.safetensors"
    _save(timm.create_model("test_vit", num_classes=2), other)
    with pytest.raises(SystemExit, match=r"vit\.safetensors does not fit ResNet.*missing keys "
                                         r"\['bn1\.bias'.*unexpected keys \['blocks\.0"):
        cli.main(["run", "--weights", str(other), "--out", str(tmp_path / "out")])
    narrow = timm.create_model("test_resnet", num_classes=2)
    narrow.layer1[0].conv1.weight.data = torch.zeros(32, 32, 1, 1)
    wrong_shape = tmp_path / "shape.pth"
    _save(narrow, wrong_shape)
    with pytest.raises(WeightsError, match=r"layer1\.0\.conv1\.weight: shape \(32, 32, 1, 1\) "
                                          r"in the file, \(32, 32, 3, 3\) in the model"):
        load_weights(timm.create_model("test_resnet", num_classes=2), wrong_shape)
    npz = tmp_path / "w.npz"
    np.savez(npz, unrelated=np.zeros(3))
    with pytest.raises(WeightsError, match=r"\.npz is timm's original ViT"):
        load_weights(timm.create_model("test_resnet"), npz)
    with pytest.raises(WeightsError, match=r"w\.npz does not fit VisionTransformer"):
        load_weights(timm.create_model("test_vit"), npz)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(WeightsError, match=r"cannot read junk\.pth"):
        load_weights(timm.create_model("test_resnet"), tmp_path / "junk.pth")
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_speed_options_reach_every_strategy_through_the_acceleration_plugin() -> None:
    from avalanche_maskrkr.acceleration import AccelerationPlugin
    config = resolve(parse(["--channels-last", "--precision", "bf16"]))
    assert config.channels_last and config.precision == "bf16"
    for label in ("rkr", "naive"):
        strategy = runner.build_strategy(config, Variant(label, label), 2)
        [plugin] = [p for p in strategy.plugins if isinstance(p, AccelerationPlugin)]
        assert plugin.channels_last and plugin.precision == "bf16"
    plain = runner.build_strategy(resolve(parse([])), Variant("rkr", "rkr"), 2)
    assert not any(isinstance(p, AccelerationPlugin) for p in plain.plugins)


def test_decathlon_evaluates_on_val_or_on_the_labelled_test_split(tmp_path) -> None:
    root = tmp_path / "decathlon-1.0"
    domains = dict(zip(DEFAULT_DOMAINS, (4, 5, 8, 9, 10)))
    expected = write_decathlon(root, domains, {"train": [2, 1], "val": [1, 1], "test": [1, 3]})
    argv = ["--benchmark", "decathlon", "--data-root", str(root)]
    assert parse(argv).decathlon_test_split == "val"
    for split in ("val", "test"):
        config = resolve(parse([*argv, "--decathlon-test-split", split]))
        scenario = runner.build_benchmark(config)
        for domain, train, test in zip(DEFAULT_DOMAINS, scenario.train_stream,
                                       scenario.test_stream):
            assert list(train.dataset.targets) == expected[domain, "train"]
            assert list(test.dataset.targets) == expected[domain, split]
    with pytest.raises(ConfigError, match=r"decathlon_test_split must be one of \('val', "
                                          r"'test'\), got 'test_stripped'"):
        resolve(RunConfig(benchmark="decathlon", decathlon_test_split="test_stripped"))


NO_QP_SOLVER = """import importlib.abc, sys

class NoSolvers(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith("qpsolvers.solvers.") and name.endswith("_"):
            raise ImportError(name)

sys.meta_path.insert(0, NoSolvers())
"""
"""A sitecustomize that hides every solver from qpsolvers, as on a machine without one."""


def test_the_command_line_prints_no_third_party_warning(tmp_path) -> None:
    (tmp_path / "sitecustomize.py").write_text(NO_QP_SOLVER)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    probe = subprocess.run([sys.executable, "-c", "import qpsolvers"], env=env,
                           capture_output=True, text=True)
    assert "no QP solver found" in probe.stderr  # what Avalanche's import would print
    command = subprocess.run([sys.executable, "-m", "avalanche_maskrkr", "run", "-h"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert command.returncode == 0 and "--decathlon-test-split" in command.stdout
    assert command.stderr == ""
