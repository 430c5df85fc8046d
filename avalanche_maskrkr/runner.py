"""Run continual-learning strategies over a task-incremental benchmark.

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

Each strategy has its own default learning rate (DEFAULT_LR, measured on digits: mask
scores and the methods' small factors want different rates than whole networks); --lr
sets one rate for all. Method and baseline options are documented in
avalanche_maskrkr.options and avalanche_maskrkr.baselines.BaselineOptions.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import random
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import timm
import torch
from avalanche.evaluation.metrics import accuracy_metrics, timing_metrics
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from tqdm.auto import tqdm

from . import benchmarks
from .acceleration import PRECISIONS, AccelerationPlugin, loader_kwargs
from .accounting import create_backbone, find_k_plus
from .baselines import (
    BASELINE_OPTION_NAMES,
    BASELINES,
    BaselineOptions,
    StepDecay,
    build_baseline,
)
from .checkpoint import (
    CheckpointError,
    WeightsError,
    can_resume,
    capture,
    load_weights,
    read_checkpoint,
    restore,
    save_checkpoint,
)
from .evaluation import (
    ParameterCost,
    PeakMemory,
    MetricHistory,
    collect_accuracy_matrix,
    parameter_cost,
    total_train_time,
)
from .options import BN_POLICIES, METHODS, MethodOptions, make_options, option_names
from .layers import PLACEMENTS
from .plots import plot_all
from .results import format_table, strategy_slug, summary_frame, summary_row, write_results
from .strategies import RKR, MaskRKR, MethodStrategy, Piggyback

DEFAULT_STRATEGIES = ("rkr", "piggyback", "mask-rkr", "naive", "single", "ewc", "lwf")
DEFAULT_LR: dict[str, float] = {
    "rkr": 3e-3, "piggyback": 1e-3, "mask-rkr": 2e-3, "naive": 1e-3, "single": 1e-3,
    "multi-head": 1e-3, "ewc": 1e-3, "lwf": 1e-3, "si": 1e-3, "replay": 1e-3,
    "packnet": 1e-3,
}
"""Adam learning rate of each strategy when --lr is not given. Average accuracy on the
default digits job (5 epochs) at each rate tried:
rkr 1e-3 0.94, 3e-3 0.99, 1e-2 0.97; piggyback 5e-4 0.96, 1e-3 0.97, 2e-3 0.95,
1e-2 0.60; mask-rkr 1e-3 0.84, 2e-3 0.87, 3e-3 0.82,
1e-2 0.75; whole networks, 3e-4 / 1e-3 / 3e-3: naive 0.92 / 0.93 / 0.75, single
0.95 / 0.99 / 0.99, ewc 0.89 / 0.93 / 0.83 (lambda 1e3; 0.96 at 1e-3 with lambda 1e4),
lwf 0.94 / 0.98 / 0.98.
Other benchmarks want their own (the examples use Piggyback's recipe, 1e-4)."""


class BenchmarkDefaults(NamedTuple):
    """What a benchmark runs on unless told otherwise."""

    model: str
    img_size: int
    threads: int | None  # CPU threads; None: torch's default


BENCHMARK_DEFAULTS: dict[str, BenchmarkDefaults] = {
    # 8x8 digits: a second thread only adds synchronisation (and stalls badly when
    # other processes share the cores).
    "digits": BenchmarkDefaults("test_resnet", 8, 1),
    "cifar100": BenchmarkDefaults("resnet18_cifar", 32, None),
    "imagenet": BenchmarkDefaults("resnet18", 224, None),
    "decathlon": BenchmarkDefaults("resnet18", 64, None),
}

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
}
CHOICES = {"bn_policy": BN_POLICIES, "mask_placement": PLACEMENTS}
NOT_IN_CHECKPOINT = ("out", "restart", "data_root", "strategies")
"""Settings that do not change a strategy's results (the data root may move)."""


class ConfigError(ValueError):
    """A setting that cannot work: an unknown name, an invalid option value."""


