"""Run continual-learning strategies over a task- or class-incremental benchmark.

With no arguments: RKR, Piggyback, Mask-RKR and the baselines naive (multi-head
fine-tuning), single (one model per task), EWC and LwF on scikit-learn's digits (5 tasks
of 2 classes, 8x8 images, nothing downloaded) with timm's tiny ``test_resnet`` from
random weights, in about a minute on two CPU cores. Without pretrained weights the
methods train the base network with the first task and freeze it afterwards
(--train-base-first, the original RKR protocol); with --pretrained or --weights the base
is frozen from the start.

Writes to --out (default results/<benchmark>-<model>): summary.csv (strategy,
avg_accuracy, forgetting, total_params, overhead_pct, train_seconds), summary.md,
accuracy_matrix_<strategy>.csv (row i, column j: accuracy on task j after training task
i), plots, and checkpoints/<strategy>.pt after every experience (replay and packnet: at
their end). The same command run again resumes after the last finished experience
(finished strategies are not retrained) and gives the same results; a checkpoint from
another configuration is an error (pass --restart to start over).

With --scenario class: no task label at test time, one label space (the published class
order on CIFAR-100 and ImageNet: seed 1993; --seed seeds the training), and the
strategies SimpleCIL, RanPAC, APER, RKR, Piggyback and Mask-RKR with task-free inference
(--task-inference, default: the ranpac router) and Avalanche's naive fine-tuning, LwF
and Replay (also ewc, si, der, icarl). summary.csv then has the columns strategy,
avg_incremental_accuracy, last_accuracy, forgetting, task_id_accuracy (the routers'),
total_params, overhead_pct, train_seconds.

Several processes: torchrun --nproc_per_node N -m avalanche_maskrkr run ... (gloo on
CPU, nccl on CUDA, one GPU per process). Each process trains its shard of every batch of
--batch-size samples (the global batch is N times that) and averages its gradients with
the others' (avalanche_maskrkr.distributed); the first one writes and prints. Resuming
needs the same N.

Each strategy has its own default learning rate (DEFAULT_LR in avalanche_maskrkr.config,
measured on digits: mask scores and the methods' small factors want different rates than
whole networks); --lr sets one rate for all. Method and baseline options are documented
in avalanche_maskrkr.options and avalanche_maskrkr.baselines.BaselineOptions.
"""
from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
from avalanche.distributed import DistributedHelper
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from tqdm.auto import tqdm

from .acceleration import AccelerationPlugin, loader_kwargs
from .accounting import single_model_size
from .baselines import StepDecay
from .benchmarks import build_benchmark as build_stream
from .checkpoint import can_resume, capture, load_weights, read_checkpoint, restore, save_checkpoint
from .config import (
    OPTIMIZERS,
    ConfigError,
    RunConfig,
    Variant,
    checkpoint_config,
    resolve,
    strategy_lr,
    strategy_options,
)
from .distributed import DistributedPlugin, process_device, process_group
from .evaluation import (
    MetricHistory,
    ParameterCost,
    collect_accuracy_matrix,
    final_task_id_accuracy,
    make_evaluator,
    parameter_cost,
    total_train_time,
)
from .models import create_backbone
from .plots import plot_all
from .registry import strategies_for
from .results import (class_summary_row, format_table, strategy_slug, summary_frame, summary_row,
                      write_results)

__all__ = ["ExperienceHook", "RunConfig", "RunResult", "Variant", "build_backbone",
           "build_benchmark", "build_strategy", "run"]


@dataclass
class RunResult:
    """A finished run: its resolved configuration, the summary frame and each variant's
    (T, T) accuracy matrix."""

    config: RunConfig
    summary: pd.DataFrame
    matrices: dict[str, np.ndarray]


