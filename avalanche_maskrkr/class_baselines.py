"""Avalanche's class-incremental baselines, built from the same backbone as the methods.

On a class-incremental stream there is one label space and no task label: each baseline
is one network with one classifier over every class of the stream (``num_classes``),
trained as a whole (a pretrained backbone is fine-tuned): ``naive`` (fine-tuning), EWC,
LwF, SI and Replay with Avalanche's plugins (as :mod:`.baselines`), and Avalanche's own
DER and iCaRL strategies (their memory: ``replay_mem_size`` samples). The task-incremental
baselines that need task labels (``multi-head``, ``single``, ``packnet``) do not apply.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from avalanche.training import DER, ICaRL
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from .baselines import (BASELINE_OPTION_NAMES, BASELINES, BackboneFactory, BaselineOptions,
                        FreshOptimizerState)
from .conversion import find_classifier

WITH_PLUGINS = ("naive", "ewc", "lwf", "si", "replay")
CLASS_BASELINES = (*WITH_PLUGINS, "der", "icarl")
"""The class-incremental baselines by name."""


def build_class_baseline(name: str, make_backbone: BackboneFactory, num_classes: int,
                         make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
                         options: Mapping[str, Any], **template) -> SupervisedTemplate:
    """The strategy of class-incremental baseline ``name`` (one of :data:`CLASS_BASELINES`)
    over ``make_backbone(num_classes)``, ``num_classes`` being every class of the stream;
    arguments as :func:`~.baselines.build_baseline`."""
    if name not in CLASS_BASELINES:
        raise ValueError(f"unknown class-incremental baseline {name!r}; choose one of "
                         f"{list(CLASS_BASELINES)}")
    opts = BaselineOptions(**{k: v for k, v in options.items() if k in BASELINE_OPTION_NAMES})
    model = make_backbone(num_classes)
    plugins = [FreshOptimizerState(), *(template.pop("plugins", None) or [])]
    if name in WITH_PLUGINS:
        return SupervisedTemplate(model=model, optimizer=make_optimizer(model.parameters()),
                                  plugins=[*BASELINES[name].plugins(opts), *plugins], **template)
    if name == "der":
        return DER(model=model, optimizer=make_optimizer(model.parameters()),
                   mem_size=opts.replay_mem_size, plugins=plugins, **template)
    head = find_classifier(model, opts.head_name)
    classifier = nn.Linear(model.get_submodule(head).in_features, num_classes)
    model.set_submodule(head, nn.Identity())
    template.pop("criterion", None)  # iCaRL's loss is its own
    return ICaRL(feature_extractor=model, classifier=classifier,
                 optimizer=make_optimizer([*model.parameters(), *classifier.parameters()]),
                 memory_size=opts.replay_mem_size, buffer_transform=None, fixed_memory=True,
                 plugins=plugins, **template)
