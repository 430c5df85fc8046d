"""APER (Zhou et al., IJCV 2024; first named ADAM): adapt once, then merge with the PTM.

On the first experience a parameter-efficient module is trained (cross-entropy, with a
temporary linear head over that experience's classes), then frozen for good. Every
experience, the first included, then only sets class prototypes: the mean over its
training data (eval transform) of the concatenated features ``[base, adapted]`` (B, 2D),
where "base" is the pretrained backbone and "adapted" the same backbone with the module;
the classifier is SimpleCIL's cosine over prototypes (:class:`~.prototypes.CosinePrototypes`).
One model is kept in memory and run twice, with the module off and on.

The module (``adapter``):
  * ``"bottleneck"``: APER's AdaptFormer adapter, a parallel bottleneck on the MLP of every
    transformer block (:class:`ParallelMLP`);
  * ``"rkr"``, ``"piggyback"``, ``"mask-rkr"``: this package's methods, as task 0 of a
    :func:`~avalanche_maskrkr.conversion.convert`-ed network (they work on CNNs too).
    Mask-RKR learns real-valued factors on its first task and masks over them on later
    tasks only, so adapting once it trains exactly what RKR trains.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..conversion import convert
from ..network import TaskAwareNetwork
from ..options import METHODS, make_options
from ..plugins import clear_state, dataset_batches, point_optimizer, user_settings
from ..routing import GrowingBuffers
from .plugins import FeatureStatisticsPlugin, FeatureStatisticsStrategy
from .prototypes import CosinePrototypes, remove_classifier

ADAPTERS = (*METHODS, "bottleneck")
ADAPTED_TASK = 0
"""The task label under which a method adapter holds its parameters."""


class Bottleneck(nn.Module):
    """AdaptFormer's branch ``scale * up(dropout(relu(down(x))))``: (..., D) -> (..., D).

    APER's settings are the defaults: width 64, fixed scale 0.1, dropout 0.1. ``down``
    keeps ``nn.Linear``'s initialisation, ``up`` and both biases start at zero (their
    "lora" option), so the branch starts as 0.
    """

    def __init__(self, dim: int, width: int = 64, scale: float = 0.1, dropout: float = 0.1):
        super().__init__()
        self.down = nn.Linear(dim, width)
        self.up = nn.Linear(width, dim)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        for tensor in (self.down.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(tensor)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * self.up(self.dropout(F.relu(self.down(x))))


class ParallelMLP(nn.Module):
    """A transformer block's ``mlp`` with a :class:`Bottleneck` beside it, switched by
    ``enabled``: ``mlp(x) + branch(x)``, (..., D) -> (..., D).

    The branch reads the MLP's input, the block's stream after its pre-MLP norm (APER's
    code reads the stream before that norm); wrapping the MLP module is what works the
    same on timm's ViT and Swin blocks and torchvision's ViT.
    """

    def __init__(self, mlp: nn.Module, **bottleneck):
        super().__init__()
        dim = next(m for m in mlp.modules() if isinstance(m, nn.Linear)).in_features
        self.mlp = mlp
        self.branch = Bottleneck(dim, **bottleneck)
        self.enabled = True

    def forward(self, x: Tensor) -> Tensor:
        out = self.mlp(x)
        return out + self.branch(x) if self.enabled else out


class AdaptedBackbone(GrowingBuffers):
    """A pretrained backbone (D features) with a trainable module: ``(B, ...) -> (B, 2D)``
    features ``[base_features, adapted_features]``, without gradient.

    Life cycle: :meth:`start` (the first experience's classes; a temporary head),
    training through :meth:`training_logits` on :meth:`parameter_groups`, then
    :meth:`finish`: frozen for good, always in eval mode. A kind implements the methods
    that raise ``NotImplementedError``.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.concatenate = True  # False: the adapted features alone, (B, D) (RanPAC's)
        self.register_buffer("classes", torch.zeros(0, dtype=torch.long))
        self.frozen = False

    @property
    def feature_dim(self) -> int:
        return 2 * self.dim if self.concatenate else self.dim

    def base_features(self, x: Tensor) -> Tensor:
        """(B, ...) -> (B, D): the pretrained backbone's features."""
        raise NotImplementedError

    def adapted_features(self, x: Tensor) -> Tensor:
        """(B, ...) -> (B, D): the features with the trained module."""
        raise NotImplementedError

    def parameter_groups(self, lr: float) -> tuple[dict[str, list[nn.Parameter]],
                                                   dict[str, float]]:
        """What trains, by role (head, factors, masks), and each role's rate under ``lr``."""
        raise NotImplementedError

    def _add_head(self, n_classes: int) -> None:
        """Create the temporary head, ``n_classes`` outputs, and what trains with it."""
        raise NotImplementedError

    def _head_logits(self, x: Tensor) -> Tensor:
        """(B, ...) -> (B, C): the temporary head's logits on the adapted features."""
        raise NotImplementedError

    def _freeze(self, inputs) -> None:
        """The kind's own part of :meth:`finish`."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if not self.concatenate:
            return self.adapted_features(x)
        return torch.cat([self.base_features(x), self.adapted_features(x)], dim=1)

    def start(self, classes: list[int]) -> None:
        """Open training on ``classes`` (global ids): a temporary head of C outputs."""
        self.classes = torch.tensor(sorted(classes), device=self.classes.device)
        self._add_head(len(classes))

    def training_logits(self, x: Tensor) -> Tensor:
        """(B, ...) -> (B, max class + 1): the temporary head's logits at the columns of
        its global class ids, -inf elsewhere."""
        local = self._head_logits(x)
        logits = local.new_full((len(x), int(self.classes.max()) + 1), float("-inf"))
        return logits.index_copy(1, self.classes, local)

    @torch.no_grad()
    def finish(self, inputs) -> None:
        """Freeze the module for good and drop the temporary head; ``inputs``: batches
        (B, ...) of the first experience (eval transform) for per-task statistics."""
        self._freeze(inputs)
        self.requires_grad_(False)
        self.frozen = True
        self.train(False)

    def train(self, mode: bool = True) -> AdaptedBackbone:
        return super().train(mode and not self.frozen)

    def get_extra_state(self) -> dict:
        return {"frozen": self.frozen}

    def set_extra_state(self, state: dict) -> None:
        """A state saved after the first experience restores a frozen module."""
        if state["frozen"]:
            self.requires_grad_(False)
            self.frozen = True
            self.train(False)


class BottleneckBackbone(AdaptedBackbone):
    """APER's AdaptFormer adapter: a :class:`ParallelMLP` on every module named ``mlp``
    (the transformer blocks of timm's ViT and Swin, torchvision's ViT); base features with
    the branches off. The pretrained modules stay frozen and in eval mode; the temporary
    head is a linear layer; the branches train in the role ``"factors"`` (real-valued
    parameters), at the optimizer's rate as the head. ``bottleneck``: the
    :class:`Bottleneck`'s ``width``, ``scale`` and ``dropout``."""

    def __init__(self, model: nn.Module, head_name: str | None = None, **bottleneck):
        dim = remove_classifier(model, head_name)
        super().__init__(dim)
        model.requires_grad_(False)
        names = [n for n, m in model.named_modules() if n.split(".")[-1] == "mlp"
                 and any(isinstance(c, nn.Linear) for c in m.modules())]
        if not names:
            raise ValueError(
                f"adapter='bottleneck' goes beside the MLP of transformer blocks (modules "
                f"named 'mlp': timm ViT/Swin, torchvision ViT), and {type(model).__name__} "
                f"has none; on other backbones, CNNs included, use adapter='rkr', "
                f"'piggyback' or 'mask-rkr'")
        self.adapters = []  # registered where they sit, inside ``model``
        for name in names:
            self.adapters.append(ParallelMLP(model.get_submodule(name), **bottleneck))
            model.set_submodule(name, self.adapters[-1])
        self.model = model
        self.head: nn.Linear | None = None
        self.train(False)

    @contextmanager
    def _branches_off(self):
        for adapter in self.adapters:
            adapter.enabled = False
        try:
            yield
        finally:
            for adapter in self.adapters:
                adapter.enabled = True

    def base_features(self, x: Tensor) -> Tensor:
        with self._branches_off():
            return self.model(x)

    def adapted_features(self, x: Tensor) -> Tensor:
        return self.model(x)

    def parameter_groups(self, lr):
        groups = {"head": list(self.head.parameters()),
                  "factors": [p for a in self.adapters for p in a.branch.parameters()]}
        return groups, {"head": lr, "factors": lr}

    def _add_head(self, n_classes):
        weight = self.adapters[0].branch.up.weight
        self.head = nn.Linear(self.dim, n_classes, device=weight.device,
                              dtype=weight.dtype)

    def _head_logits(self, x):
        return self.head(self.adapted_features(x))

    def _freeze(self, inputs):
        self.head = None

    def train(self, mode: bool = True) -> BottleneckBackbone:
        super().train(False)
        for adapter in self.adapters:
            adapter.branch.train(mode and not self.frozen)
        return self


class MethodBackbone(AdaptedBackbone):
    """RKR, Piggyback or Mask-RKR as the module: ``model`` converted
    (:func:`~avalanche_maskrkr.conversion.convert`, ``options``), the module being task
    :data:`ADAPTED_TASK`'s parameters. Base features: ``network.base_features``; adapted
    features: the backbone's output in ``network.forward_single_task`` for that task.
    The network's head of that task is the temporary head; it stays in the network,
    frozen and unused, since ``forward_single_task`` needs one. Roles' rates follow the
    method's options (``head_lr``, ``factor_lr``, ``mask_lr``)."""

    def __init__(self, model: nn.Module, options):
        if options.train_base_first:
            raise ValueError("APER keeps the pretrained backbone frozen: "
                             "train_base_first=True does not apply")
        network = convert(model, options)
        super().__init__(network.feature_dim)
        network._auto_adapt = False  # Avalanche would add a task per experience
        self.network: TaskAwareNetwork = network

    def base_features(self, x):
        return self.network.base_features(x)

    def adapted_features(self, x):
        captured = []
        hook = self.network.backbone.register_forward_hook(
            lambda module, args, output: captured.append(output))
        try:
            self.network.forward_single_task(x, ADAPTED_TASK)
        finally:
            hook.remove()
        return captured[0]

    def parameter_groups(self, lr):
        return (self.network.parameter_roles([ADAPTED_TASK]),
                self.network.options.learning_rates(lr))

    def _add_head(self, n_classes):
        self.network.add_task(ADAPTED_TASK, n_classes)

    def _head_logits(self, x):
        return self.network.forward_single_task(x, ADAPTED_TASK)

    def _freeze(self, inputs):
        self.network.estimate_statistics(ADAPTED_TASK, inputs)  # bn_policy="task_stats"
        self.network.finish_task(ADAPTED_TASK)


def adapted_backbone(model: nn.Module, adapter: str, adapter_options: dict,
                     head_name: str | None = None, concatenate: bool = True) -> AdaptedBackbone:
    """``model`` (modified in place) with the module ``adapter`` (one of :data:`ADAPTERS`);
    ``head_name``, when given, overrides a method's option of that name; features: base
    and adapted concatenated, or (``concatenate=False``) the adapted alone."""
    if adapter == "bottleneck":
        backbone = BottleneckBackbone(model, head_name, **adapter_options)
    elif adapter in METHODS:
        options = make_options(adapter, **adapter_options)
        if head_name is not None:
            options = make_options(options, head_name=head_name)
        backbone = MethodBackbone(model, options)
    else:
        raise ValueError(f"unknown adapter {adapter!r}; choose one of {ADAPTERS}")
    backbone.concatenate = concatenate
    return backbone


def adapting(backbone: nn.Module) -> bool:
    """Whether ``backbone`` has a module still to train (an :class:`AdaptedBackbone`
    before :meth:`~AdaptedBackbone.finish`)."""
    return isinstance(backbone, AdaptedBackbone) and not backbone.frozen


class APERClassifier(CosinePrototypes):
    """APER's model: :class:`~.prototypes.CosinePrototypes` over the (B, 2D) features of
    an :class:`AdaptedBackbone`; ``(B, ...) -> (B, K)`` over global class ids."""

    def __init__(self, model: nn.Module, adapter: str = "rkr",
                 adapter_options: dict | None = None, head_name: str | None = None):
        super().__init__(adapted_backbone(model, adapter, adapter_options or {}, head_name))

    def forward(self, x: Tensor) -> Tensor:
        """Cosine logits; while the module trains, the temporary head's instead."""
        if self.training and adapting(self.backbone):
            return self.backbone.training_logits(x)
        return super().forward(x)


class AdaptOncePlugin(FeatureStatisticsPlugin):
    """A :class:`~.plugins.FeatureStatisticsPlugin` whose model's backbone may be an
    :class:`AdaptedBackbone`: on the first experience the module and a temporary head
    train for the strategy's epochs, the strategy's optimizer (one parameter group, e.g.
    ``SGD(model.parameters(), lr=0.01)``) pointed at them by role, its class and
    hyperparameters kept (:func:`~avalanche_maskrkr.plugins.point_optimizer`); after its
    last epoch the module is frozen for good."""

    def __init__(self, model_class: type[nn.Module], wrap):
        super().__init__(model_class, wrap)
        self._settings: dict | None = None  # the user optimizer's hyperparameters

    def trains(self, strategy) -> bool:
        return adapting(strategy.model.backbone)

    def before_training_exp(self, strategy, **kwargs):
        super().before_training_exp(strategy, **kwargs)
        backbone = strategy.model.backbone
        if not adapting(backbone):
            return
        backbone.start(strategy.experience.classes_in_this_experience)
        if self._settings is None:
            self._settings = user_settings(strategy.optimizer)
        groups, rates = backbone.parameter_groups(self._settings["lr"])
        point_optimizer(strategy.optimizer, groups, self._settings, rates)

    def after_training_exp(self, strategy, **kwargs):
        backbone = strategy.model.backbone
        if adapting(backbone):
            dataset = strategy.experience.dataset.eval()
            backbone.finish(x for x, *_ in dataset_batches(dataset, strategy.eval_mb_size,
                                                           strategy.device))
            clear_state(strategy.optimizer)
        super().after_training_exp(strategy, **kwargs)


class APERPlugin(AdaptOncePlugin):
    """APER as a plugin: the model becomes an :class:`APERClassifier` (arguments as
    :class:`APER`'s), its module trained on the first experience (:class:`AdaptOncePlugin`)."""

    def __init__(self, adapter: str = "rkr", adapter_options: dict | None = None,
                 head_name: str | None = None):
        super().__init__(APERClassifier, lambda model: APERClassifier(
            model, adapter, adapter_options, head_name))


class APER(FeatureStatisticsStrategy):
    """APER as an Avalanche strategy (the template with :class:`APERPlugin`).

    First experience: ``train_epochs`` epochs of cross-entropy on the module and a
    temporary head (the optimizer pointed at them), after the last of which the module is
    frozen and the prototypes are set; every later experience: one pass setting its
    classes' prototypes (as SimpleCIL). APER's published recipe for the bottleneck:
    ``SGD(lr=0.01, momentum=0.9, weight_decay=5e-4)``, cosine schedule, 20 epochs,
    minibatches of 48.

    Args:
        model: a classifier (timm, torchvision, ...), modified in place: its head is
            removed (``head_name`` names it when it cannot be found).
        optimizer: the user's optimizer, e.g. ``SGD(model.parameters(), lr=0.01)``, one
            parameter group; its class and hyperparameters are kept and it is pointed at
            exactly what trains (see :func:`~avalanche_maskrkr.plugins.point_optimizer`).
        adapter: ``"rkr"``, ``"piggyback"``, ``"mask-rkr"`` or ``"bottleneck"``.
        adapter_options: the method's options (:mod:`avalanche_maskrkr.options`) or the
            bottleneck's ``width``, ``scale``, ``dropout`` (:class:`Bottleneck`).
        train_epochs: epochs of training on the first experience.
        criterion, train_mb_size, eval_mb_size, device, plugins, evaluator, eval_every:
            as :class:`~.prototypes.SimpleCIL`; ``train_mb_size`` is the first
            experience's training minibatch.
    """

    def __init__(self, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                 adapter: str = "rkr", adapter_options: dict | None = None,
                 train_epochs: int = 20, head_name: str | None = None, **kwargs):
        if not isinstance(train_epochs, int) or train_epochs < 1:
            raise ValueError(f"train_epochs must be an integer >= 1, got {train_epochs!r}")
        super().__init__(model=model, plugin=APERPlugin(adapter, adapter_options, head_name),
                         optimizer=optimizer, train_epochs=train_epochs, **kwargs)
