"""A run's settings: :class:`RunConfig`, its defaults and their resolution, each
variant's options and learning rate, and what identifies a run's checkpoints."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from avalanche.distributed import DistributedHelper

from .benchmarks import BENCHMARK_DEFAULTS, DECATHLON_TEST_SPLITS
from .options import METHODS, make_options
from .registry import strategies_for, strategy_option_names, trains_masks
from .routing import DEFAULT_TASK_INFERENCE

DEFAULT_STRATEGIES = ("rkr", "piggyback", "mask-rkr", "naive", "single", "ewc", "lwf")
DEFAULT_CLASS_STRATEGIES = ("simplecil", "ranpac", "aper", "rkr", "piggyback", "mask-rkr",
                            "naive", "lwf", "replay")
"""What ``--scenario class`` runs unless told otherwise."""
DEFAULT_LR: dict[str, float] = {
    "rkr": 3e-3, "piggyback": 1e-3, "mask-rkr": 2e-3, "naive": 1e-3, "single": 1e-3,
    "multi-head": 1e-3, "ewc": 1e-3, "lwf": 1e-3, "si": 1e-3, "replay": 1e-3,
    "packnet": 1e-3, "der": 1e-3, "icarl": 1e-3, "aper": 1e-3,
    "simplecil": 1e-3,  # no gradient step: unused
    "ranpac": 1e-3,  # for its first-session adaptation (--ranpac-adapter) only, as APER's
}
"""Adam learning rate of each strategy when --lr is not given (see :func:`strategy_lr`).
Average accuracy on the default digits job (5 epochs) at each rate tried:
rkr 1e-3 0.94, 3e-3 0.99, 1e-2 0.97; piggyback 5e-4 0.96, 1e-3 0.97, 2e-3 0.95,
1e-2 0.60; mask-rkr 1e-3 0.84, 2e-3 0.87, 3e-3 0.82,
1e-2 0.75; whole networks, 3e-4 / 1e-3 / 3e-3: naive 0.92 / 0.93 / 0.75, single
0.95 / 0.99 / 0.99, ewc 0.89 / 0.93 / 0.83 (lambda 1e3; 0.96 at 1e-3 with lambda 1e4),
lwf 0.94 / 0.98 / 0.98.
These rates are the from-scratch job's (train_base_first), where the mask scores also
train at the strategy's rate (``mask_lr``); other benchmarks want their own (the examples
use Piggyback's recipe, 1e-4)."""

PRETRAINED_LR = 1e-3
"""Adam learning rate of every strategy on a pretrained base (--pretrained, --weights)
when --lr is not given: the usual ``Adam(model.parameters(), lr=1e-3)``, which the
methods split by role (head and real-valued factors at 1e-3, mask scores at 1e-4; see
:class:`~avalanche_maskrkr.options.MethodOptions`). Measured on a frozen pretrained
proxy in benchmarks/RESULTS.md ("Frozen pretrained backbone")."""

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
}
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
    scenario: str = "task"
    data_root: str | None = None
    decathlon_test_split: str = "val"
    tasks: int | None = None
    model: str | None = None
    img_size: int | None = None
    pretrained: bool = False
    weights: str | None = None
    strategies: tuple[str, ...] | None = None
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
    """One summary row: strategy ``strategy`` (a key of
    :data:`~avalanche_maskrkr.registry.STRATEGIES`) named ``label``, with ``options``
    overriding the run's method/baseline options."""

    label: str
    strategy: str
    options: Mapping[str, Any] = field(default_factory=dict)


