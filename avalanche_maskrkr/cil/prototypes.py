"""SimpleCIL (Zhou et al.): class-mean prototypes of a frozen backbone, cosine classifier.

Also the pieces the class-incremental methods share: :class:`FrozenBackbone` (a
classifier with its head removed, frozen, always in eval mode), :class:`CosinePrototypes`
(the cosine classifier over class means of any backbone, also APER's) and
:class:`FeatureStatisticsStrategy` (an Avalanche strategy whose "training" of an
experience is one pass computing features, handed to the model's ``learn``).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..conversion import find_classifier
from ..routing import ClassMeans


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


def dataset_batches(dataset, batch_size: int,
                    device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """Inputs (B, ...) and labels (B,) of an Avalanche dataset on ``device``, in order."""
    loader = DataLoader(dataset, batch_size=batch_size,
                        collate_fn=getattr(dataset, "collate_fn", None))
    for x, y, *_ in loader:
        yield x.to(device), y.to(device)


@torch.no_grad()
def dataset_features(backbone: nn.Module, dataset, batch_size: int,
                     device: torch.device) -> tuple[Tensor, Tensor]:
    """Backbone features (N, D) and labels (N,) of an Avalanche dataset, in order."""
    features, labels = [], []
    for x, y in dataset_batches(dataset, batch_size, device):
        features.append(backbone(x))
        labels.append(y)
    return torch.cat(features), torch.cat(labels)


class FeatureStatisticsStrategy(SupervisedTemplate):
    """Avalanche strategy for a model with a ``backbone`` and ``learn(features, labels)``.

    Training an experience is one pass over its dataset with its eval transform (no
    gradient step; ``train_epochs`` is 1), counted as one training iteration (so each
    evaluation after an experience has its own step in the metric history); the usual
    callbacks and evaluation plugins run.
    Samples of classes the model has no column for yet get a -inf logit, so their loss
    is inf and they are never predicted.
    """

    def __init__(self, *, model: nn.Module, criterion=None, train_mb_size: int = 32,
                 eval_mb_size: int = 32, device="cpu", plugins=None, evaluator=None,
                 eval_every: int = -1):
        # The template wants an optimizer; nothing is optimised (see make_optimizer).
        unused = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
        kwargs = {} if evaluator is None else {"evaluator": evaluator}
        super().__init__(model=model, optimizer=unused,
                         criterion=criterion or nn.CrossEntropyLoss(),
                         train_mb_size=train_mb_size, train_epochs=1,
                         eval_mb_size=eval_mb_size, device=device, plugins=plugins,
                         eval_every=eval_every, **kwargs)

    def make_optimizer(self, **kwargs):
        """Nothing to optimise: the backbone is frozen, the classifier is solved."""

    def training_epoch(self, **kwargs):
        features, labels = dataset_features(self.model.backbone, self.experience.dataset.eval(),
                                            self.eval_mb_size, self.device)
        self.model.learn(features, labels)
        self.clock.train_iterations += 1

    def criterion(self) -> Tensor:
        missing = int(self.mb_y.max()) + 1 - self.mb_output.shape[1]
        logits = F.pad(self.mb_output, (0, max(missing, 0)), value=float("-inf"))
        return self._criterion(logits, self.mb_y)


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
        super().__init__(model=PrototypeClassifier(model, head_name), **kwargs)
