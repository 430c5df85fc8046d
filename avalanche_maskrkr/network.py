"""The converted model: a backbone with per-task layers and one classifier head per task.

:class:`TaskAwareNetwork` is an Avalanche ``MultiTaskModule``: Avalanche hands it the
task labels, ``MultiTaskModule.forward`` splits a mixed minibatch per task, and
:meth:`forward_single_task` sets the task on the shared :class:`TaskContext` so every
task layer of the backbone computes that task. Its ``adaptation`` (run by Avalanche
before each experience) creates the task's parameters and head.

Conversion is in place: the backbone is the user's model object, its classifier replaced
by Identity and its layers wrapped. Called on its own, outside the network's forward
(e.g. by a strategy that was given the same model object), it raises an error instead
of returning features where logits are expected.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable
from contextlib import nullcontext

import torch
from avalanche.benchmarks.utils.flat_data import ConstantSequence
from avalanche.models import MultiTaskModule
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .layers import (BinaryMask, RKRLayer, TaskAdaptedLayer, TaskBatchNorm, TaskBatchStats,
                     TaskContext, TaskModule,
                     zero_scales_found)
from .options import ROLES, MethodOptions
from .ridge import RandomFeatureRidge
from .routing import ClassMeans, choose_tasks

STREAM_HINT = (
    "Build a task-labelled stream with classes numbered from 0 in each task, e.g. "
    "avalanche_maskrkr.benchmarks.split_cifar100(), SplitCIFAR100(n_experiences=10, "
    "return_task_id=True, class_ids_from_zero_in_each_exp=True) or nc_benchmark(..., "
    "task_labels=True, class_ids_from_zero_in_each_exp=True). On a class-incremental "
    "stream (one label space, no task label at test time), pass task_inference (e.g. "
    "'prototype'): every experience then becomes a new task of its own.")


CLASS_STREAM_HINT = (
    "Use a class-incremental stream, which brings each class once with a global class "
    "id: e.g. avalanche_maskrkr.benchmarks.split_cifar100(scenario='class') or "
    "nc_benchmark(..., task_labels=False). A stream that numbers classes from 0 in each "
    "task is task-incremental: the task label is then needed at test time.")

BASE_TASK = -1
"""The task label that computes the base network: no task layer holds it."""


NEVER_TRAINED = (
    "The base network is frozen from the start, but its BatchNorm statistics have never "
    "been updated: it looks untrained, and every task would learn on random features. "
    "Load pretrained weights first (timm.create_model(..., pretrained=True), a weights "
    "file; the runner's --pretrained or --weights), or pass train_base_first=True to "
    "train the base with the first task and freeze it afterwards (the original RKR "
    "protocol).")


CONVERTED_IN_PLACE = (
    "This model was converted in place into the backbone of a TaskAwareNetwork "
    "(avalanche_maskrkr.convert, or an RKR, Piggyback or Mask-RKR strategy or plugin that "
    "was given it): its classifier is gone and its layers compute the task that the "
    "network selects, so on its own it would return features, not logits. Call the "
    "converted network instead (strategy.model, or what convert returned, with task "
    "labels), or give every other strategy a model of its own (built again, or a "
    "copy.deepcopy taken before the conversion).")


class _CalledByNetworkOnly:
    """Forward pre-hook of a converted backbone: its network selects a task
    (``context.task``) around every call, so a call without one comes from outside."""

    def __init__(self, context: TaskContext):
        self.context = context

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if self.context.task is None and self.context.tasks is None:
            raise RuntimeError(CONVERTED_IN_PLACE)


def never_trained(model: nn.Module) -> bool:
    """Whether ``model`` has BatchNorm layers all of whose running statistics still hold
    their initial values (mean 0, variance 1): a network that never saw data."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats
             and m.running_mean is not None and not m.running_mean.is_meta]
    return bool(norms) and all(bool((m.running_mean == 0).all() and (m.running_var == 1).all())
                               for m in norms)


def experience_tasks(experience) -> list[int]:
    """The distinct task labels of an Avalanche experience, sorted."""
    labels = experience.task_labels
    if isinstance(labels, ConstantSequence):
        labels = [labels[0]]
    return sorted({int(t) for t in labels})


