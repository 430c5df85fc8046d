"""Per-task BatchNorm: the ``bn_policy`` options other than ``"frozen"``.

* ``"per_task"`` (:class:`TaskBatchNorm`): each task gets its own copy of a BatchNorm
  layer (affine parameters and running statistics), initialised from the base layer and
  trained with the task.
* ``"task_stats"`` (:class:`TaskBatchStats`): each task keeps only its own running mean
  and variance (two vectors per layer); the affine parameters stay the base's, frozen.
  While a task trains, they follow the statistics of its batches; after training the
  network re-estimates them exactly for the task's final adapted network
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


def several_tasks(module: TaskModule, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(task, chunk) pairs of a forward of several tasks; task statistics cannot be
    superposed (SupSup needs ``bn_policy="frozen"``)."""
    if module.context.alphas is not None:
        raise ValueError("a superposition of tasks has no BatchNorm statistics: task-free "
                         "inference by superposition needs bn_policy='frozen'")
    return module.context.chunks(x)


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
        if self.context.tasks is not None:
            return torch.cat([self._norm(task)(chunk) for task, chunk in several_tasks(self, x)])
        return self._norm(self.context.task)(x)

    def _norm(self, task: int | None) -> nn.Module:
        return self.tasks[str(task)] if str(task) in self.tasks else self.base


class TaskBatchStats(TaskModule):
    """``base`` (a BatchNorm layer, e.g. timm's BatchNormAct2d with its activation) run
    with each task's own running statistics (``running_mean``, ``running_var``: (C,)).

    A task's statistics start as the base's, so a new task starts from the base network.
    While the task trains (train mode, task not finished), each batch moves them by the
    base's momentum towards the batch's statistics, and the layer normalises with them
    (not with the noisy batch statistics): they follow the drift that the task's masks or
    factors cause. While the network estimates statistics (``context.estimating``) the
    layer normalises with the batch's and accumulates their average. A batch with one
    value per channel leaves them alone.
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
        if self.context.tasks is not None:
            return torch.cat([self._forward(chunk, str(task))
                              for task, chunk in several_tasks(self, x)])
        return self._forward(x, str(self.context.task))

    def _forward(self, x: torch.Tensor, key: str) -> torch.Tensor:
        if key not in self.tasks:
            return self.base(x)
        stats = self.tasks[key]
        estimating = self.context.estimating and key in self._open
        if self.training and key in self._open and not estimating:
            self._track(stats, x)
        was_training, momentum = self.base.training, self.base.momentum
        self.base.training = estimating and x.numel() > x.shape[1]  # else: no variance
        self.base.momentum = None  # while estimating: a cumulative average
        try:
            return functional_call(self.base, {
                "running_mean": stats.running_mean, "running_var": stats.running_var,
                "num_batches_tracked": stats.num_batches_tracked}, (x,))
        finally:
            self.base.training, self.base.momentum = was_training, momentum

    @torch.no_grad()
    def _track(self, stats: nn.Module, x: torch.Tensor) -> None:
        """Move the running statistics towards the batch's, by the base's momentum."""
        if x.numel() <= x.shape[1]:
            return  # one value per channel: no variance to read
        dims = [0, *range(2, x.dim())]
        x = x.to(stats.running_mean.dtype)
        momentum = self.base.momentum if self.base.momentum is not None else 0.1
        stats.running_mean.lerp_(x.mean(dims), momentum)
        stats.running_var.lerp_(x.var(dims), momentum)
