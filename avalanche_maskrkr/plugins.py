"""The training logic of each method as an Avalanche plugin, usable on any strategy.

Added to ``Naive`` (or any ``SupervisedTemplate``) over an unconverted model, a plugin
converts the model the first time the strategy trains or evaluates, and then, for each
experience:
  * before training: points the strategy's optimizer at exactly the parameters the
    experience's task trains (its factors or mask scores and its head), keeping the
    optimizer's class and hyperparameters (those of its first parameter group), with
    fresh state. Frozen parameters are never in it.
  * after training: freezes the task for good (masks packed to 1 bit per entry).
Task parameters and heads are created by the network's Avalanche ``adaptation``.
"""
from __future__ import annotations

from collections import defaultdict
from typing import ClassVar

import torch
from avalanche.core import SupervisedPlugin

from .conversion import convert
from .network import TaskAwareNetwork, experience_tasks
from .options import MaskRKROptions, MethodOptions, PiggybackOptions, RKROptions, make_options


def point_optimizer(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    """Make ``params`` the optimizer's only parameter group, with fresh state and the
    hyperparameters of its current first group."""
    hyper = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    optimizer.param_groups.clear()
    optimizer.state = defaultdict(dict)
    optimizer.add_param_group({**hyper, "params": params})


class MethodPlugin(SupervisedPlugin):
    """Shared plugin of the three methods; ``options`` are the method's options."""

    options_class: ClassVar[type[MethodOptions]]

    def __init__(self, **options):
        super().__init__()
        self.options = make_options(self.options_class.name, **options)

    def convert(self, model: torch.nn.Module) -> TaskAwareNetwork:
        """Convert ``model`` for this method (a converted one must have these options)."""
        if isinstance(model, TaskAwareNetwork):
            if model.options != self.options:
                raise ValueError(f"the model was converted with {model.options}, "
                                 f"not {self.options}")
            return model
        return convert(model, self.options)

    def _ensure_converted(self, strategy) -> None:
        if not isinstance(strategy.model, TaskAwareNetwork):
            strategy.model = self.convert(strategy.model).to(strategy.device)

    def before_training(self, strategy, **kwargs):
        self._ensure_converted(strategy)

    def before_eval(self, strategy, **kwargs):
        self._ensure_converted(strategy)

    def before_training_exp(self, strategy, **kwargs):
        tasks = experience_tasks(strategy.experience)
        point_optimizer(strategy.optimizer, strategy.model.trainable_parameters(tasks))

    def after_training_exp(self, strategy, **kwargs):
        for task in experience_tasks(strategy.experience):
            strategy.model.finish_task(task)


class RKRPlugin(MethodPlugin):
    """RKR (Singh et al. 2021). Options: see :class:`~avalanche_maskrkr.options.RKROptions`."""

    options_class = RKROptions


class PiggybackPlugin(MethodPlugin):
    """Piggyback (Mallya et al. 2018). Options: see
    :class:`~avalanche_maskrkr.options.PiggybackOptions`."""

    options_class = PiggybackOptions


class MaskRKRPlugin(MethodPlugin):
    """Mask-RKR (Takeda & Yanai 2022). Options: see
    :class:`~avalanche_maskrkr.options.MaskRKROptions`."""

    options_class = MaskRKROptions
