"""Per-task parametrizations of a frozen layer: the contract every method layer follows.

A :class:`TaskModule` holds, for each task label, a small module of task parameters in
``self.tasks[str(task)]``. Which task is computed is read from a :class:`TaskContext`
shared by every task module of a network: the network sets it once per forward, so the
task label never has to be threaded through the backbone's own ``forward`` calls.

A :class:`TaskAdaptedLayer` is called like the layer it wraps, and code that reads the
layer's ``weight`` or ``bias`` itself instead of calling it (torchvision's Swin
attention, ``nn.MultiheadAttention``) gets the current task's effective tensors, as a
``torch.nn.utils.parametrize`` parametrization gives them.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from .functional import make_op
from .masks import BinaryMask


class TaskContext:
    """What the task layers of one network share: the task label the network is computing
    (``None``: the base network), whether the network has dropped every stale fold cache
    before this forward (``folds_checked``: the layers then skip their own check, which
    would break a compiled graph), reusable work buffers, and the differentiable
    effective tensors that layers read for their ``weight`` and ``bias`` in this forward
    (``read_tensors``, emptied whenever the task is set: at the start and end of each
    network forward), and whether the network is estimating a task's BatchNorm
    statistics (``estimating``, see :class:`~.batchnorm.TaskBatchStats`).

    Several tasks in one forward (task-free inference, :mod:`~avalanche_maskrkr.routing`):
    ``tasks`` (with ``task`` None) names them; without ``alphas`` the batch is
    ``len(tasks)`` equal chunks, chunk ``i`` computed by ``tasks[i]``; with ``alphas``
    ((T,) weights) each task layer computes the superposition ``sum_t alphas[t] * W_t``
    of the tasks' effective weights and biases (SupSup)."""

    __slots__ = ("_task", "folds_checked", "_buffers", "read_tensors", "estimating", "tasks",
                 "alphas")

    def __init__(self) -> None:
        self._task: int | None = None
        self.folds_checked = False
        self._buffers: dict[tuple, torch.Tensor] = {}
        self.read_tensors: dict[nn.Module, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.estimating = False
        self.tasks: tuple[int, ...] | None = None
        self.alphas: torch.Tensor | None = None

    def chunks(self, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """(task, chunk) pairs of a batch of ``len(self.tasks)`` equal chunks."""
        return list(zip(self.tasks, x.chunk(len(self.tasks))))

    @property
    def task(self) -> int | None:
        return self._task

    @task.setter
    def task(self, task: int | None) -> None:
        self._task = task
        self.read_tensors.clear()

    def scratch(self, slot: str, shape: torch.Size, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
        """A work buffer of ``shape`` that layers reuse (one per slot, dtype and device,
        grown to the largest shape asked for): its contents last until the next call for
        the same slot, so it holds temporaries that no op keeps for backward. On CPU,
        reusing it spares the page faults of a fresh weight-sized allocation per layer."""
        key = (slot, dtype, device)
        numel = math.prod(shape)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)


class SeveralTasksUnsupported(RuntimeError):
    """A module reads a task layer's ``weight`` itself (torchvision's attention): it
    cannot compute several tasks in one forward; compute them one at a time."""


class TaskCost(NamedTuple):
    """What one task adds: real-valued entries, binary-mask entries, bytes on disk
    (real tensors in their dtype, masks bit-packed)."""

    real: int
    mask: int
    nbytes: int


class TaskModule(nn.Module):
    """A module with per-task parameters in ``self.tasks`` (a ModuleDict keyed by task)."""

    def __init__(self, context: TaskContext):
        super().__init__()
        self.context = context
        self.tasks = nn.ModuleDict()

    def has_task(self, task: int) -> bool:
        return str(task) in self.tasks

    def add_task(self, task: int) -> None:
        """Create the parameters of ``task`` (called once, before it trains)."""
        raise NotImplementedError

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        """The parameters that training ``task`` updates (empty once it is finished)."""
        if not self.has_task(task):
            return []
        return [p for p in self.tasks[str(task)].parameters() if p.requires_grad]

    @torch.no_grad()
    def finish_task(self, task: int) -> None:
        """Freeze ``task`` for good: real parameters stop training, masks become bits."""
        if not self.has_task(task):
            return
        params = self.tasks[str(task)]
        for module in params.modules():
            if isinstance(module, BinaryMask):
                module.freeze()
        params.requires_grad_(False)

    def task_cost(self, task: int) -> TaskCost:
        """The entries and bytes that ``task`` adds to the model."""
        if not self.has_task(task):
            return TaskCost(0, 0, 0)
        params = self.tasks[str(task)]
        masks = [m for m in params.modules() if isinstance(m, BinaryMask)]
        in_masks = {id(t) for m in masks for t in (*m.parameters(), *m.buffers())}
        real = [t for t in (*params.parameters(), *params.buffers())
                if id(t) not in in_masks and t.dtype.is_floating_point]
        return TaskCost(real=sum(t.numel() for t in real),
                        mask=sum(m.numel for m in masks),
                        nbytes=sum(t.numel() * t.element_size() for t in real)
                        + sum(math.ceil(m.numel / 8) for m in masks))


class TaskAdaptedLayer(TaskModule):
    """A frozen ``nn.Linear`` or ``nn.Conv2d`` (``self.base``) computed per task.

    Subclasses define :meth:`add_task` and :meth:`effective` (the task's weight and bias as
    differentiable functions of the base and task parameters). Without a gradient to
    compute, the effective weight is folded once and cached, so evaluation costs what the
    plain layer costs. The cache is keyed on the version counters of every tensor the fold
    reads, so any in-place update (optimizer step, state-dict load) invalidates it, and it
    is cleared when a task is finished, the layer trains or its parameters move (``.to``).
    ``self.op`` is the base's operation for the fused training paths of
    :mod:`.functional` (None where they do not apply: plain autograd then).
    """

    def __init__(self, base: nn.Linear | nn.Conv2d, context: TaskContext):
        super().__init__(context)
        self.base = base
        self.op = make_op(base)
        self.is_conv = isinstance(base, nn.Conv2d)
        self._fold_cache: tuple | None = None

    # -- what a method defines -------------------------------------------------------
    def effective(self, task: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of ``task``, shaped like the base layer's."""
        raise NotImplementedError

    def forward_train(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """Training forward of ``task``; methods override it with cheaper equivalents."""
        return self.base_op(x, *self.effective(task))

    def fold_dependencies(self, task: int) -> list[torch.Tensor]:
        """Every tensor :meth:`effective` reads for ``task``."""
        return [*self.base.parameters(), *self.tasks[str(task)].parameters(),
                *self.tasks[str(task)].buffers()]

    # -- shared machinery -------------------------------------------------------------
    def base_op(self, x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        """The base layer's operation with another weight and bias."""
        if self.is_conv:
            return self.base._conv_forward(x, weight, bias)
        return F.linear(x, weight, bias)

    @property
    def factory_kwargs(self) -> dict:
        """The base weight's device and dtype, for creating task parameters like it."""
        return {"device": self.base.weight.device, "dtype": self.base.weight.dtype}

    @property
    def base_trains(self) -> bool:
        """Whether the base layer's weight or bias requires a gradient (it trains with the
        first task under ``train_base_first``)."""
        bias = self.base.bias
        return self.base.weight.requires_grad or (bias is not None and bias.requires_grad)

    @property
    def can_fuse(self) -> bool:
        """Whether the fused training paths apply: a supported op over a frozen base."""
        return self.op is not None and not self.base_trains

    def needs_grad(self, task: int) -> bool:
        if not torch.is_grad_enabled():
            return False
        return self.base_trains or any(
            p.requires_grad for p in self.tasks[str(task)].parameters())

    def folded(self, task: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The effective (weight, bias) of ``task``, computed once and cached.

        The cache holds (task, dependencies, their version counters, result): a hit only
        compares version counters, the cheap check on every evaluation forward, skipped
        when the network has made it for all layers (``context.folds_checked``; version
        counters cannot be traced by ``torch.compile``).
        """
        cache = self._fold_cache
        if cache is not None and cache[0] == task and (
                self.context.folds_checked or not self._fold_is_stale()):
            return cache[3]
        tensors = list({id(t): t for t in self.fold_dependencies(task)}.values())
        versions = [t._version for t in tensors]
        with torch.no_grad():
            self._fold_cache = (task, tensors, versions, self.effective(task))
        return self._fold_cache[3]

    def _fold_is_stale(self) -> bool:
        _, tensors, versions, _ = self._fold_cache
        return [t._version for t in tensors] != versions

    def drop_stale_fold(self) -> None:
        """Drop the cached fold if a tensor it was folded from has changed since."""
        if self._fold_cache is not None and self._fold_is_stale():
            self._fold_cache = None

    def finish_task(self, task: int) -> None:
        super().finish_task(task)
        self._fold_cache = None  # its masks are now bits: other tensors to depend on

    def train(self, mode: bool = True):
        if mode:
            self._fold_cache = None  # free the folded copy while training
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        # .to(), .cuda(), .half(), ... give the parameters new data without a new version
        self._fold_cache = None
        return super()._apply(fn, recurse)

    def current(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of the task the network is computing, for code that reads them
        instead of calling the layer: the base's when no task is set (or the task has no
        parameters here), the cached fold when no gradient is needed (so evaluation costs
        what the plain layer costs), else :meth:`effective`, differentiable and computed
        once per network forward however often it is read."""
        task = self.context.task
        if self.context.tasks is not None:
            raise SeveralTasksUnsupported(f"{type(self).__name__}.weight read in a forward "
                                          "of several tasks")
        if task is None or not self.has_task(task):
            return self.base.weight, self.base.bias
        if not self.needs_grad(task):
            return self.folded(task)
        if torch.compiler.is_compiling():  # a compiler merges repeated computations itself
            return self.effective(task)
        read = self.context.read_tensors
        if self not in read:
            read[self] = self.effective(task)
        return read[self]

    @property
    def weight(self) -> torch.Tensor:
        """The current task's effective weight, shaped like the base's (see :meth:`current`)."""
        return self.current()[0]

    @property
    def bias(self) -> torch.Tensor | None:
        """The current task's effective bias (see :meth:`current`)."""
        return self.current()[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context, cache, task = self.context, self._fold_cache, self.context.task
        if context.folds_checked and cache is not None and cache[0] == task:
            return self.base_op(x, *cache[3])  # evaluation with a checked fold: the hot path
        if context.tasks is not None:
            return self.forward_tasks(x)
        if task is None or not self.has_task(task):
            return self.base(x)
        if self.needs_grad(task):
            return self.forward_train(x, task)
        return self.base_op(x, *self.folded(task))

    @torch.no_grad()
    def frozen_tensors(self, task: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of ``task`` without gradient: the base's where it has none here."""
        if not self.has_task(task):
            return self.base.weight, self.base.bias
        return self.effective(task)

    def forward_tasks(self, x: torch.Tensor) -> torch.Tensor:
        """Several tasks in one forward (see :class:`TaskContext`): chunk ``i`` of ``x``
        by ``tasks[i]``, or all of ``x`` by the ``alphas``-superposition of the tasks."""
        context = self.context
        if context.alphas is None:
            return torch.cat([self.base_op(chunk, *self.frozen_tensors(task))
                              for task, chunk in context.chunks(x)])
        weights, biases = zip(*[self.frozen_tensors(task) for task in context.tasks])
        alphas = context.alphas.to(weights[0].dtype)
        weight = torch.tensordot(alphas, torch.stack(weights), 1)
        bias = None if biases[0] is None else torch.tensordot(alphas, torch.stack(biases), 1)
        return self.base_op(x, weight, bias)

    def extra_repr(self) -> str:
        return f"tasks={list(self.tasks.keys())}"
