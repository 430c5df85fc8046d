"""Per-task BatchNorm: the ``bn_policy`` options other than ``"frozen"``.

* ``"per_task"`` (:class:`TaskBatchNorm`): each task gets its own copy of a BatchNorm
  layer (affine parameters and running statistics), initialised from the base layer and
  trained with the task.
* ``"task_stats"`` (:class:`TaskBatchStats`): each task keeps only its own running mean
  and variance (two vectors per layer); the affine parameters stay the base's, frozen.
  While a task trains, its BatchNorm layers normalise with the batch's statistics; after
  training the network re-estimates the task's statistics for its final adapted network
  (:meth:`~avalanche_maskrkr.network.TaskAwareNetwork.estimate_statistics`). A mask that
  removes weights shifts the statistics of what follows it: normalising with the base
  network's statistics then no longer centres and scales the features, and deep networks
  collapse to a constant output.
Tasks without their own copy or statistics, and the base network, use the frozen base layer.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call

from .base import TaskContext, TaskModule


class TaskBatchNorm(TaskModule):
    """Routes each task to its own copy of ``base`` (a BatchNorm layer)."""

    def __init__(self, base: nn.modules.batchnorm._BatchNorm, context: TaskContext):
        super().__init__(context)
        self.base = base

    def add_task(self, task: int) -> None:
        norm = copy.deepcopy(self.base)
        norm.requires_grad_(True)
        norm.train(self.training)  # the base may sit in eval mode; the copy trains
        self.tasks[str(task)] = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        task = self.context.task
        if task is None or not self.has_task(task):
            return self.base(x)
        return self.tasks[str(task)](x)


class TaskBatchStats(TaskModule):
    """``base`` (a BatchNorm layer, e.g. timm's BatchNormAct2d with its activation) run
    with each task's own running statistics (``running_mean``, ``running_var``: (C,)).

    A task whose statistics are not frozen (:meth:`finish_task`) normalises with batch
    statistics in train mode (updating its running ones with the base's momentum) and
    while the network estimates statistics (``context.estimating``: a cumulative average
    over the batches seen). A BatchNorm without running statistics cannot be converted.
    """

    def __init__(self, base: nn.modules.batchnorm._BatchNorm, context: TaskContext):
        super().__init__(context)
        self.base = base
        self._open: set[str] = set()

    def add_task(self, task: int) -> None:
        stats = nn.Module()
        stats.register_buffer("running_mean", self.base.running_mean.detach().clone())
        stats.register_buffer("running_var", self.base.running_var.detach().clone())
        stats.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long,
                                                                 device=stats.running_mean.device))
        self.tasks[str(task)] = stats
        self._open.add(str(task))

    def finish_task(self, task: int) -> None:
        super().finish_task(task)
        self._open.discard(str(task))

    def reset_statistics(self, task: int) -> None:
        stats = self.tasks[str(task)]
        stats.running_mean.zero_()
        stats.running_var.fill_(1)
        stats.num_batches_tracked.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = str(self.context.task)
        if key not in self.tasks:
            return self.base(x)
        stats = self.tasks[key]
        estimating = self.context.estimating and key in self._open
        batch_stats = estimating or (self.training and key in self._open)
        was_training, momentum = self.base.training, self.base.momentum
        self.base.training = batch_stats
        self.base.momentum = None if estimating else momentum  # None: cumulative average
        try:
            return functional_call(self.base, {
                "running_mean": stats.running_mean, "running_var": stats.running_var,
                "num_batches_tracked": stats.num_batches_tracked}, (x,))
        finally:
            self.base.training, self.base.momentum = was_training, momentum