@dataclass(frozen=True)
class RunConfig:
    """One run's settings (see ``python -m avalanche_maskrkr run --help``).

    ``None`` means "resolved by :func:`resolve`": the benchmark's defaults (model, image
    side, CPU threads), cuda when available, ``results/<benchmark>-<model>``. ``options``
    holds the method and baseline options given explicitly (by name, e.g. ``rank``).
    """

    benchmark: str = "digits"
    data_root: str | None = None
    tasks: int | None = None
    model: str | None = None
    img_size: int | None = None
    pretrained: bool = False
    weights: str | None = None
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    epochs: int = 5
    batch_size: int = 32
    eval_batch_size: int = 256
    optimizer: str = "adam"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_decay_epochs: int | None = None
    workers: int | None = None
    threads: int | None = None
    precision: str = "fp32"
    channels_last: bool = False
    device: str | None = None
    seed: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)
    out: str | None = None
    restart: bool = False


@dataclass(frozen=True)
class Variant:
    """One summary row: strategy ``strategy`` (a key of :data:`STRATEGIES`) named
    ``label``, with ``options`` overriding the run's method/baseline options."""

    label: str
    strategy: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    """A finished run: its resolved configuration, the summary frame and each variant's
    (T, T) accuracy matrix."""

    config: RunConfig
    summary: pd.DataFrame
    matrices: dict[str, np.ndarray]


# -- strategies ----------------------------------------------------------------------------
StrategyBuilder = Callable[..., SupervisedTemplate]


def _method_builder(cls: type[MethodStrategy]) -> StrategyBuilder:
    def build(make_backbone, num_classes, make_optimizer, options, **template):
        model = make_backbone(num_classes)
        return cls(model=model, optimizer=make_optimizer(model.parameters()), **template,
                   **options)
    return build


STRATEGIES: dict[str, StrategyBuilder] = {  # options: those of strategy_options
    "rkr": _method_builder(RKR),
    "piggyback": _method_builder(Piggyback),
    "mask-rkr": _method_builder(MaskRKR),
    **{name: functools.partial(build_baseline, name) for name in BASELINES},
}
"""Strategy name -> ``build(make_backbone, num_classes, make_optimizer, options,
**template)`` (see :func:`avalanche_maskrkr.baselines.build_baseline`)."""


def make_run_evaluator() -> EvaluationPlugin:
    """Accuracy per experience, epoch times, peak memory and parameter cost: metrics that
    keep no state from one experience to the next, so a checkpoint's history is all an
    interrupted run needs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No loggers specified")
        return EvaluationPlugin(*accuracy_metrics(experience=True),
                                *timing_metrics(epoch=True), PeakMemory(), ParameterCost(),
                                loggers=[], collect_all=True)


# -- configuration -------------------------------------------------------------------------
def _option_users(name: str) -> list[str]:
    """The strategies that read option ``name``: methods by their options class,
    baselines by the option's prefix (``ewc_lambda``: ewc)."""
    users = [method for method, cls in METHODS.items() if name in option_names(cls)]
    if name in BASELINE_OPTION_NAMES:
        prefix = name.split("_")[0]
        users.append(prefix if prefix in BASELINES else
                     "multi-head" if name == "train_base_first" else "baselines")
    return users


