"""Every strategy by name: the three methods and the baselines, how each is built and
which options it reads. The runner, its command line and the examples name strategies
only through :data:`STRATEGIES`."""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from .baselines import BASELINE_OPTION_NAMES, BASELINES, BackboneFactory, build_baseline
from .options import METHODS, option_names
from .strategies import RKR, MaskRKR, MethodStrategy, Piggyback

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
StrategyBuilder = Callable[..., SupervisedTemplate]
"""``build(make_backbone, num_classes, make_optimizer, options, **template)``: a strategy
over a fresh backbone (see :func:`avalanche_maskrkr.baselines.build_baseline`)."""


def _method_builder(cls: type[MethodStrategy]) -> StrategyBuilder:
    def build(make_backbone: BackboneFactory, num_classes: int,
              make_optimizer: OptimizerFactory, options: Mapping[str, Any], **template):
        model = make_backbone(num_classes)
        return cls(model=model, optimizer=make_optimizer(model.parameters()), **template,
                   **options)
    return build


STRATEGIES: dict[str, StrategyBuilder] = {
    "rkr": _method_builder(RKR),
    "piggyback": _method_builder(Piggyback),
    "mask-rkr": _method_builder(MaskRKR),
    **{name: functools.partial(build_baseline, name) for name in BASELINES},
}
"""Strategy name -> its :data:`StrategyBuilder`; ``options`` are those of
:func:`strategy_option_names`."""


def strategy_option_names(strategy: str) -> set[str]:
    """The options ``strategy`` reads: a method's options class, or the baselines'."""
    method = METHODS.get(strategy)
    return option_names(method) if method else set(BASELINE_OPTION_NAMES)


def trains_masks(strategy: str) -> bool:
    """Whether ``strategy`` learns binary masks (its options have ``mask_init``)."""
    return "mask_init" in strategy_option_names(strategy)


def option_users(name: str) -> list[str]:
    """Who reads option ``name``: the methods by their options class, the baselines by
    the option's prefix (``ewc_lambda``: ewc)."""
    users = [method for method, cls in METHODS.items() if name in option_names(cls)]
    if name in BASELINE_OPTION_NAMES:
        prefix = name.split("_")[0]
        users.append(prefix if prefix in BASELINES else
                     "multi-head" if name == "train_base_first" else "baselines")
    return users