# -- building blocks -----------------------------------------------------------------------
def build_benchmark(config: RunConfig):
    """The task- or class-incremental scenario of a resolved ``config`` (see
    :mod:`.benchmarks`; class-incremental: the published class order)."""
    # Pretrained backbones get their own normalisation, when timm knows it.
    backbone = (config.model if (config.pretrained or config.weights)
                and timm.get_pretrained_cfg(config.model) is not None else None)
    try:
        return build_stream(config.benchmark, config.img_size,
                            seed=config.seed if config.scenario == "task" else None,
                            scenario=config.scenario, tasks=config.tasks, data_root=config.data_root, backbone=backbone,
                            decathlon_test_split=config.decathlon_test_split)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def build_backbone(config: RunConfig, num_classes: int) -> nn.Module:
    """A fresh ``config.model`` with ``num_classes`` outputs and the configured weights."""
    model = create_backbone(config.model, num_classes, img_size=config.img_size,
                            pretrained=config.pretrained)
    if config.weights:
        load_weights(model, config.weights, config.options.get("head_name"))
    return model


def build_strategy(config: RunConfig, variant: Variant, num_classes: int) -> SupervisedTemplate:
    """``variant``'s strategy with a fresh model and evaluator (seed the RNGs first)."""
    lr = strategy_lr(config, variant)
    optimizer_class = OPTIMIZERS[config.optimizer]
    extra = {"momentum": config.momentum} if config.optimizer == "sgd" else {}

    def make_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return optimizer_class(params, lr=lr, weight_decay=config.weight_decay, **extra)

    plugins = [StepDecay(lr, config.lr_decay_epochs)] if config.lr_decay_epochs else []
    if config.precision != "fp32" or config.channels_last:
        plugins.append(AccelerationPlugin(precision=config.precision,
                                          channels_last=config.channels_last))
    # Metrics that keep no state between experiences: a checkpoint's history suffices.
    evaluator = make_evaluator(extra_metrics=[ParameterCost()], resumable=True)
    strategy = strategies_for(config.scenario)[variant.strategy](
        functools.partial(build_backbone, config), num_classes, make_optimizer,
        strategy_options(config, variant), criterion=nn.CrossEntropyLoss(),
        train_mb_size=config.batch_size, train_epochs=config.epochs,
        eval_mb_size=config.eval_batch_size, device=process_device(config.device),
        evaluator=evaluator, plugins=plugins)
    if DistributedHelper.is_distributed:
        # First, so that every other plugin sees averaged gradients and one model in every
        # process: each plugin then does in every process what it does in one, which
        # Avalanche's check of its plugins' flags (a warning per plugin) cannot know.
        strategy.plugins.insert(0, DistributedPlugin(config.seed))
        for plugin in strategy.plugins:
            plugin.supports_distributed = True
    return strategy


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


# -- the run -------------------------------------------------------------------------------
ExperienceHook = Callable[[str, int], None]
"""Called with (variant label, experience index) after each experience's checkpoint."""


def _run_variant(config: RunConfig, variant: Variant, scenario, path: Path,
                 saved: dict | None, bar: tqdm,
                 after_experience: ExperienceHook | None) -> MetricHistory:
    """Train ``variant`` over the stream from where ``saved`` stopped; its metric history."""
    n = len(scenario.train_stream)
    if saved is not None and saved["next_experience"] == n:
        bar.update(n)
        return saved["metrics"]
    seed_everything(config.seed)
    strategy = build_strategy(config, variant, _num_classes(config, scenario))
    start = 0
    if saved is not None:
        restore(strategy, saved)
        start = saved["next_experience"]
        bar.update(start)
    resumable = can_resume(strategy)
    loading = loader_kwargs(config.device, config.workers)
    for k in range(start, n):
        bar.set_description(f"{variant.label} task {k + 1}/{n}")
        strategy.train(scenario.train_stream[k], **loading)
        results = strategy.eval(scenario.test_stream[: k + 1], **loading)
        accuracy = next(v for name, v in results.items()
                        if name.startswith("Top1_Acc_Exp/") and name.endswith(f"/Exp{k:03d}"))
        bar.set_postfix(acc=f"{accuracy:.3f}")
        bar.update(1)
        if (resumable or k == n - 1) and DistributedHelper.is_main_process:
            save_checkpoint(path, {"config": checkpoint_config(config, variant),
                                   "next_experience": k + 1, **capture(strategy)})
        if after_experience is not None:
            after_experience(variant.label, k)
    return strategy.evaluator.get_all_metrics()


