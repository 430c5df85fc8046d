"""Baselines beside the methods, built from the same backbone: multi-head fine-tuning
(``naive``), a frozen shared backbone (``multi-head``), one model per task (``single``),
and Avalanche's EWC, LwF, SI, Replay and PackNet.

Every baseline is a ``SupervisedTemplate`` over one of two task-aware models,
:class:`MultiHeadNetwork` or :class:`SeparateModels` (PackNet: Avalanche's own
``PackNetModel``), plus Avalanche's plugin for the method (SI's with its weight
snapshots copied, :class:`SynapticIntelligence`). Both models keep their task
structure in the state dict, so ``load_state_dict`` into a freshly built one restores
every task, as :class:`~avalanche_maskrkr.network.TaskAwareNetwork` does. Every
experience starts with fresh optimizer state (:class:`FreshOptimizerState`), as the
methods' plugins do; :class:`StepDecay` is the learning-rate schedule the runner gives
every strategy.

Avalanche's ``as_multitask`` fails on timm's Swin head (SPEC section 7), so the
multi-head model is built here: the classifier found by
:func:`~avalanche_maskrkr.conversion.find_classifier` is replaced by one head per task.
Importing this module registers ``simple_mlp`` with timm (a model PackNet accepts).
What each baseline stores is counted in :mod:`.baseline_accounting`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiTaskModule, SimpleMLP
from avalanche.models.packnet import PackNetModel, PackNetPlugin
from avalanche.training.plugins import (
    EWCPlugin,
    LwFPlugin,
    ReplayPlugin,
    SynapticIntelligencePlugin,
)
from avalanche.training.templates import SupervisedTemplate
from avalanche.training.utils import ParamData
from timm.models import register_model
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .conversion import find_classifier
from .network import experience_tasks
from .plugins import clear_state

BackboneFactory = Callable[[int], nn.Module]
"""``num_classes -> model``: a fresh backbone with its classifier (weights loaded)."""


@register_model
def simple_mlp(pretrained: bool = False, num_classes: int = 10, img_size: int = 8,
               in_chans: int = 3, hidden_size: int = 256, hidden_layers: int = 2,
               drop_rate: float = 0.0, **kwargs) -> SimpleMLP:
    """Avalanche's ``SimpleMLP`` on flattened ``(in_chans, img_size, img_size)`` images:
    no normalisation layer, so PackNet accepts it (``features`` + ``classifier``)."""
    if pretrained:
        raise ValueError("simple_mlp has no pretrained weights; pass a weights file")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    if kwargs:
        raise TypeError(f"simple_mlp got unexpected arguments {sorted(kwargs)}")
    return SimpleMLP(num_classes=num_classes, input_size=in_chans * img_size * img_size,
                     hidden_size=hidden_size, hidden_layers=hidden_layers, drop_rate=drop_rate)


class PerTaskModules(MultiTaskModule):
    """A module per task label in ``self.tasks``, created by Avalanche's adaptation the
    first time the task trains (subclasses define :meth:`new_task_module` and
    :meth:`forward_single_task`)."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks = nn.ModuleDict()
        self.task_classes: dict[int, int] = {}
        # Tells the device to create task modules on, even before the first one exists.
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)

    @property
    def _adaptation_device(self) -> torch.device:
        return self._device_anchor.device

    def new_task_module(self, n_classes: int) -> nn.Module:
        raise NotImplementedError

    def add_task(self, task: int, n_classes: int) -> None:
        self.tasks[str(task)] = self.new_task_module(n_classes).to(self._adaptation_device)
        self.task_classes[task] = n_classes

    def adaptation(self, experience) -> None:
        super().adaptation(experience)
        if not self.training:
            return
        n_classes = max(experience.classes_in_this_experience) + 1
        for task in experience_tasks(experience):
            if str(task) not in self.tasks:
                self.add_task(task, n_classes)

    def task_module(self, task: int) -> nn.Module:
        if str(task) not in self.tasks:
            raise KeyError(f"task {task} has not been trained: no module for it")
        return self.tasks[str(task)]

    def get_extra_state(self) -> dict:
        return {"task_classes": dict(self.task_classes),
                "known_train_tasks_labels": sorted(self.known_train_tasks_labels),
                "max_class_label": self.max_class_label}

    def set_extra_state(self, state: dict) -> None:
        """Recreate the recorded tasks (loaded before the children, which fill them)."""
        for task, n_classes in state["task_classes"].items():
            if str(task) not in self.tasks:
                self.add_task(task, n_classes)
        self.known_train_tasks_labels = set(state["known_train_tasks_labels"])
        self.max_class_label = state["max_class_label"]


