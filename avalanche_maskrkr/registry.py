"""Every strategy by name: the three methods and the baselines, how each is built and
which options it reads, per scenario: :data:`STRATEGIES` (task-incremental) and
:data:`CLASS_STRATEGIES` (class-incremental: SimpleCIL, RanPAC, APER, the three methods
with task-free inference, Avalanche's class-incremental baselines). The runner, its
command line and the examples name strategies only through :func:`strategies_for`."""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from .baselines import BASELINE_OPTION_NAMES, BASELINES, BackboneFactory, build_baseline
from .cil import APER, RanPAC, SimpleCIL
from .class_baselines import CLASS_BASELINES, build_class_baseline
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


APER_ADAPTERS = (*METHODS, "bottleneck")


@dataclass(frozen=True)
class PretrainedModelOptions:
    """Options of ``simplecil``, ``ranpac`` and ``aper``.

    Attributes:
        ranpac_dim: RanPAC's random projection dimension M (10000 in the paper).
        adapter: APER's parameter-efficient module, trained on the first experience:
            ``"rkr"`` (default: it converts every backbone the package converts),
            ``"piggyback"``, ``"mask-rkr"`` (with their options of the run) or
            ``"bottleneck"`` (transformers' MLP blocks, the published APER's adapter).
        ranpac_adapter: RanPAC's first-session adaptation (the paper's Phase 1): one of
            APER's modules, trained on the first experience with the run's optimizer and
            epochs, then frozen; default none (the pretrained features).
        head_name: dotted name of the classifier, if it cannot be found automatically.
    """

    ranpac_dim: int = 10000
    adapter: str = "rkr"
    ranpac_adapter: str | None = None
    head_name: str | None = None


ADAPTER_OPTION_NAMES = (set().union(*map(option_names, METHODS.values()))
                        - {"task_inference", "train_base_first"})
"""The method options an adapter reads (``rank``, ``bn_policy``, ...) when it is one of
the methods."""

PRETRAINED_MODEL_OPTIONS = {
    "simplecil": {"head_name"},
    "ranpac": {"ranpac_dim", "ranpac_adapter", "head_name", *ADAPTER_OPTION_NAMES},
    "aper": {"adapter", "head_name", *ADAPTER_OPTION_NAMES},
}
"""The options each of them reads (``ranpac``, ``aper``: also their adapter method's)."""


def _without_epochs(template: dict) -> dict:
    template.pop("train_epochs", None)  # no gradient step: one pass per experience
    return template


def _simplecil(make_backbone, num_classes, make_optimizer, options, **template):
    return SimpleCIL(model=make_backbone(num_classes), head_name=options.get("head_name"),
                     **_without_epochs(template))


def _adapter_options(adapter: str | None, options: Mapping[str, Any]) -> dict[str, Any]:
    """The run's options that ``adapter`` reads: its method's (none for ``bottleneck``)."""
    names = option_names(METHODS[adapter]) & ADAPTER_OPTION_NAMES if adapter in METHODS else ()
    return {k: v for k, v in options.items() if k in names}


def _ranpac(make_backbone, num_classes, make_optimizer, options, **template):
    model = make_backbone(num_classes)
    adapter = options.get("ranpac_adapter")
    if adapter is None:
        template = _without_epochs(template)
    else:
        template["optimizer"] = make_optimizer(model.parameters())
    return RanPAC(model=model, M=options.get("ranpac_dim", PretrainedModelOptions.ranpac_dim),
                  seed=torch.initial_seed() % 2**31, head_name=options.get("head_name"),
                  adapter=adapter, adapter_options=_adapter_options(adapter, options),
                  **template)


def _aper(make_backbone, num_classes, make_optimizer, options, **template):
    adapter = options.get("adapter", PretrainedModelOptions.adapter)
    model = make_backbone(num_classes)
    return APER(model=model, optimizer=make_optimizer(model.parameters()), adapter=adapter,
                adapter_options=_adapter_options(adapter, options),
                head_name=options.get("head_name"), **template)


STRATEGIES: dict[str, StrategyBuilder] = {
    "rkr": _method_builder(RKR),
    "piggyback": _method_builder(Piggyback),
    "mask-rkr": _method_builder(MaskRKR),
    **{name: functools.partial(build_baseline, name) for name in BASELINES},
}
"""Task-incremental strategy name -> its :data:`StrategyBuilder`; ``options`` are those
of :func:`strategy_option_names`."""

CLASS_STRATEGIES: dict[str, StrategyBuilder] = {
    "simplecil": _simplecil,
    "ranpac": _ranpac,
    "aper": _aper,
    **{name: STRATEGIES[name] for name in METHODS},
    **{name: functools.partial(build_class_baseline, name) for name in CLASS_BASELINES},
}
"""Class-incremental strategy name -> its :data:`StrategyBuilder` (``num_classes``: every
class of the stream)."""

SCENARIOS = {"task": STRATEGIES, "class": CLASS_STRATEGIES}


def strategies_for(scenario: str) -> dict[str, StrategyBuilder]:
    """The strategies of ``scenario`` (``"task"`` or ``"class"``) by name."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose one of {list(SCENARIOS)}")
    return SCENARIOS[scenario]


def strategy_option_names(strategy: str) -> set[str]:
    """The options ``strategy`` reads: a method's options class, SimpleCIL's, RanPAC's
    and APER's (:class:`PretrainedModelOptions`), or the baselines'."""
    method = METHODS.get(strategy)
    if method:
        return option_names(method)
    return set(PRETRAINED_MODEL_OPTIONS.get(strategy, BASELINE_OPTION_NAMES))


def trains_masks(strategy: str) -> bool:
    """Whether ``strategy`` learns binary masks (its options have ``mask_init``)."""
    return "mask_init" in strategy_option_names(strategy)


def option_users(name: str) -> list[str]:
    """Who reads option ``name``: the methods by their options class, the baselines by
    the option's prefix (``ewc_lambda``: ewc)."""
    users = [method for method, cls in METHODS.items() if name in option_names(cls)]
    users += {"ranpac_dim": ["ranpac"], "adapter": ["aper"],
              "ranpac_adapter": ["ranpac"]}.get(name, [])
    if name in BASELINE_OPTION_NAMES:
        prefix = name.split("_")[0]
        users.append(prefix if prefix in BASELINES else
                     "multi-head" if name == "train_base_first" else "baselines")
    return users
