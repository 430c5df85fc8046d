"""SimpleCIL (Zhou et al.): class-mean prototypes of a frozen backbone, cosine classifier.

Also the pieces the class-incremental methods share: :class:`FrozenBackbone` (a
classifier with its head removed, frozen, always in eval mode) and
:class:`CosinePrototypes` (the cosine classifier over class means of any backbone, also
APER's).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..conversion import find_classifier
from ..routing import ClassMeans
from .plugins import FeatureStatisticsPlugin, FeatureStatisticsStrategy


def remove_classifier(model: nn.Module, head_name: str | None = None) -> int:
    """Replace ``model``'s classifier by ``nn.Identity()`` in place; returns its input size."""
    head_name = find_classifier(model, head_name)
    feature_dim = model.get_submodule(head_name).in_features
    model.set_submodule(head_name, nn.Identity())
    return feature_dim


class FrozenBackbone(nn.Module):
    """``model`` with its classifier replaced by ``nn.Identity()``: ``(B, ...) -> (B, D)``.

    Modified in place; parameters are frozen and the module stays in eval mode whatever
    ``train()`` asks, so BatchNorm statistics and dropout never change.
    """

    def __init__(self, model: nn.Module, head_name: str | None = None):
        super().__init__()
        self.feature_dim = remove_classifier(model, head_name)
        model.requires_grad_(False)
        self.model = model
        self.train(False)

    def train(self, mode: bool = True) -> FrozenBackbone:
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class CosinePrototypes(ClassMeans):
    """Cosine classifier over class-mean features of ``backbone``: ``(B, ...) -> (B, K)``.

    ``backbone`` maps ``(B, ...) -> (B, D)`` without gradient and has ``feature_dim`` D.
    ``K`` is the largest class id seen + 1 (the number of classes seen when ids come in
    order); columns of ids not seen yet are -inf. Prototypes: ``means`` (K, D), set by
    ``learn(features, labels)`` (:class:`~avalanche_maskrkr.routing.ClassMeans`).
    """

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone.feature_dim)
        self.backbone = backbone

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.backbone(x))


class PrototypeClassifier(CosinePrototypes):
    """SimpleCIL's model: :class:`CosinePrototypes` of ``model`` as a :class:`FrozenBackbone`."""

    def __init__(self, model: nn.Module, head_name: str | None = None):
        super().__init__(FrozenBackbone(model, head_name))


class SimpleCILPlugin(FeatureStatisticsPlugin):
    """SimpleCIL as a plugin: the model becomes a :class:`PrototypeClassifier`
    (``head_name`` names its classifier when it cannot be found)."""

    def __init__(self, head_name: str | None = None):
        super().__init__(PrototypeClassifier, lambda model: PrototypeClassifier(model, head_name))


class SimpleCIL(FeatureStatisticsStrategy):
    """SimpleCIL: prototypes of a frozen backbone, cosine classifier, no training.

    Args:
        model: a classifier (timm, torchvision, ...); its head is removed in place
            (``head_name`` names it when :func:`~..conversion.find_classifier` cannot).
        criterion: evaluation loss on the logits (default cross-entropy).
        train_mb_size: kept for Avalanche; features are computed in ``eval_mb_size``.
        eval_mb_size, device, plugins, evaluator, eval_every: as Avalanche's.
    """

    def __init__(self, *, model: nn.Module, head_name: str | None = None, **kwargs):
        super().__init__(model=model, plugin=SimpleCILPlugin(head_name), **kwargs)