class TaskAwareNetwork(MultiTaskModule):
    """``backbone`` (classifier replaced by Identity, layers wrapped) + per-task heads.

    Args:
        backbone: the converted network, mapping x -> (batch, feature_dim) features.
        feature_dim: input size of each head.
        options: the method's options (kept for reports and exports).
        context: the task context shared with the backbone's task layers.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, options: MethodOptions,
                 context: TaskContext):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict()
        self.feature_dim = feature_dim
        self.options = options
        self.context = context
        self.adapted_tasks: list[int] = []
        self.trained_tasks: list[int] = []
        self.base_frozen = not options.train_base_first
        self._warned_untrained: set[int] = set()
        # class-incremental (options.task_inference != "oracle"): task -> its global
        # class ids (column i of its head), global class -> task, the classifier over
        # base features that routes (prototype: class means; ranpac: RanPAC's), and the
        # tasks chosen for the last evaluated batch
        self.class_incremental = options.task_inference != "oracle"
        self.task_class_ids: dict[int, list[int]] = {}
        self.class_task = torch.zeros(0, dtype=torch.long)  # -1: no task has the class
        self.base_classifier = {
            "prototype": lambda: ClassMeans(feature_dim),
            "ranpac": lambda: RandomFeatureRidge(feature_dim, options.ranpac_dim),
        }.get(options.task_inference, lambda: None)()
        self.routed_tasks: torch.Tensor | None = None
        # RKR layers save their output for backward: an in-place activation after one
        # (ReLU(inplace=True) right after a convolution) would overwrite it, so modules
        # with an in-place switch compute out of place while training
        self._adapted_layers = [m for m in backbone.modules() if isinstance(m, TaskAdaptedLayer)]
        self._rkr_layers = [m for m in self._adapted_layers if isinstance(m, RKRLayer)]
        self._in_place = ([m for m in backbone.modules() if getattr(m, "inplace", None) is True]
                          if self._rkr_layers else [])
        for module in self._in_place:
            module.inplace = not self.training
        backbone.register_forward_pre_hook(_CalledByNetworkOnly(context))
        self.backbone.requires_grad_(False)
        for param in self.base_parameters():
            param.requires_grad_(not self.base_frozen)
        if self.base_frozen and never_trained(backbone):
            warnings.warn(NEVER_TRAINED, stacklevel=3)

    # -- structure ---------------------------------------------------------------------
    @property
    def task_modules(self) -> list[TaskModule]:
        return [m for m in self.backbone.modules() if isinstance(m, TaskModule)]

    def base_parameters(self) -> list[nn.Parameter]:
        """Parameters of the shared base network (task parameters and heads excluded)."""
        per_task = {id(p) for m in self.task_modules for p in m.tasks.parameters()}
        return [p for p in self.backbone.parameters() if id(p) not in per_task]

    def add_head(self, task: int, n_classes: int) -> None:
        base = next(self.backbone.parameters())
        self.heads[str(task)] = nn.Linear(self.feature_dim, n_classes, device=base.device,
                                          dtype=base.dtype)

    def refuse_trained(self, tasks: Iterable[int]) -> None:
        """Raise ``ValueError`` if any of ``tasks`` is already trained."""
        for task in tasks:
            if task in self.trained_tasks:
                raise ValueError(
                    f"An experience with task label {task} arrived, but task {task} is "
                    "already trained. RKR, Piggyback and Mask-RKR learn one set of parameters "
                    "per task and never change a finished task, so every experience needs a "
                    f"new task label. {STREAM_HINT}")

    def refuse_learned_classes(self, classes: Iterable[int]) -> None:
        """Class-incremental: raise ``ValueError`` if a task already owns any of
        ``classes``."""
        owned = [c for c in classes if c < len(self.class_task) and self.class_task[c] >= 0]
        if owned:
            raise ValueError(
                f"An experience brings classes {owned}, which task "
                f"{int(self.class_task[owned[0]])} already learned. With task_inference="
                f"{self.options.task_inference!r}, each class belongs to the one task "
                "(experience) that brought it and the router maps classes to tasks, so "
                f"every class must come once. {CLASS_STREAM_HINT}")

    def add_task(self, task: int, n_classes: int) -> None:
        """Create the parameters and head of ``task`` before it trains."""
        self.refuse_trained([task])
        if task not in self.adapted_tasks:
            for module in self.task_modules:
                module.add_task(task)
            self.adapted_tasks.append(task)
        if str(task) not in self.heads:
            self.add_head(task, n_classes)

    @torch.no_grad()
    def finish_task(self, task: int) -> None:
        """Freeze ``task`` for good (masks packed to bits); freeze the base after the first."""
        for module in self.task_modules:
            module.finish_task(task)
        self.heads[str(task)].requires_grad_(False)
        if task not in self.trained_tasks:
            self.trained_tasks.append(task)
        self.freeze_base()

    def freeze_base(self) -> None:
        """Freeze the base network for good (its BatchNorm statistics included)."""
        if not self.base_frozen:
            self.base_frozen = True
            for param in self.base_parameters():
                param.requires_grad_(False)
            self.train(self.training)

    def trainable_parameters(self, tasks: Iterable[int]) -> list[nn.Parameter]:
        """Exactly what training ``tasks`` updates (:meth:`parameter_roles`, flat)."""
        return [p for params in self.parameter_roles(tasks).values() for p in params]

    def parameter_roles(self, tasks: Iterable[int]) -> dict[str, list[nn.Parameter]]:
        """Exactly what training ``tasks`` updates, by role (:data:`~.options.ROLES`):
        their heads, real-valued task parameters and mask scores, and the base while it
        is not yet frozen."""
        roles: dict[str, list[nn.Parameter]] = {role: [] for role in ROLES}
        scores = {id(m.scores) for m in self.backbone.modules()
                  if isinstance(m, BinaryMask) and not m.frozen}
        for task in tasks:
            roles["head"] += [p for p in self.heads[str(task)].parameters() if p.requires_grad]
            for module in self.task_modules:
                for param in module.task_parameters(task):
                    roles["masks" if id(param) in scores else "factors"].append(param)
        if not self.base_frozen:
            roles["base"] = self.base_parameters()
        return roles

    @torch.no_grad()
    def estimate_statistics(self, task: int, batches: Iterable[torch.Tensor]) -> None:
        """Re-estimate ``task``'s own BatchNorm statistics (``bn_policy="task_stats"``)
        for its current adapted network: the average over ``batches`` of (batch, ...)
        inputs, in eval mode otherwise (no dropout). Call before :meth:`finish_task`."""
        if task in self.trained_tasks:
            raise ValueError(f"task {task} is finished: its statistics are frozen")
        layers = [m for m in self.task_modules
                  if isinstance(m, TaskBatchStats) and m.has_task(task)]
        if not layers:
            return
        for layer in layers:
            layer.reset_statistics(task)
        training = self.training
        self.eval()
        self.context.estimating = True
        try:
            for x in batches:
                self.forward_single_task(x, task)
        finally:
            self.context.estimating = False
            self.train(training)

    # -- Avalanche hooks -----------------------------------------------------------------
    def training_tasks(self, experience) -> list[int]:
        """The tasks that training ``experience`` trains: its task labels, or, when
        class-incremental, the new task it became."""
        return self.adapted_tasks[-1:] if self.class_incremental else experience_tasks(experience)

    def routable_tasks(self) -> list[int]:
        """The tasks a class-incremental router chooses from: the trained ones (the
        task in training while none is)."""
        return list(self.trained_tasks) or self.adapted_tasks[-1:]

    def adaptation(self, experience) -> None:
        """Avalanche's adaptation (``max_class_label``, ``known_train_tasks_labels``), then
        each new task's parameters and head; an experience of an already trained task is
        refused before anything changes. Class-incremental: a training experience becomes
        a new task over its classes."""
        if self.class_incremental:
            if self.training:
                self.refuse_learned_classes(sorted(experience.classes_in_this_experience))
            super().adaptation(experience)
            if self.training:
                self.add_class_task(len(self.adapted_tasks),
                                    sorted(experience.classes_in_this_experience))
            return
        tasks = experience_tasks(experience)
        if self.training:
            self.refuse_trained(tasks)
        super().adaptation(experience)
        n_classes = max(experience.classes_in_this_experience) + 1
        for task in tasks:
            if self.training:
                self.add_task(task, n_classes)
            elif task not in self.trained_tasks and task not in self._warned_untrained:
                self._warned_untrained.add(task)
                warnings.warn(f"task {task} has not been trained yet: it is evaluated with "
                              "the base network and an untrained head", stacklevel=2)
                if str(task) not in self.heads:
                    self.add_head(task, n_classes)

    def add_class_task(self, task: int, classes: list[int]) -> None:
        """Class-incremental: create ``task`` over the global class ids ``classes``."""
        self.task_class_ids[task] = list(classes)
        size = max(len(self.class_task), max(classes) + 1)
        self.class_task = nn.functional.pad(self.class_task, (0, size - len(self.class_task)),
                                            value=-1)
        self.class_task[classes] = task
        self.max_class_label = max(self.max_class_label, size)
        self.add_task(task, len(classes))

    def global_logits(self, local: torch.Tensor, task: int) -> torch.Tensor:
        """(B, C_t) logits of ``task`` -> (B, ``max_class_label``), in its classes' global
        columns, every other column at the dtype's lowest value (see :meth:`forward`)."""
        out = local.new_full((len(local), self.max_class_label), torch.finfo(local.dtype).min)
        out[:, self.task_class_ids[task]] = local
        return out

    def routed_logits(self, x: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        """(B, ...) inputs and the (B,) task chosen for each -> (B, ``max_class_label``)
        global logits, each row its task's (:meth:`global_logits`)."""
        out = x.new_full((len(x), self.max_class_label), torch.finfo(x.dtype).min)
        for task in tasks.unique().tolist():
            rows = tasks == task
            out[rows] = self.global_logits(self.forward_single_task(x[rows], task), task
                                           ).to(out.dtype)
        return out

    def forward_class_incremental(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) inputs -> (B, ``max_class_label``) global logits: the task in training
        in train mode, else each input's task as the router chooses (kept in
        ``routed_tasks``)."""
        if self.training:
            return self.global_logits(self.forward_single_task(x, self.adapted_tasks[-1]),
                                      self.adapted_tasks[-1])
        self.routed_tasks = choose_tasks(self, x)
        return self.routed_logits(x, self.routed_tasks)

    def forward(self, x: torch.Tensor, task_labels: torch.Tensor | int | None
                ) -> torch.Tensor | dict[int, torch.Tensor]:
        """Avalanche's multi-task forward: (batch, ...) inputs and (batch,) task labels ->
        (batch, ``max_class_label``) logits in the heads' dtype, each row padded after
        its task's classes with the dtype's lowest finite value. Avalanche pads with
        zeros, which win the argmax over a task whose logits are all negative and enter
        the loss; this padding never wins, and cross-entropy gives it probability 0 and
        gradient 0. A minibatch of one task (the usual case) is computed without copying
        the inputs. An ``int`` label, ``None`` (every trained task) or no label at all:
        as Avalanche. Class-incremental: task labels are ignored
        (:meth:`forward_class_incremental`)."""
        if self.class_incremental:
            return self.forward_class_incremental(x)
        if not isinstance(task_labels, torch.Tensor) or not len(task_labels):
            return super().forward(x, task_labels)
        if bool((task_labels == task_labels[0]).all()):
            return self._padded(self.forward_single_task(x, int(task_labels[0])))
        rows, outputs = [], []
        for task in task_labels.unique().tolist():
            selected = task_labels == task
            rows.append(selected.nonzero().flatten())
            outputs.append(self._padded(self.forward_single_task(x[selected], task)))
        return torch.cat(outputs)[torch.cat(rows).argsort()]

    def _padded(self, logits: torch.Tensor) -> torch.Tensor:
        """(batch, classes) logits padded to (batch, ``max_class_label``) (see :meth:`forward`)."""
        missing = self.max_class_label - logits.shape[1]
        if missing <= 0:
            return logits
        return nn.functional.pad(logits, (0, missing), value=torch.finfo(logits.dtype).min)

    def base_features(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, ...) inputs -> (batch, feature_dim) features of the base network,
        without any task's parameters (a task label no layer has)."""
        self.context.task = BASE_TASK
        try:
            return self.backbone(x)
        finally:
            self.context.task = None

    def forward_tasks(self, x: torch.Tensor, tasks: list[int],
                      alphas: torch.Tensor | None = None) -> list[torch.Tensor] | torch.Tensor:
        """Several tasks in one backbone call (no gradient to their parameters): each
        task's (B, C_t) logits of (B, ...) inputs, from one pass over a ``len(tasks)``
        times larger batch; with ``alphas`` ((T,) weights), the (B, max C_t) logits of
        the superposed network ``sum_t alphas[t] * W_t`` and heads (zero-padded)."""
        self.context.tasks, self.context.alphas = tuple(tasks), alphas
        try:
            features = self.backbone(x if alphas is not None else x.repeat(
                len(tasks), *[1] * (x.dim() - 1)))
        finally:
            self.context.tasks = self.context.alphas = None
        heads = [self.heads[str(task)] for task in tasks]
        if alphas is None:
            return [head(chunk) for head, chunk in zip(heads, features.chunk(len(tasks)))]
        width = max(head.out_features for head in heads)
        return sum(alpha * nn.functional.pad(head(features), (0, width - head.out_features))
                   for alpha, head in zip(alphas, heads))

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        """(batch, ...) inputs of one task -> (batch, classes of that task) logits."""
        task_label = int(task_label)
        if str(task_label) not in self.heads:
            raise KeyError(f"no head for task {task_label}: run Avalanche's model "
                           "adaptation for its experience first (strategy.train/eval do)")
        self.context.task = task_label
        grad = torch.is_grad_enabled()
        if not grad:  # evaluation: the folds are checked here, outside a compiled backbone
            for layer in self._adapted_layers:
                layer.drop_stale_fold()
        self.context.folds_checked = not grad
        try:
            with (zero_scales_found(self._rkr_layers, task_label)
                  if grad and self._rkr_layers else nullcontext()):
                features = self.backbone(x)
        finally:
            self.context.task = None
            self.context.folds_checked = False
        return self.heads[str(task_label)](features)

    def train(self, mode: bool = True):
        """Train mode everywhere except BatchNorm statistics that must not drift: the
        base's once frozen, and every finished task's own copy. In-place activations of
        RKR networks are out of place in train mode, in place again in eval mode."""
        super().train(mode)
        for module in self._in_place:
            module.inplace = not mode
        if not mode:
            return self
        finished = {str(t) for t in self.trained_tasks}
        copies = set()
        for module in self.task_modules:
            if isinstance(module, TaskBatchNorm):
                for key, norm in module.tasks.items():
                    copies.add(id(norm))
                    if key in finished:
                        norm.eval()
        if self.base_frozen:
            for module in self.backbone.modules():
                if isinstance(module, _BatchNorm) and id(module) not in copies:
                    module.eval()
        return self

    # -- state: the task structure travels with the state dict ------------------------------
    def get_extra_state(self) -> dict:
        return {"task_classes": {int(t): h.out_features for t, h in self.heads.items()},
                "adapted_tasks": list(self.adapted_tasks),
                "trained_tasks": list(self.trained_tasks),
                "base_frozen": self.base_frozen,
                "max_class_label": self.max_class_label,
                "known_train_tasks_labels": sorted(self.known_train_tasks_labels),
                "task_class_ids": dict(self.task_class_ids)}

    def set_extra_state(self, state: dict) -> None:
        """Recreate the tasks recorded in ``state`` so that loading a state dict into a
        freshly converted network restores every task (loaded before the children), and
        what Avalanche's ``MultiTaskModule`` keeps."""
        for task, classes in state.get("task_class_ids", {}).items():
            if task not in self.adapted_tasks:
                self.add_class_task(task, classes)
        for task in state["adapted_tasks"]:
            if task not in self.adapted_tasks:
                self.add_task(task, state["task_classes"][task])
        for task, n_classes in state["task_classes"].items():
            if str(task) not in self.heads:
                self.add_head(task, n_classes)
        for task in state["trained_tasks"]:
            self.finish_task(task)
        if state["base_frozen"]:
            self.freeze_base()
        self.max_class_label = state["max_class_label"]
        # states saved before it was recorded: Avalanche adds every task trained
        self.known_train_tasks_labels = set(
            state.get("known_train_tasks_labels", state["adapted_tasks"]))
