"""Per-task BatchNorm (the ``bn_policy="per_task"`` option).

Each task gets its own copy of a BatchNorm layer (affine parameters and running
statistics), initialised from the base layer and trained with the task. Tasks without a
copy, and the base network, use the frozen base layer.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

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
