"""The baselines do what they say: each mechanism changes training against Naive from
the same seed, and each one's stored state is counted (SPEC section 4 conventions).

Every run trains a tiny MLP (64 -> 32 -> 2 per task) on the first two tasks of split
digits, one epoch each (PackNet: two, the second after pruning), under a second.
"""
from __future__ import annotations

import copy
import functools
import warnings
from dataclasses import dataclass

import pytest
import timm
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from avalanche_maskrkr.baseline_accounting import owner_bits
from avalanche_maskrkr.baselines import MultiHeadNetwork, build_baseline
from avalanche_maskrkr.benchmarks import split_digits
from avalanche_maskrkr.checkpoint import can_resume, capture, restore
from avalanche_maskrkr.evaluation import (
    ParameterCost,
    PeakMemory,
    parameter_cost,
    peak_memory_mb,
)

HIDDEN = 32
BACKBONE = 64 * HIDDEN + HIDDEN  # Linear(64, 32)
HEAD = HIDDEN * 2 + 2  # Linear(32, 2): two classes per task
REPLAY_SAMPLES = 20


@functools.cache
def _bench():
    return split_digits(n_experiences=5)


def _task0_outputs(model: nn.Module) -> torch.Tensor:
    """(64, 2) logits of task 0's first 64 test digits."""
    test = _bench().test_stream[0].dataset
    x = torch.stack([test[i][0] for i in range(64)])
    model.eval()
    with torch.no_grad():
        return model(x, torch.zeros(len(x), dtype=torch.long))


@dataclass
class Run:
    strategy: object
    after_first: dict  # the model's state dict after task 0
    task0_after_first: torch.Tensor  # _task0_outputs after task 0

    @property
    def model(self) -> nn.Module:
        return self.strategy.model

    def drift(self, prefix: str) -> float:
        """How far the parameters under ``prefix`` moved while training task 1."""
        now = self.model.state_dict()
        return torch.cat([(now[k] - self.after_first[k]).flatten() for k in now
                          if k.startswith(prefix)]).norm().item()


