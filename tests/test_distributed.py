"""The runner under torchrun: two CPU processes (gloo) train like one process on the global
batch, the first one alone writes and prints, and a killed run resumes to the results of
an uninterrupted one.

Why the first equality holds: the distributed sampler draws one permutation of the
experience from (seed, epoch), whatever the number of processes, and gives rank r its
entries r, r + 2, ... so that step i of the two processes covers exactly the 2B samples of
step i of one process with batch 2B. Averaging the two processes' mean-loss gradients
gives the gradient of the mean loss over those 2B samples; with plain SGD the parameters
then agree with the one-process run up to float summation order. This needs an even
number of samples: the sampler pads an odd one by repeating a sample (digits' first task
of two has 630, the second 627).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from avalanche.core import SupervisedPlugin

from avalanche_maskrkr import cli
from avalanche_maskrkr.benchmarks import split_digits
from avalanche_maskrkr.distributed import DistributedPlugin, process_group

BATCH = 8  # per process
RUN = ["run", "--tasks", "2", "--epochs", "2", "--optimizer", "sgd", "--lr", "0.05",
       "--no-train-base-first"]
METHOD = [*RUN, "--strategies", "mask-rkr", "--model", "simple_mlp"]
"""One process against two: Mask-RKR (real factors on the first task, masks over them on
the second) on a network without BatchNorm (each process would normalise its own batch)."""
ANY = ["run", "--tasks", "2", "--epochs", "1", "--strategies", "ewc,multi-head,rkr",
       "--batch-size", str(BATCH)]
"""Killed and resumed: EWC (a penalty on earlier heads), Multi-Head (its base trains with
the first task, BatchNorm statistics included, then feeds the second task's head features
normalised with those statistics: rank 0's) and RKR, with their default optimizer and
rates."""
STRATEGIES = ANY[ANY.index("--strategies") + 1].split(",")

DRIVER = """import json, sys
import torch
from avalanche_maskrkr import cli, runner
from avalanche_maskrkr.distributed import process_group

class Killed(Exception):
    pass

def kill_at(label, experience):
    def hook(name, k):
        if (name, k) == (label, experience):
            raise Killed
    return hook

def config(argv, out):
    parser = cli.argparse.ArgumentParser()
    cli.add_run_arguments(parser)
    return cli.config_from_args(parser.parse_args([*argv[1:], "--out", out]))

out, method, run = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
with process_group("cpu"):
    cli.main([*method, "--out", f"{out}/method"])
    full = runner.run(config(run, f"{out}/full"))
    rank = torch.distributed.get_rank()
    with open(f"{out}/matrices{rank}.json", "w") as f:
        json.dump({label: matrix.tolist() for label, matrix in full.matrices.items()}, f)
    for strategy in full.matrices:
        try:
            runner.run(config(run, f"{out}/killed"), after_experience=kill_at(strategy, 0))
        except Killed:
            pass
    cli.main([*run, "--out", f"{out}/killed"])
"""
"""Run by each of the two processes: the method run, the uninterrupted run (each process
writes the accuracy matrices it returns), then the same run killed after each strategy's
first experience and resumed."""


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """The driver's folder: method/, full/, killed/ and logs/ (each process's output)."""
    out = tmp_path_factory.mktemp("torchrun")
    (out / "driver.py").write_text(DRIVER)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         "2", "--log-dir", str(out / "logs"), "--redirects", "3", str(out / "driver.py"),
         str(out), " ".join([*METHOD, "--batch-size", str(BATCH)]), " ".join(ANY)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=600)
    assert run.returncode == 0, run.stderr[-3000:] + "".join(
        path.read_text()[-3000:] for path in (out / "logs").rglob("stderr.log"))
    return out


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


@pytest.fixture
def one_process_group(monkeypatch) -> None:
    """torchrun's environment for a group of one process: the runner joins it."""
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": _free_port(), "RANK": "0",
                        "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)


def _model(folder: Path, strategy: str) -> dict[str, torch.Tensor]:
    return torch.load(folder / "checkpoints" / f"{strategy}.pt", weights_only=True)["model"]