def _num_classes(config: RunConfig, scenario) -> int:
    """The classifier size a strategy's backbone is built with: the first task's classes
    (task-incremental), or every class of the stream (class-incremental)."""
    if config.scenario == "class":
        return scenario.n_classes
    return len(scenario.train_stream[0].classes_in_this_experience)


def _checkpoint_path(out: Path, label: str) -> Path:
    return out / "checkpoints" / f"{strategy_slug(label)}.pt"


def run(config: RunConfig, variants: Sequence[Variant] | None = None,
        after_experience: ExperienceHook | None = None, scenario=None) -> RunResult:
    """Train every variant (default: ``config.strategies``) over the benchmark (or the
    given ``scenario`` of a resolved config), resuming from the checkpoints under
    ``out``; write and return the results.

    Launched by torchrun, every process trains its shard of each batch
    (:mod:`.distributed`); the first one alone writes the checkpoints, results and plots,
    and prints. Every process returns the result.

    Raises:
        CheckpointError: a checkpoint is unreadable or from another configuration
            (nothing is trained or written then).
    """
    config = resolve(config)
    with process_group(config.device):
        return _run(config, list(variants or [Variant(s, s) for s in config.strategies]),
                    after_experience, scenario)


def _run(config: RunConfig, variants: list[Variant], after_experience: ExperienceHook | None,
         scenario) -> RunResult:
    writer = DistributedHelper.is_main_process
    out = Path(config.out)
    paths = {v.label: _checkpoint_path(out, v.label) for v in variants}
    if config.restart and writer:
        for path in paths.values():
            path.unlink(missing_ok=True)
    DistributedHelper.barrier()
    saved = {v.label: read_checkpoint(paths[v.label], checkpoint_config(config, v))
             for v in variants}
    scenario = scenario or build_benchmark(config)
    if writer:
        _announce(config, len(scenario.train_stream), saved)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads or threads)
    try:
        with tqdm(total=len(scenario.train_stream) * len(variants), unit="task",
                  disable=not writer) as bar:
            histories = {v.label: _run_variant(config, v, scenario, paths[v.label],
                                               saved[v.label], bar, after_experience)
                         for v in variants}
    finally:
        torch.set_num_threads(threads)
    result = _summarise(config, histories, scenario)
    if writer:
        write_results(config.out, result.summary, result.matrices)
        plot_all(config.out, result.summary, result.matrices)
        print(format_table(result.summary))
        print(f"results in {config.out}")
    return result


def _announce(config: RunConfig, tasks: int, saved: Mapping[str, dict | None]) -> None:
    weights = config.weights or ("timm's pretrained weights" if config.pretrained
                                 else "random weights")
    processes = DistributedHelper.world_size
    print(f"{config.benchmark}: {tasks} tasks; {config.model} at {config.img_size}px from "
          f"{weights}, on {config.device}" + (
              f" in {processes} processes (batch {config.batch_size} each)."
              if processes > 1 else "."))
    print("The methods and multi-head " + (
        "train the base network with the first task and freeze it afterwards "
        "(train_base_first, the original RKR protocol)." if config.options["train_base_first"]
        else "keep the base network frozen."))
    if resumed := [f"{label} (after task {s['next_experience']})"
                   for label, s in saved.items() if s]:
        print(f"resuming from checkpoints in {Path(config.out) / 'checkpoints'}: "
              + ", ".join(resumed))


def _summarise(config: RunConfig, histories: Mapping[str, MetricHistory],
               scenario) -> RunResult:
    n = len(scenario.train_stream)
    single, _ = single_model_size(config.model, _num_classes(config, scenario), config.img_size)
    sizes = [len(experience.dataset) for experience in scenario.test_stream]
    rows, matrices = [], {}
    for label, history in histories.items():
        matrices[label] = collect_accuracy_matrix(history, n)
        total = parameter_cost(history)["total_params"]
        cost = (round(total), round(100 * (total - single) / single, 3), total_train_time(history))
        if config.scenario == "task":
            rows.append(summary_row(label, matrices[label], *cost))
        else:
            rows.append(class_summary_row(label, matrices[label], sizes, *cost,
                                          task_id_accuracy=final_task_id_accuracy(history, sizes)))
    return RunResult(config, summary_frame(rows), matrices)