class MultiHeadNetwork(PerTaskModules):
    """A shared backbone and one ``nn.Linear`` head per task.

    Args:
        model: a classifier; its classifier (see ``find_classifier``) becomes Identity.
        freeze_after: the backbone trains with the first ``freeze_after`` tasks and is
            frozen afterwards (BatchNorm statistics included); ``None``: it always
            trains (multi-head fine-tuning), ``0``: it never does (a pretrained base).
        head_name: dotted name of the classifier, if it cannot be found automatically.
    """

    def __init__(self, model: nn.Module, freeze_after: int | None = None,
                 head_name: str | None = None):
        super().__init__()
        head = find_classifier(model, head_name)
        self.feature_dim = model.get_submodule(head).in_features
        model.set_submodule(head, nn.Identity())
        self.backbone = model
        self.freeze_after = freeze_after
        self._freeze_if_due()

    @property
    def backbone_frozen(self) -> bool:
        return self.freeze_after is not None and len(self.tasks) > self.freeze_after

    def _freeze_if_due(self) -> None:
        if self.backbone_frozen:
            self.backbone.requires_grad_(False)
            self.train(self.training)

    def new_task_module(self, n_classes: int) -> nn.Module:
        return nn.Linear(self.feature_dim, n_classes)

    def add_task(self, task: int, n_classes: int) -> None:
        super().add_task(task, n_classes)
        self._freeze_if_due()

    def forward(self, x: torch.Tensor, task_labels: torch.Tensor | int | None):
        """Avalanche's multi-task forward, except that a batch of several tasks (Replay's)
        goes through the backbone once: -> (batch, most classes of a task) fp32 logits,
        each row from its task's head, zero-padded. BatchNorm then normalises the whole
        batch, as in Naive, and a task with one sample in the batch can train."""
        if task_labels is None or isinstance(task_labels, int):
            return super().forward(x, task_labels)
        features = self.backbone(x)
        out = torch.zeros(len(x), max(self.task_classes.values(), default=0), device=x.device)
        for task in torch.unique(task_labels).tolist():
            rows = task_labels == task
            logits = self.task_module(task)(features[rows]).float()
            out[rows, :logits.shape[1]] = logits
        return out

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        """(batch, ...) inputs of one task -> (batch, classes of the task) fp32 logits
        (under autocast too: Avalanche writes mixed batches into an fp32 tensor)."""
        return self.task_module(task_label)(self.backbone(x)).float()

    def train(self, mode: bool = True):
        """A frozen backbone keeps its BatchNorm statistics (eval mode)."""
        super().train(mode)
        if mode and self.backbone_frozen:
            for module in self.backbone.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self


class SeparateModels(PerTaskModules):
    """One whole model per task, built by ``make_model(num_classes)`` when the task
    arrives; earlier tasks' models are frozen."""

    def __init__(self, make_model: BackboneFactory):
        super().__init__()
        self.make_model = make_model

    def new_task_module(self, n_classes: int) -> nn.Module:
        self.tasks.requires_grad_(False)
        return self.make_model(n_classes)

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        """(batch, ...) inputs of one task -> (batch, classes of the task) fp32 logits."""
        return self.task_module(task_label)(x).float()


class SynapticIntelligence(SynapticIntelligencePlugin):
    """Avalanche's ``SynapticIntelligencePlugin`` with real snapshots of the weights.

    Avalanche snapshots a parameter as ``param.detach().cpu().flatten()``: a copy of a
    CUDA parameter, but on CPU a view of the parameter itself. The reference weights
    and the weights before each step then follow the training, so the importances and
    the penalty stay 0 and SI trains exactly as Naive. Here the two snapshots that must
    outlive a step (the reference weights taken before an experience, the weights
    taken before each step) are copied.
    """

    def before_training_exp(self, strategy, **kwargs):
        super().before_training_exp(strategy, **kwargs)
        _own_copies(self.ewc_data[0])

    def before_training_iteration(self, strategy, **kwargs):
        super().before_training_iteration(strategy, **kwargs)
        _own_copies(self.syn_data["old_theta"])


def _own_copies(snapshots: Mapping[str, ParamData]) -> None:
    for snapshot in snapshots.values():
        snapshot.data = snapshot.data.clone()


class FreshOptimizerState(SupervisedPlugin):
    """Empties the optimizer state (:func:`~.plugins.clear_state`) before every training
    experience, as the methods' plugins do."""

    def before_training_exp(self, strategy, **kwargs):
        clear_state(strategy.optimizer)