def _first_task(model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The first task's parameters: Mask-RKR's real factors and the head."""
    return {name: tensor for name, tensor in model.items()
            if ".tasks.0." in name or name.startswith("heads.0.")}


def test_two_processes_train_like_one_process_on_the_global_batch(two_processes, tmp_path,
                                                                 one_process_group) -> None:
    cli.main([*METHOD, "--batch-size", str(2 * BATCH), "--out", str(tmp_path / "one")])
    one = _first_task(_model(tmp_path / "one", "mask-rkr"))
    two = _first_task(_model(two_processes / "method", "mask-rkr"))
    assert one.keys() == two.keys() and len(one) > 2
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, rtol=1e-4, atol=1e-6)
    # The comparison is not vacuous: training moved every one of these parameters.
    cli.main([*METHOD, "--lr", "0", "--batch-size", str(2 * BATCH), "--out",
              str(tmp_path / "untrained")])
    untrained = _first_task(_model(tmp_path / "untrained", "mask-rkr"))
    assert not any(torch.allclose(untrained[name], tensor) for name, tensor in one.items())


def test_only_the_first_process_writes_and_prints(two_processes) -> None:
    summary = pd.read_csv(two_processes / "full" / "summary.csv")
    assert summary["strategy"].tolist() == STRATEGIES
    [rank0] = (two_processes / "logs").rglob("0/stdout.log")
    [rank1] = (two_processes / "logs").rglob("1/stdout.log")
    assert "| ewc |" in rank0.read_text() and "in 2 processes (batch 8 each)" in rank0.read_text()
    assert rank1.read_text() == ""
    assert "not compatible" not in "".join(p.read_text() for p in
                                           (two_processes / "logs").rglob("stderr.log"))


def test_every_process_ends_each_experience_with_the_same_model(two_processes) -> None:
    # each evaluated the whole stream after each experience, with rank 0's BatchNorm
    # statistics (multi-head's base trained them with the first task)
    ranks = [json.loads((two_processes / f"matrices{r}.json").read_text()) for r in (0, 1)]
    assert list(ranks[0]) == list(ranks[1]) == STRATEGIES
    for strategy in STRATEGIES:
        np.testing.assert_array_equal(ranks[1][strategy], ranks[0][strategy])


def test_a_killed_two_process_run_resumes_to_the_uninterrupted_results(two_processes) -> None:
    full, killed = two_processes / "full", two_processes / "killed"
    pd.testing.assert_frame_equal(pd.read_csv(killed / "summary.csv").drop(columns="train_seconds"),
                                  pd.read_csv(full / "summary.csv").drop(columns="train_seconds"))
    for strategy in STRATEGIES:
        resumed, uninterrupted = _model(killed, strategy), _model(full, strategy)
        assert resumed.keys() == uninterrupted.keys()
        for name, value in uninterrupted.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(resumed[name], value), name
            else:  # the network's task structure
                assert resumed[name] == value, name


class _FirstBatches(SupervisedPlugin):
    """The first minibatch's inputs of every training epoch."""

    def __init__(self):
        super().__init__()
        self.batches: list[torch.Tensor] = []

    def after_training_iteration(self, strategy, **kwargs):
        if strategy.clock.train_epoch_iterations == 0:
            self.batches.append(strategy.mb_x.clone())


def test_every_epoch_draws_its_own_order(one_process_group) -> None:
    experience = split_digits(n_experiences=5, channels=1).train_stream[0]
    seen = {}
    for plugins in ([], [DistributedPlugin(seed=0)]):
        record = _FirstBatches()
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
        with process_group("cpu"):
            Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                  train_mb_size=len(experience.dataset), train_epochs=2,
                  plugins=[*plugins, record],
                  evaluator=EvaluationPlugin(loggers=[])).train(experience)
        seen[len(plugins)] = record.batches
    # Avalanche's distributed sampler alone draws one order for every epoch...
    first, second = seen[0]
    assert torch.equal(first, second)
    # ...the plugin draws another each epoch, over the same samples.
    first, second = seen[1]
    assert not torch.equal(first, second)
    torch.testing.assert_close(first.sum(0), second.sum(0))
