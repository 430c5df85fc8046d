"""Each method's options, declared once and shared by its strategy, plugin, CLI and report.

``make_options("mask-rkr", rank=4)`` validates the values (``ValueError`` for a bad value,
``TypeError`` for an unknown name) and returns a frozen dataclass that also knows how to
wrap one backbone layer for its method (:meth:`MethodOptions.make_layer`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from .layers import PLACEMENTS, PiggybackLayer, RKRLayer, TaskAdaptedLayer, TaskContext

BN_POLICIES = ("frozen", "task_stats", "per_task")
ROLES = ("head", "factors", "masks", "base")
"""What a trained parameter is: a task's head, its real-valued factors, its mask scores,
or the base network (trained with the first task under ``train_base_first``)."""
MASK_LR_SCALE = 0.1
"""Mask scores' default learning rate, relative to the optimizer's."""
TASK_INFERENCE = ("oracle", "prototype", "ranpac", "entropy", "energy", "supsup")
"""How the network finds the task of a test input (see :mod:`.routing`)."""


@dataclass(frozen=True)
class MethodOptions:
    """Options common to every method.

    Attributes:
        split_qkv: treat the three thirds of a fused ``qkv`` Linear (timm ViT/Swin) as
            three layers with their own rectification factors (the paper's ViT).
        head_name: dotted name of the classifier module; default: found automatically.
        bn_policy: ``"frozen"`` (default: BatchNorm in eval mode with the base
            statistics, as the official Piggyback code), ``"task_stats"`` (each task its
            own running mean and variance, following the drift its masks or factors
            cause and re-estimated after training, see :mod:`.layers.batchnorm`; after
            an RKR layer they cancel its scaling F) or ``"per_task"`` (one trained
            BatchNorm per task, affine parameters included).
        head_lr, factor_lr, mask_lr: learning rates of the three roles of a task's
            parameters: its head, its real-valued factors (RKR's LM, RM and F;
            Mask-RKR's first task) and its mask scores. ``None``: the optimizer's own
            rate for the head and the factors, one tenth of it for the mask scores
            (under ``Adam(lr=1e-3)``: 1e-4, Piggyback's published mask rate; scores
            start 5e-3 above the threshold, and Adam moves each by about the rate per
            step). The paper's recipe: ``head_lr=1e-4, mask_lr=1e-4``.
        train_base_first: train the whole base network (with the first task's parameters
            and head) on the first experience, then freeze it: the original RKR protocol
            for users without pretrained weights.
        adapt_patch_embed: also adapt the patch-embedding convolution of transformers.
        task_inference: how the task of a test input is found (:data:`TASK_INFERENCE`,
            :mod:`~avalanche_maskrkr.routing`). ``"oracle"`` (default): the stream's task
            label, task-incremental (the paper). Any other value is class-incremental:
            every training experience becomes a new task of its own (Avalanche labels
            them all 0), over the global class ids it brings, and at test time the network
            chooses each input's task: ``"prototype"`` (nearest class mean of the frozen
            base's features), ``"ranpac"`` (RanPAC's ridge classifier on them, with
            ``ranpac_dim`` random features), ``"entropy"`` / ``"energy"`` (the most
            confident of the task-specific passes) or ``"supsup"`` (SupSup's one-shot
            superposition, one choice per batch; needs ``bn_policy="frozen"``).
        ranpac_dim: M, the random features of the ``"ranpac"`` router (RanPAC's 10000;
            its Gram matrix is M x M in float64).
    """

    name: ClassVar[str]
    split_qkv: bool = True
    head_name: str | None = None
    bn_policy: str = "frozen"
    train_base_first: bool = False
    adapt_patch_embed: bool = False
    head_lr: float | None = None
    factor_lr: float | None = None
    mask_lr: float | None = None
    task_inference: str = "oracle"
    ranpac_dim: int = 10000

    def __post_init__(self) -> None:
        if self.bn_policy not in BN_POLICIES:
            raise ValueError(f"bn_policy must be one of {BN_POLICIES}, got {self.bn_policy!r}")
        if self.task_inference not in TASK_INFERENCE:
            raise ValueError(f"task_inference must be one of {TASK_INFERENCE}, "
                             f"got {self.task_inference!r}")
        if not isinstance(self.ranpac_dim, int) or self.ranpac_dim < 1:
            raise ValueError(f"ranpac_dim must be an integer >= 1, got {self.ranpac_dim!r}")
        if self.task_inference == "supsup" and self.bn_policy != "frozen":
            raise ValueError("task_inference='supsup' superposes the tasks' weights; their "
                             "own BatchNorm statistics cannot be: use bn_policy='frozen'")
        for name in ("head_lr", "factor_lr", "mask_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 (or None), got {value!r}")

    def learning_rates(self, lr: float) -> dict[str, float]:
        """Learning rate of each role (:data:`ROLES`) under an optimizer of rate ``lr``."""
        return {"head": lr if self.head_lr is None else self.head_lr,
                "factors": lr if self.factor_lr is None else self.factor_lr,
                "masks": lr * MASK_LR_SCALE if self.mask_lr is None else self.mask_lr,
                "base": lr}

    def make_layer(self, base: nn.Linear | nn.Conv2d, context: TaskContext,
                   n_split: int) -> TaskAdaptedLayer:
        raise NotImplementedError


def _check_rank(rank: int) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")


def _check_mask(mask_init: float, mask_threshold: float) -> None:
    if mask_threshold < 0:
        raise ValueError(f"mask_threshold must be >= 0, got {mask_threshold!r}")
    if mask_init <= mask_threshold:
        raise ValueError(f"mask_init ({mask_init}) must exceed mask_threshold "
                         f"({mask_threshold}) so that a new mask starts all ones")


@dataclass(frozen=True)
class RKROptions(MethodOptions):
    """RKR. ``rank``: K, the rank of the rectification generator (default 2)."""

    name: ClassVar[str] = "rkr"
    rank: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_rank(self.rank)

    def make_layer(self, base, context, n_split):
        return RKRLayer(base, context, rank=self.rank, n_split=n_split)


@dataclass(frozen=True)
class PiggybackOptions(MethodOptions):
    """Piggyback. ``mask_init``: initial score (1e-2); ``mask_threshold``: 5e-3."""

    name: ClassVar[str] = "piggyback"
    mask_init: float = 1e-2
    mask_threshold: float = 5e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_mask(self.mask_init, self.mask_threshold)

    def make_layer(self, base, context, n_split):
        return PiggybackLayer(base, context, self.mask_init, self.mask_threshold)


@dataclass(frozen=True)
class MaskRKROptions(MethodOptions):
    """Mask-RKR: RKR factors learned on the first task, binary masks over them afterwards.

    ``mask_rg`` / ``mask_sfg``: mask the rectification generator / the scaling factors
    (an unmasked generator is learned per task, as in RKR): the RG-only and SFG-only
    ablations. ``mask_placement``: ``"factors"`` (separate masks on LM and RM, default),
    ``"product"`` (one mask on R, 1 bit per weight) or ``"none"`` (no mask at all,
    whatever ``mask_rg`` and ``mask_sfg`` say: RKR, SPEC's placement (1); with RKR's
    ``bn_policy`` it trains, stores and counts what RKR does from the same seed).
    """

    name: ClassVar[str] = "mask-rkr"
    rank: int = 2
    mask_init: float = 1e-2
    mask_threshold: float = 5e-3
    mask_rg: bool = True
    mask_sfg: bool = True
    mask_placement: str = "factors"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_rank(self.rank)
        _check_mask(self.mask_init, self.mask_threshold)
        if self.mask_placement not in PLACEMENTS:
            raise ValueError(f"mask_placement must be one of {PLACEMENTS}, "
                             f"got {self.mask_placement!r}")

    def make_layer(self, base, context, n_split):
        return RKRLayer(base, context, rank=self.rank, n_split=n_split,
                        mask_rg=self.mask_rg, mask_sfg=self.mask_sfg,
                        placement=self.mask_placement, mask_init=self.mask_init,
                        mask_threshold=self.mask_threshold)


METHODS: dict[str, type[MethodOptions]] = {
    cls.name: cls for cls in (RKROptions, PiggybackOptions, MaskRKROptions)}


def option_names(options_class: type[MethodOptions]) -> set[str]:
    return {f.name for f in dataclasses.fields(options_class)}


def make_options(method: str | MethodOptions, **options) -> MethodOptions:
    """Validated options of ``method`` (one of :data:`METHODS`)."""
    if isinstance(method, MethodOptions):
        return dataclasses.replace(method, **options) if options else method
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    cls = METHODS[method]
    unknown = set(options) - option_names(cls)
    if unknown:
        raise TypeError(f"{method} got unknown option(s) {sorted(unknown)}; "
                        f"valid options: {sorted(option_names(cls))}")
    return cls(**options)
