"""Thin strategy templates: Avalanche's ``SupervisedTemplate`` with the method's plugin.

Constructors are keyword-only like Avalanche's: ``model, optimizer, criterion,
train_mb_size, train_epochs, eval_mb_size, device, plugins, evaluator, eval_every``
(same defaults as ``Naive``), plus the method's options (see
:mod:`avalanche_maskrkr.options`); anything else is passed on to ``SupervisedTemplate``.
The model is converted at construction, so ``strategy.model`` is the
:class:`~avalanche_maskrkr.network.TaskAwareNetwork` from the start.
"""
from __future__ import annotations

from typing import ClassVar

from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch.nn import CrossEntropyLoss

from .options import option_names
from .plugins import MaskRKRPlugin, MethodPlugin, PiggybackPlugin, RKRPlugin


class MethodStrategy(SupervisedTemplate):
    """A ``SupervisedTemplate`` that appends ``plugin_class`` built from its options."""

    plugin_class: ClassVar[type[MethodPlugin]]

    def __init__(self, *, model, optimizer, criterion=CrossEntropyLoss(), train_mb_size=1,
                 train_epochs=1, eval_mb_size=1, device="cpu", plugins=None,
                 evaluator=default_evaluator, eval_every=-1, **kwargs):
        names = option_names(self.plugin_class.options_class)
        method_options = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        plugin = self.plugin_class(**method_options)
        super().__init__(model=plugin.convert(model), optimizer=optimizer,
                         criterion=criterion, train_mb_size=train_mb_size,
                         train_epochs=train_epochs, eval_mb_size=eval_mb_size, device=device,
                         plugins=[plugin, *(plugins or [])], evaluator=evaluator,
                         eval_every=eval_every, **kwargs)
        self.method_plugin = plugin


class RKR(MethodStrategy):
    """RKR: per-task low-rank weight rectification and output scaling.

    Options: ``rank`` (2), ``split_qkv`` (True), ``head_name`` (auto), ``bn_policy``
    ("frozen"), ``train_base_first`` (False), ``adapt_patch_embed`` (False).
    """

    plugin_class = RKRPlugin


class Piggyback(MethodStrategy):
    """Piggyback: one learned binary mask over the frozen weights per task.

    Options: ``mask_init`` (1e-2), ``mask_threshold`` (5e-3), and the common ones
    (``split_qkv``, ``head_name``, ``bn_policy``, ``train_base_first``,
    ``adapt_patch_embed``).
    """

    plugin_class = PiggybackPlugin


class MaskRKR(MethodStrategy):
    """Mask-RKR: RKR factors learned on the first task, binary masks over them after.

    Options: ``rank`` (2), ``mask_init`` (1e-2), ``mask_threshold`` (5e-3), ``mask_rg``
    (True), ``mask_sfg`` (True), ``mask_placement`` ("factors"), and the common ones.
    """

    plugin_class = MaskRKRPlugin