class StepDecay(SupervisedPlugin):
    """Learning rate ``lr * gamma ** (epoch // every)`` in each experience's epochs
    (Piggyback's recipe: x0.1 every 15 epochs); read from the clock, so stateless. A
    group with its own rate (``"initial_lr"``: the methods' groups by role) decays from
    that rate instead of ``lr``."""

    def __init__(self, lr: float, every: int, gamma: float = 0.1):
        super().__init__()
        self.lr, self.every, self.gamma = lr, every, gamma

    def before_training_epoch(self, strategy, **kwargs):
        decay = self.gamma ** (strategy.clock.train_exp_epochs // self.every)
        for group in strategy.optimizer.param_groups:
            group["lr"] = group.get("initial_lr", self.lr) * decay


@dataclass(frozen=True)
class BaselineOptions:
    """Options of the baselines (defaults: Avalanche's, tuned on digits where noted).

    Attributes:
        ewc_lambda: weight of EWC's penalty (measured on digits: 1e4 beats 1e2, 1e3
            and 1e5 there).
        lwf_alpha, lwf_temperature: weight and temperature of LwF's distillation.
        si_lambda: weight of SI's penalty, whose importances Avalanche clamps at 1e-3
            (measured on digits with test_resnet: average accuracy 0.952 at 10, 0.947
            at 1, 0.950 at 100, 0.882 at 1000).
        replay_mem_size: samples in the replay buffer.
        packnet_prune: fraction of the free weights PackNet prunes after each task.
        packnet_post_prune_epochs: epochs PackNet fine-tunes after pruning (fewer than
            the training epochs).
        train_base_first: ``multi-head`` trains its backbone with the first task and
            freezes it afterwards (the methods' option of the same name); otherwise
            the backbone (pretrained) is frozen from the start.
        head_name: dotted name of the classifier, if it cannot be found automatically.
    """

    ewc_lambda: float = 1e4
    lwf_alpha: float = 1.0
    lwf_temperature: float = 2.0
    si_lambda: float = 10.0
    replay_mem_size: int = 200
    packnet_prune: float = 0.5
    packnet_post_prune_epochs: int = 1
    train_base_first: bool = False
    head_name: str | None = None


BASELINE_OPTION_NAMES = frozenset(f.name for f in fields(BaselineOptions))


@dataclass(frozen=True)
class Baseline:
    """How a baseline is built: its model from a backbone factory and the number of
    classes of the first task, and its Avalanche plugins."""

    model: Callable[[BackboneFactory, int, BaselineOptions], nn.Module]
    plugins: Callable[[BaselineOptions], list[SupervisedPlugin]] = lambda options: []


def _multi_head(make_backbone: BackboneFactory, num_classes: int,
                options: BaselineOptions) -> MultiHeadNetwork:
    return MultiHeadNetwork(make_backbone(num_classes), head_name=options.head_name)


def _frozen_multi_head(make_backbone: BackboneFactory, num_classes: int,
                       options: BaselineOptions) -> MultiHeadNetwork:
    return MultiHeadNetwork(make_backbone(num_classes), head_name=options.head_name,
                            freeze_after=int(options.train_base_first))


def _packnet_model(make_backbone: BackboneFactory, num_classes: int,
                   options: BaselineOptions) -> PackNetModel:
    model = make_backbone(num_classes)
    try:
        return PackNetModel(model)
    except ValueError as err:
        raise ValueError(f"packnet cannot wrap {type(model).__name__}: {err}. Avalanche's "
                         "PackNet supports models without normalisation layers, e.g. "
                         "--model simple_mlp") from err


BASELINES: dict[str, Baseline] = {
    "naive": Baseline(_multi_head),
    "multi-head": Baseline(_frozen_multi_head),
    "single": Baseline(lambda make_backbone, n, options: SeparateModels(make_backbone)),
    "ewc": Baseline(_multi_head, lambda o: [EWCPlugin(o.ewc_lambda)]),
    "lwf": Baseline(_multi_head, lambda o: [LwFPlugin(o.lwf_alpha, o.lwf_temperature)]),
    "si": Baseline(_multi_head, lambda o: [SynapticIntelligence(o.si_lambda)]),
    "replay": Baseline(_multi_head, lambda o: [ReplayPlugin(mem_size=o.replay_mem_size)]),
    "packnet": Baseline(_packnet_model, lambda o: [
        PackNetPlugin(o.packnet_post_prune_epochs, o.packnet_prune)]),
}
"""Baseline name -> how it is built (see :func:`build_baseline`)."""


def build_baseline(name: str, make_backbone: BackboneFactory, num_classes: int,
                   make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
                   options: Mapping[str, Any], **template) -> SupervisedTemplate:
    """The ``SupervisedTemplate`` of baseline ``name`` (a key of :data:`BASELINES`).

    Args:
        make_backbone: ``num_classes -> model``, a fresh backbone with its classifier.
        num_classes: classes of the first task (the single-task classifier's size).
        make_optimizer: ``parameters -> optimizer`` (Avalanche re-points it at the
            model's parameters before training).
        options: :class:`BaselineOptions` values; other keys are ignored.
        template: further ``SupervisedTemplate`` keyword arguments (criterion,
            train_mb_size, train_epochs, eval_mb_size, device, evaluator, plugins).
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)}")
    entry = BASELINES[name]
    opts = BaselineOptions(**{k: v for k, v in options.items() if k in BASELINE_OPTION_NAMES})
    model = entry.model(make_backbone, num_classes, opts)
    # A model whose tasks do not exist yet has no parameter; Avalanche puts the model's
    # parameters into the optimizer before the first experience trains.
    params = list(model.parameters()) or [nn.Parameter(torch.empty(0))]
    plugins = [*entry.plugins(opts), FreshOptimizerState(), *(template.pop("plugins", None) or [])]
    return SupervisedTemplate(model=model, optimizer=make_optimizer(params), plugins=plugins,
                              **template)
