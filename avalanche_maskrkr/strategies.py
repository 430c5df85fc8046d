"""Thin strategy templates: Avalanche's ``SupervisedTemplate`` with the method's plugin.

Constructors are keyword-only like Avalanche's, with ``SupervisedTemplate``'s arguments
and defaults (``model, optimizer, criterion, train_mb_size, train_epochs, eval_mb_size,
device, plugins, evaluator, eval_every, ...``) plus the method's options, declared once
in :mod:`avalanche_maskrkr.options` and added to the constructor's signature (Avalanche
rejects keyword arguments that no ``__init__`` signature declares), plus the speed
options of :class:`~avalanche_maskrkr.acceleration.AccelerationPlugin` (``precision``,
``channels_last``, ``compile``, ``recompile_limit``): any of them other than its default
appends that plugin. The model is converted at construction, so ``strategy.model`` is the
:class:`~avalanche_maskrkr.network.TaskAwareNetwork` from the start.

The conversion is in place, without a copy (a large backbone is never held twice): the
model object given becomes the network's backbone, its classifier replaced and its
layers wrapped and frozen. Give any other strategy a model of its own: called on its own
(e.g. by ``Naive(model=model)`` built afterwards) the converted model raises an error
that says so, and converting it again is refused.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import ClassVar

from avalanche.training.templates import SupervisedTemplate

from .acceleration import AccelerationPlugin
from .options import MethodOptions, option_names
from .plugins import MaskRKRPlugin, MethodPlugin, PiggybackPlugin, RKRPlugin


SPEED_OPTIONS = {name: p for name, p in
                 inspect.signature(AccelerationPlugin.__init__).parameters.items()
                 if name != "self"}  # precision, channels_last, compile, recompile_limit


def _strategy_init(options_class: type[MethodOptions]):
    """An ``__init__`` taking SupervisedTemplate's arguments, ``options_class``'s and the
    speed options."""
    names = option_names(options_class)

    def __init__(self, **kwargs):
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        speed = {k: kwargs.pop(k) for k in list(kwargs) if k in SPEED_OPTIONS}
        plugin = self.plugin_class(**options)
        if "model" in kwargs:
            kwargs["model"] = plugin.convert(kwargs["model"])
        extra = list(kwargs.get("plugins") or [])
        if any(v != SPEED_OPTIONS[k].default for k, v in speed.items()):
            extra.append(AccelerationPlugin(**speed))
        kwargs["plugins"] = [plugin, *extra]
        SupervisedTemplate.__init__(self, **kwargs)
        self.method_plugin = plugin

    template = inspect.signature(SupervisedTemplate.__init__).parameters.values()
    keyword = inspect.Parameter.KEYWORD_ONLY
    __init__.__signature__ = inspect.Signature(
        [p for p in template if p.kind != inspect.Parameter.VAR_KEYWORD]
        + [inspect.Parameter(f.name, keyword, default=f.default)
           for f in dataclasses.fields(options_class)]
        + [p.replace(kind=keyword) for p in SPEED_OPTIONS.values()]
        + [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])
    __init__.__doc__ = (f"Arguments of SupervisedTemplate, plus:\n\n{options_class.__doc__}\n\n"
                        "Speed options: see AccelerationPlugin.")
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