def resolve(config: RunConfig) -> RunConfig:
    """Fill the ``None`` defaults of ``config`` and check its names."""
    try:
        known = strategies_for(config.scenario)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    strategies = config.strategies or (DEFAULT_STRATEGIES if config.scenario == "task"
                                       else DEFAULT_CLASS_STRATEGIES)
    if config.benchmark not in BENCHMARK_DEFAULTS:
        raise ConfigError(f"unknown benchmark {config.benchmark!r}; choose one of "
                          f"{sorted(BENCHMARK_DEFAULTS)}")
    if config.decathlon_test_split not in DECATHLON_TEST_SPLITS:
        raise ConfigError(f"decathlon_test_split must be one of {DECATHLON_TEST_SPLITS}, got "
                          f"{config.decathlon_test_split!r}")
    if unknown := [s for s in strategies if s not in known]:
        raise ConfigError(f"unknown {config.scenario}-incremental strategies {unknown}; "
                          f"choose from {list(known)}")
    defaults = BENCHMARK_DEFAULTS[config.benchmark]
    model = config.model or defaults.model
    options = dict(config.options)
    options.setdefault("train_base_first", not pretrained(config))
    options.setdefault("ranpac_dim", defaults.ranpac_dim)
    return dataclasses.replace(
        config, strategies=tuple(strategies), model=model,
        img_size=config.img_size or defaults.img_size, options=options,
        threads=config.threads or defaults.threads,
        device=config.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        out=config.out or str(Path("results") / f"{config.benchmark}-{model}"),
        weights=str(config.weights) if config.weights else None)


def pretrained(config: RunConfig) -> bool:
    """Whether the run starts from pretrained weights (--pretrained or --weights)."""
    return bool(config.pretrained or config.weights)


def strategy_lr(config: RunConfig, variant: Variant) -> float:
    """``variant``'s learning rate: the run's --lr, else :data:`PRETRAINED_LR` on a
    pretrained base, else its strategy's :data:`DEFAULT_LR`."""
    if config.lr is not None:
        return config.lr
    return PRETRAINED_LR if pretrained(config) else DEFAULT_LR[variant.strategy]


def strategy_options(config: RunConfig, variant: Variant) -> dict[str, Any]:
    """The method or baseline options ``variant`` reads: the run's, then its own.

    Raises:
        ConfigError: an unknown strategy, an option of the variant that its strategy
            does not have, or a method option with an invalid value.
    """
    known = strategies_for(config.scenario)
    if variant.strategy not in known:
        raise ConfigError(f"unknown {config.scenario}-incremental strategy "
                          f"{variant.strategy!r} for {variant.label!r}; choose from {list(known)}")
    names = strategy_option_names(variant.strategy)
    if unknown := sorted(set(variant.options) - names):
        raise ConfigError(f"{variant.label}: {variant.strategy} has no option(s) {unknown}")
    options = {k: v for k, v in {**config.options, **variant.options}.items() if k in names}
    if trains_masks(variant.strategy) and not pretrained(config) and config.lr is None:
        options.setdefault("mask_lr", strategy_lr(config, variant))  # the from-scratch job's
    if variant.strategy in METHODS:
        inference = options.setdefault(
            "task_inference", "oracle" if config.scenario == "task" else DEFAULT_TASK_INFERENCE)
        if (inference == "oracle") != (config.scenario == "task"):
            raise ConfigError(f"{variant.label}: task_inference {inference!r} does not apply "
                              f"to a {config.scenario}-incremental run (--scenario task: "
                              "oracle; --scenario class: a router)")
        try:
            make_options(variant.strategy, **options)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{variant.label}: {err}") from err
    return options


def checkpoint_config(config: RunConfig, variant: Variant) -> dict[str, Any]:
    """What must match for a checkpoint of ``variant`` to be resumed: the settings that
    change its results, flat (options by their own names), and the number of processes
    (each takes a batch of ``batch_size``)."""
    settings = {k: v for k, v in dataclasses.asdict(config).items()
                if k not in (*NOT_IN_CHECKPOINT, "options")}
    return {**settings, **strategy_options(config, variant), "label": variant.label,
            "strategy": variant.strategy, "lr": strategy_lr(config, variant),
            "processes": DistributedHelper.world_size}