def _add_option_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "method and baseline options", "Default: each method's or baseline's own (shown); "
        "see avalanche_maskrkr.options and avalanche_maskrkr.baselines.BaselineOptions.")
    defaults = {f.name: f.default for cls in (*METHODS.values(), BaselineOptions)
                for f in dataclasses.fields(cls)}
    for name, default in defaults.items():
        shown = "off; on without pretrained weights" if name == "train_base_first" else default
        kwargs: dict[str, Any] = {"default": None, "dest": f"option_{name}",
                                  "help": f"{', '.join(_option_users(name))} (default: {shown})"}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif name in CHOICES:
            kwargs["choices"] = CHOICES[name]
        else:
            kwargs["type"] = type(default) if default is not None else str
            kwargs["metavar"] = name.split("_")[-1].upper()
        group.add_argument("--" + name.replace("_", "-"), **kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``run`` command's options (one per :class:`RunConfig` field)."""
    d = RunConfig()
    data = parser.add_argument_group("data and model")
    data.add_argument("--benchmark", choices=sorted(BENCHMARK_DEFAULTS), default=d.benchmark)
    data.add_argument("--data-root", metavar="DIR",
                      help="dataset folder (cifar100: holds cifar-100-python; imagenet: "
                           "train/ and val/; decathlon: the decathlon-1.0 folder)")
    data.add_argument("--tasks", type=int, metavar="T",
                      help="number of tasks (default: digits 5, cifar100 and imagenet 10; "
                           "decathlon: its 5 domains)")
    data.add_argument("--model", help="any timm model name, resnet18_cifar or simple_mlp "
                      "(default: " + ", ".join(f"{b} {d.model}" for b, d in
                                               BENCHMARK_DEFAULTS.items()) + ")")
    data.add_argument("--img-size", type=int, metavar="S",
                      help="input side (default: " + ", ".join(
                          f"{b} {d.img_size}" for b, d in BENCHMARK_DEFAULTS.items()) + ")")
    weights = data.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true",
                         help="timm's pretrained weights (downloads)")
    weights.add_argument("--weights", metavar="FILE", help="local .safetensors, .pth or "
                         ".npz (timm's original ViT) weights; the classifier is skipped")
    train = parser.add_argument_group("training")
    train.add_argument("--strategies", default=",".join(d.strategies),
                       help=f"comma-separated, from: {', '.join(STRATEGIES)}")
    train.add_argument("--epochs", type=int, default=d.epochs, help="per experience")
    train.add_argument("--batch-size", type=int, default=d.batch_size)
    train.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    train.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default=d.optimizer)
    train.add_argument("--lr", type=float, help="one learning rate for every strategy "
                       "(default: each strategy's, see DEFAULT_LR)")
    train.add_argument("--momentum", type=float, default=d.momentum, help="sgd only")
    train.add_argument("--weight-decay", type=float, default=d.weight_decay)
    train.add_argument("--lr-decay-epochs", type=int, metavar="N",
                       help="multiply the learning rate by 0.1 every N epochs")
    train.add_argument("--workers", type=int, default=d.workers,
                       help="data loader workers (default: half the CPU cores, at most 8, "
                            "on CUDA, with pinned memory; 0 on CPU)")
    train.add_argument("--threads", type=int, help="CPU threads of torch (default: digits 1, "
                       "others torch's default)")
    train.add_argument("--precision", choices=list(PRECISIONS), default=d.precision,
                       help="autocast of forward and loss (AccelerationPlugin); other than "
                            "fp32, a run checkpoints only at each strategy's end")
    train.add_argument("--channels-last", action="store_true",
                       help="channels-last layout of 4-d parameters and inputs (CNNs on GPU)")
    train.add_argument("--device", help="default: cuda when available, else cpu")
    train.add_argument("--seed", type=int, default=d.seed)
    _add_option_arguments(parser)
    output = parser.add_argument_group("output")
    output.add_argument("--out", metavar="DIR", help="default: results/<benchmark>-<model>")
    output.add_argument("--restart", action="store_true",
                        help="ignore and replace existing checkpoints")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The :class:`RunConfig` of parsed :func:`add_arguments` options."""
    values = vars(args)
    options = {k.removeprefix("option_"): v for k, v in values.items()
               if k.startswith("option_") and v is not None}
    names = {f.name for f in dataclasses.fields(RunConfig)} - {"options", "strategies"}
    strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
    return RunConfig(**{k: values[k] for k in names if k in values}, strategies=strategies,
                     options=options)


def resolve(config: RunConfig) -> RunConfig:
    """Fill the ``None`` defaults of ``config`` and check its names."""
    if config.benchmark not in BENCHMARK_DEFAULTS:
        raise ConfigError(f"unknown benchmark {config.benchmark!r}; choose one of "
                         f"{sorted(BENCHMARK_DEFAULTS)}")
    if unknown := [s for s in config.strategies if s not in STRATEGIES]:
        raise ConfigError(f"unknown strategies {unknown}; choose from {list(STRATEGIES)}")
    defaults = BENCHMARK_DEFAULTS[config.benchmark]
    model = config.model or defaults.model
    options = dict(config.options)
    options.setdefault("train_base_first", not (config.pretrained or config.weights))
    return dataclasses.replace(
        config, model=model, img_size=config.img_size or defaults.img_size, options=options,
        threads=config.threads or defaults.threads,
        device=config.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        out=config.out or str(Path("results") / f"{config.benchmark}-{model}"),
        weights=str(config.weights) if config.weights else None)


def strategy_lr(config: RunConfig, variant: Variant) -> float:
    return config.lr if config.lr is not None else DEFAULT_LR[variant.strategy]


def strategy_options(config: RunConfig, variant: Variant) -> dict[str, Any]:
    """The method or baseline options ``variant`` reads: the run's, then its own.

    Raises:
        ConfigError: an unknown strategy, an option of the variant that its strategy
            does not have, or a method option with an invalid value.
    """
    if variant.strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {variant.strategy!r} for {variant.label!r}; "
                          f"choose from {list(STRATEGIES)}")
    method = METHODS.get(variant.strategy)
    names = option_names(method) if method else BASELINE_OPTION_NAMES
    if unknown := sorted(set(variant.options) - names):
        raise ConfigError(f"{variant.label}: {variant.strategy} has no option(s) {unknown}")
    options = {k: v for k, v in {**config.options, **variant.options}.items() if k in names}
    if method:
        try:
            make_options(variant.strategy, **options)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{variant.label}: {err}") from err
    return options


def checkpoint_config(config: RunConfig, variant: Variant) -> dict[str, Any]:
    """What must match for a checkpoint of ``variant`` to be resumed: the settings that
    change its results, flat (options by their own names)."""
    settings = {k: v for k, v in dataclasses.asdict(config).items()
                if k not in (*NOT_IN_CHECKPOINT, "options")}
    return {**settings, **strategy_options(config, variant), "label": variant.label,
            "strategy": variant.strategy, "lr": strategy_lr(config, variant)}


# -- building blocks -----------------------------------------------------------------------
def build_benchmark(config: RunConfig):
    """The task-labelled scenario of a resolved ``config`` (see :mod:`.benchmarks`)."""
    # Pretrained backbones get their own normalisation, when timm knows it.
    backbone = (config.model if (config.pretrained or config.weights)
                and timm.get_pretrained_cfg(config.model) is not None else None)
    if config.benchmark == "digits":
        return benchmarks.split_digits(n_experiences=config.tasks or 5, channels=3,
                                       image_size=None if config.img_size == 8 else config.img_size,
                                       seed=config.seed)
    if config.benchmark != "cifar100" and config.data_root is None:
        raise FileNotFoundError(f"--benchmark {config.benchmark} needs --data-root")
    if config.benchmark == "decathlon":
        if config.tasks is not None:
            raise ConfigError("decathlon has one task per domain: --tasks does not apply")
        return benchmarks.visual_decathlon(config.data_root, image_size=config.img_size,
                                           backbone=backbone)
    build = {"cifar100": benchmarks.split_cifar100, "imagenet": benchmarks.split_imagenet}
    return build[config.benchmark](root=config.data_root, n_experiences=config.tasks or 10,
                                   image_size=config.img_size, seed=config.seed,
                                   backbone=backbone)


def build_backbone(config: RunConfig, num_classes: int) -> nn.Module:
    """A fresh ``config.model`` with ``num_classes`` outputs and the configured weights."""
    model = create_backbone(config.model, num_classes, img_size=config.img_size,
                            pretrained=config.pretrained)
    if config.weights:
        load_weights(model, config.weights, config.options.get("head_name"))
    return model


def single_task_params(config: RunConfig, num_classes: int) -> int:
    """Parameters of one single-task model (base + one head), built on the meta device."""
    with torch.device("meta"):
        model = create_backbone(config.model, num_classes, img_size=config.img_size)
    return sum(p.numel() for p in model.parameters())


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
    return STRATEGIES[variant.strategy](
        functools.partial(build_backbone, config), num_classes, make_optimizer,
        strategy_options(config, variant), criterion=nn.CrossEntropyLoss(),
        train_mb_size=config.batch_size, train_epochs=config.epochs,
        eval_mb_size=config.eval_batch_size, device=config.device,
        evaluator=make_run_evaluator(), plugins=plugins)


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
    num_classes = len(scenario.train_stream[0].classes_in_this_experience)
    strategy = build_strategy(config, variant, num_classes)
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
        if resumable or k == n - 1:
            save_checkpoint(path, {"config": checkpoint_config(config, variant),
                                   "next_experience": k + 1, **capture(strategy)})
        if after_experience is not None:
            after_experience(variant.label, k)
    return strategy.evaluator.get_all_metrics()


def _checkpoint_path(out: Path, label: str) -> Path:
    return out / "checkpoints" / f"{strategy_slug(label)}.pt"


def run(config: RunConfig, variants: Sequence[Variant] | None = None,
        after_experience: ExperienceHook | None = None, scenario=None) -> RunResult:
    """Train every variant (default: ``config.strategies``) over the benchmark (or the
    given ``scenario`` of a resolved config), resuming from the checkpoints under
    ``out``; write and return the results.

    Raises:
        CheckpointError: a checkpoint is unreadable or from another configuration
            (nothing is trained or written then).
    """
    config = resolve(config)
    variants = list(variants or [Variant(s, s) for s in config.strategies])
    out = Path(config.out)
    paths = {v.label: _checkpoint_path(out, v.label) for v in variants}
    if config.restart:
        for path in paths.values():
            path.unlink(missing_ok=True)
    saved = {v.label: read_checkpoint(paths[v.label], checkpoint_config(config, v))
             for v in variants}
    scenario = scenario or build_benchmark(config)
    _announce(config, len(scenario.train_stream), saved)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads or threads)
    try:
        with tqdm(total=len(scenario.train_stream) * len(variants), unit="task") as bar:
            histories = {v.label: _run_variant(config, v, scenario, paths[v.label],
                                               saved[v.label], bar, after_experience)
                         for v in variants}
    finally:
        torch.set_num_threads(threads)
    result = _summarise(config, histories, scenario)
    print(format_table(result.summary))
    print(f"results in {config.out}")
    return result


def _announce(config: RunConfig, tasks: int, saved: Mapping[str, dict | None]) -> None:
    weights = config.weights or ("timm's pretrained weights" if config.pretrained
                                 else "random weights")
    print(f"{config.benchmark}: {tasks} tasks; {config.model} at {config.img_size}px from "
          f"{weights}, on {config.device}.")
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
    single = single_task_params(config, len(scenario.train_stream[0].classes_in_this_experience))
    rows, matrices = [], {}
    for label, history in histories.items():
        matrices[label] = collect_accuracy_matrix(history, n)
        total = parameter_cost(history)["total_params"]
        rows.append(summary_row(label, matrices[label], round(total),
                                round(100 * (total - single) / single, 3),
                                total_train_time(history)))
    summary = summary_frame(rows)
    write_results(config.out, summary, matrices)
    plot_all(config.out, summary, matrices)
    return RunResult(config, summary, matrices)


def main(args: argparse.Namespace) -> None:
    """The ``run`` command: :func:`run` of the parsed options; settings, checkpoints,
    weights files and data folders that do not work end it with a message, no traceback."""
    try:
        run(config_from_args(args))
    except (ConfigError, CheckpointError, WeightsError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from err


# -- scaffolding of the example scripts ----------------------------------------------------
PIGGYBACK_RECIPE = {"optimizer": "adam", "lr": 1e-4, "epochs": 30, "batch_size": 32,
                    "lr_decay_epochs": 15}
"""Piggyback's official recipe (SPEC section 3), used for every method by the examples."""

