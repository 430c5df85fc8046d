"""Piggyback: one learned binary mask over the frozen weight per task (Mallya et al. 2018).

Task t computes y = (W * M_t) x + b with M_t = 1[S_t > threshold]; biases are neither
masked nor trained. The mask's gradient reaches the scores by the straight-through
estimator of :class:`BinaryMask`; a finished task keeps 1 bit per weight. Training runs
the fused :func:`~.functional.masked`, which keeps no masked copy of W for backward.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import TaskAdaptedLayer, TaskContext
from .functional import masked
from .masks import BinaryMask


class PiggybackLayer(TaskAdaptedLayer):
    """Piggyback wrapper of a frozen Linear or Conv2d (scores initialised to ``mask_init``)."""

    def __init__(self, base: nn.Linear | nn.Conv2d, context: TaskContext,
                 mask_init: float = 1e-2, mask_threshold: float = 5e-3):
        super().__init__(base, context)
        self.mask_init, self.mask_threshold = mask_init, mask_threshold

    def add_task(self, task: int) -> None:
        params = nn.Module()
        params.mask = BinaryMask(tuple(self.base.weight.shape), self.mask_init,
                                 self.mask_threshold, **self.factory_kwargs)
        self.tasks[str(task)] = params

    def effective(self, task: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.tasks[str(task)].mask(self.base.weight), self.base.bias

    def forward_train(self, x: torch.Tensor, task: int) -> torch.Tensor:
        mask = self.tasks[str(task)].mask
        if not self.can_fuse or mask.frozen:
            return super().forward_train(x, task)
        return masked(self, x, mask.scores, mask.threshold)