def _build(name: str, device: str = "cpu", plugins=(), **options):
    """Baseline ``name`` on the tiny MLP, seeded, with a ParameterCost evaluator."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No loggers specified")
        evaluator = EvaluationPlugin(ParameterCost(), PeakMemory(), loggers=[],
                                     collect_all=True)
    return build_baseline(
        name, lambda n: timm.create_model("simple_mlp", num_classes=n, in_chans=1,
                                          hidden_size=HIDDEN, hidden_layers=1),
        2, lambda params: torch.optim.Adam(params, lr=1e-2),
        {"replay_mem_size": REPLAY_SAMPLES, **options}, criterion=nn.CrossEntropyLoss(),
        train_mb_size=64, train_epochs=2 if name == "packnet" else 1, eval_mb_size=256,
        device=device, evaluator=evaluator, plugins=list(plugins))


@functools.cache
def _train(name: str, **options) -> Run:
    """Baseline ``name`` after tasks 0 and 1."""
    strategy = _build(name, **options)
    first, second = _bench().train_stream[:2]
    strategy.train(first, num_workers=0)
    run = Run(strategy, copy.deepcopy(strategy.model.state_dict()),
              _task0_outputs(strategy.model))
    strategy.train(second, num_workers=0)
    return run


@pytest.mark.parametrize("name", ["ewc", "si", "lwf", "replay"])
def test_mechanism_changes_task0_outputs_against_naive(name):
    """Same seed, same data: only the baseline's mechanism can make the outputs differ
    (before SI copied its weight snapshots, SI's were Naive's bit for bit)."""
    assert not torch.equal(_task0_outputs(_train(name).model), _task0_outputs(_train("naive").model))


@pytest.mark.parametrize("name, small, large", [("ewc", 1.0, 1e4), ("si", 1.0, 1e4)])
def test_larger_lambda_keeps_shared_weights_closer_to_task0(name, small, large):
    option = f"{name}_lambda"
    weak = _train(name, **{option: small}).drift("backbone.")
    strong = _train(name, **{option: large}).drift("backbone.")
    assert strong < 0.8 * weak


def test_si_regularises_with_a_positive_importance():
    """After two tasks SI holds importances (clamped at Avalanche's 1e-3) and reference
    weights that are copies, not views of the parameters."""
    run = _train("si")
    plugin = run.strategy.plugins[0]
    importance = torch.cat([v.data for v in plugin.ewc_data[1].values()])
    assert importance.max() == pytest.approx(1e-3) and importance.min() >= 0
    weight = run.model.backbone.features[0].weight
    reference = plugin.ewc_data[0]["backbone.features.0.weight"].data
    assert reference.data_ptr() != weight.data_ptr()
    assert torch.equal(reference, weight.detach().flatten())  # SI took it after task 1


@pytest.mark.parametrize("name", ["lwf", "replay"])
def test_lwf_and_replay_train_task0_head_during_task1(name):
    """Naive never touches task 0's head again; LwF distils into it, Replay replays its
    samples."""
    assert _train("naive").drift("tasks.0.") == 0
    assert _train(name).drift("tasks.0.") > 0


def test_multi_head_runs_a_mixed_batch_through_the_backbone_once():
    """Replay mixes tasks in a batch. With BatchNorm, a task with one sample in the batch
    trains (normalising it alone raised), and each row is its head over the features of
    the whole batch."""
    torch.manual_seed(0)
    model = MultiHeadNetwork(timm.create_model("test_resnet", num_classes=2, in_chans=1))
    for experience in _bench().train_stream[:2]:
        model.train().adaptation(experience)
    x, tasks = torch.randn(5, 1, 8, 8), torch.tensor([0, 0, 1, 0, 0])
    out = model(x, tasks)
    features = model.backbone(x)
    expected = torch.stack([model.tasks[str(t)](f) for f, t in zip(features, tasks.tolist())])
    torch.testing.assert_close(out, expected)


def test_packnet_keeps_task0_outputs_while_naive_forgets():
    for name, keeps in (("packnet", True), ("naive", False)):
        run = _train(name)
        assert torch.equal(_task0_outputs(run.model), run.task0_after_first) is keeps, name


def test_owner_bits():
    assert [owner_bits(t) for t in (1, 2, 3, 4, 7, 8)] == [1, 2, 2, 3, 3, 4]


# After two tasks (T = 2); fp32, 4 bytes a value; bytes per task: the whole / 2.
MODEL = BACKBONE + 2 * HEAD  # a shared backbone, a head per task
ONE_MODEL = BACKBONE + HEAD  # single-task model with its classifier (PackNet's model)
PACKNET_WEIGHTS = 64 * HIDDEN + HIDDEN * 2  # the weights that have an owner
EXPECTED = {
    "naive": (MODEL, 4 * MODEL / 2),
    "single": (2 * ONE_MODEL, 4 * ONE_MODEL),
    # per task t: importance + reference of every parameter then (base + t + 1 heads)
    "ewc": (MODEL + 2 * ONE_MODEL + 2 * MODEL, 4 * (MODEL + 2 * ONE_MODEL + 2 * MODEL) / 2),
    # reference + running path integral of every parameter
    "si": (3 * MODEL, 4 * 3 * MODEL / 2),
    # the previous model
    "lwf": (2 * MODEL, 4 * 2 * MODEL / 2),
    # REPLAY_SAMPLES 8x8 inputs
    "replay": (MODEL + REPLAY_SAMPLES * 64, 4 * (MODEL + REPLAY_SAMPLES * 64) / 2),
    # ceil(log2(3)) = 2 bits per weight: 1/16 of a parameter, 1/4 of a byte
    "packnet": (ONE_MODEL + PACKNET_WEIGHTS / 16, (4 * ONE_MODEL + PACKNET_WEIGHTS / 4) / 2),
}


@pytest.mark.parametrize("name", EXPECTED)
def test_parameter_cost_counts_what_each_baseline_stores(name):
    total, bytes_per_task = EXPECTED[name]
    cost = parameter_cost(_train(name).strategy.evaluator)
    assert cost == {"total_params": pytest.approx(total),
                    "bytes_per_task": pytest.approx(bytes_per_task)}


def test_peak_memory_logs_nothing_on_cpu():
    """A process-lifetime maximum is not an experience's peak: on CPU nothing is logged."""
    history = _train("naive").strategy.evaluator.get_all_metrics()
    assert not [name for name in history if name.startswith("PeakMemory_MB")]
    assert peak_memory_mb(history) == 0.0


class AllocateInFirstExperience(SupervisedPlugin):
    """Allocates 256 MiB on the device (freed at once) after each step of the first
    experience."""

    def after_training_iteration(self, strategy, **kwargs):
        if strategy.clock.train_exp_counter == 0:
            torch.empty(64 * 2**20, device=strategy.device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_is_each_experience_peak_on_cuda():
    strategy = _build("naive", device="cuda", plugins=[AllocateInFirstExperience()])
    for experience in _bench().train_stream[:2]:
        strategy.train(experience, num_workers=0)
    history = strategy.evaluator.get_all_metrics()
    peaks = [history[f"PeakMemory_MB/train_phase/train_stream/Task{i:03}/Exp{i:03}"][1][0]
             for i in range(2)]
    assert peaks[0] >= 256 > peaks[1] > 0


def test_si_resumes_from_a_checkpoint():
    """SI's state captured after task 0 and restored into a fresh strategy: task 1 then
    trains exactly as without the interruption."""
    first, second = _bench().train_stream[:2]
    interrupted = _build("si")
    interrupted.train(first, num_workers=0)
    assert can_resume(interrupted)
    state = capture(interrupted)
    resumed = _build("si")
    restore(resumed, state)
    resumed.train(second, num_workers=0)
    assert torch.equal(_task0_outputs(resumed.model), _task0_outputs(_train("si").model))