SMOKE = {"model": "test_resnet", "img_size": 32, "tasks": 2, "epochs": 1, "batch_size": 8,
         "pretrained": False, "weights": None, "lr_decay_epochs": None, "threads": 1}
"""``--smoke``: a tiny random model, one epoch, two tasks, one thread (as for digits)."""

PAPER_BACKBONES = {"resnet": "ResNet-18", "vit": "ViT", "swin": "Swin"}
"""Substring of a model name -> the paper's column (ResNet-18 / ViT / Swin)."""

PaperNumbers = Mapping[str, Sequence[float | None]]
"""Strategy label -> the paper's (ResNet-18, ViT, Swin) values (None: not reported)."""

VariantsFactory = Callable[[RunConfig, Any], list[Variant]]


def run_example(argv: Sequence[str] | None, doc: str, name: str, variants: VariantsFactory,
                smoke_data: Callable[[Path], Path] | None = None,
                smoke: Mapping[str, Any] | None = None, **defaults) -> RunResult:
    """An example script's run: the ``run`` options with ``defaults``, plus ``--smoke``.

    Results go to ``--out``/<model> (default root ``results/<name>-<benchmark>``), so
    runs of several backbones share a root. ``variants(config, scenario)`` gives the
    rows. ``--smoke`` applies :data:`SMOKE` then ``smoke``, with the data that
    ``smoke_data(folder)`` writes in a temporary folder (it returns the data root).
    """
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--smoke", action="store_true",
                        help="a check in seconds: tiny random model, 1 epoch, 2 tasks, "
                             "miniature data written to a temporary folder")
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    config = config_from_args(args)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            data_root = str(smoke_data(Path(tmp))) if smoke_data else config.data_root
            config = dataclasses.replace(config, **{**SMOKE, **(smoke or {})},
                                         data_root=data_root)
        root = Path(config.out or Path("results") / f"{name}-{config.benchmark}")
        model = config.model or BENCHMARK_DEFAULTS[config.benchmark].model
        config = resolve(dataclasses.replace(config, model=model, out=str(root / model)))
        scenario = build_benchmark(config)
        return run(config, variants(config, scenario), scenario=scenario)


