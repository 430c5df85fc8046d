"""Thin strategy templates: Avalanche's ``SupervisedTemplate`` with the method's plugin.

Constructors are keyword-only like Avalanche's, with ``SupervisedTemplate``'s arguments
and defaults (``model, optimizer, criterion, train_mb_size, train_epochs, eval_mb_size,
device, plugins, evaluator, eval_every, ...``) plus the method's options, declared once
in :mod:`avalanche_maskrkr.options` and added to the constructor's signature (Avalanche
rejects keyword arguments that no ``__init__`` signature declares). The model is
converted at construction, so ``strategy.model`` is the
:class:`~avalanche_maskrkr.network.TaskAwareNetwork` from the start.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import ClassVar

from avalanche.training.templates import SupervisedTemplate

from .options import MethodOptions, option_names
from .plugins import MaskRKRPlugin, MethodPlugin, PiggybackPlugin, RKRPlugin


def _strategy_init(options_class: type[MethodOptions]):
    """An ``__init__`` taking SupervisedTemplate's arguments and ``options_class``'s."""
    names = option_names(options_class)

    def __init__(self, **kwargs):
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        plugin = self.plugin_class(**options)
        if "model" in kwargs:
            kwargs["model"] = plugin.convert(kwargs["model"])
        kwargs["plugins"] = [plugin, *(kwargs.get("plugins") or [])]
        SupervisedTemplate.__init__(self, **kwargs)
        self.method_plugin = plugin

    template = inspect.signature(SupervisedTemplate.__init__).parameters.values()
    keyword = inspect.Parameter.KEYWORD_ONLY
    __init__.__signature__ = inspect.Signature(
        [p for p in template if p.kind != inspect.Parameter.VAR_KEYWORD]
        + [inspect.Parameter(f.name, keyword, default=f.default)
           for f in dataclasses.fields(options_class)]
        + [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])
    __init__.__doc__ = f"Arguments of SupervisedTemplate, plus:\n\n{options_class.__doc__}"
    return __init__


class MethodStrategy(SupervisedTemplate):
    """A ``SupervisedTemplate`` that converts the model and appends ``plugin_class``."""

    plugin_class: ClassVar[type[MethodPlugin]]

    def __init_subclass__(cls, **kwargs):
        cls.__init__ = _strategy_init(cls.plugin_class.options_class)
        super().__init_subclass__(**kwargs)


class RKR(MethodStrategy):
    """RKR: per-task low-rank weight rectification (RG) and output scaling (SFG)."""

    plugin_class = RKRPlugin


class Piggyback(MethodStrategy):
    """Piggyback: one learned binary mask over the frozen weights per task."""

    plugin_class = PiggybackPlugin


class MaskRKR(MethodStrategy):
    """Mask-RKR: RKR factors learned on the first task, binary masks over them after."""

    plugin_class = MaskRKRPlugin