def reproduce_paper(argv: Sequence[str] | None, doc: str, title: str, paper: PaperNumbers,
                    smoke_data: Callable[[Path], Path], variants: VariantsFactory | None = None,
                    name: str = "paper", **defaults) -> RunResult:
    """An example reproducing one of the paper's tables: :func:`run_example` of
    ``variants`` (default :func:`paper_variants`) with Piggyback's recipe, then
    :func:`compare_with_paper`."""
    result = run_example(argv, doc, name, variants or paper_variants, smoke_data,
                         **{**PIGGYBACK_RECIPE, **defaults})
    compare_with_paper(result, paper, title)
    return result


def strategy_variants(config: RunConfig, scenario) -> list[Variant]:
    """One variant per ``config.strategies`` entry."""
    return [Variant(s, s) for s in config.strategies]


def paper_variants(config: RunConfig, scenario) -> list[Variant]:
    """The paper's rows: RKR (K=2), Piggyback, Mask-RKR (K=2), Mask-RKR (K+, matching
    RKR's total, :func:`~avalanche_maskrkr.accounting.find_k_plus`), Single, Multi-Head."""
    shared = option_names(MethodOptions)  # options of both RKR and Mask-RKR
    k_plus = find_k_plus(config.model, len(scenario.train_stream), rank=2,
                         classes_per_task=len(scenario.train_stream[0].classes_in_this_experience),
                         img_size=config.img_size,
                         **{k: v for k, v in config.options.items() if k in shared})
    return [Variant("rkr", "rkr", {"rank": 2}), Variant("piggyback", "piggyback"),
            Variant("mask-rkr", "mask-rkr", {"rank": 2}),
            Variant("mask-rkr-k+", "mask-rkr", {"rank": k_plus}),
            Variant("single", "single"), Variant("multi-head", "multi-head")]


def paper_family(model: str) -> str:
    """The paper's column of ``model`` (e.g. ``vit_base_patch16_224`` -> ``ViT``)."""
    return next((family for key, family in PAPER_BACKBONES.items() if key in model), model)


def compare_with_paper(result: RunResult, paper: PaperNumbers, title: str,
                       column: str = "avg_accuracy") -> pd.DataFrame:
    """The paper's layout: one row per strategy, per backbone our value and the paper's.

    Ours are read from every ``<root>/<model>/summary.csv`` beside ``result`` (one
    folder per backbone run), so the table fills up as backbones are run. Printed, and
    written to ``<root>/paper_table.md``.
    """
    root = Path(result.config.out).parent
    ours = {paper_family(path.parent.name): pd.read_csv(path).set_index("strategy")[column]
            for path in sorted(root.glob("*/summary.csv"))}
    rows = list(dict.fromkeys([*result.summary["strategy"], *paper]))
    table = pd.DataFrame({"strategy": rows})
    for i, family in enumerate(PAPER_BACKBONES.values()):
        values = ours.get(family, pd.Series(dtype=float))
        table[family] = [values.get(row, np.nan) for row in rows]
        table[f"{family} (paper)"] = [
            np.nan if paper.get(row) is None or paper[row][i] is None else paper[row][i]
            for row in rows]
    tasks = len(next(iter(result.matrices.values())))
    text = (f"{title}, {tasks} tasks: {column}, ours beside the paper's\n\n"
            f"{format_table(table)}\n")
    (root / "paper_table.md").write_text(text)
    print(text)
    return table
