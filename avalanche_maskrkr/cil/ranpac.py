"""RanPAC (McDonnell et al., NeurIPS 2023): a frozen backbone's features through
:class:`~avalanche_maskrkr.ridge.RandomFeatureRidge`, a ridge classifier on random ReLU
projections whose streamed solution is the ridge solution on all data seen. Optional
first-session adaptation (the paper's Phase 1): a module (``adapter``, as APER's) trains
on the first experience and is frozen; the classifier then reads the adapted features."""
from __future__ import annotations

from torch import Tensor, nn

from ..ridge import DEFAULT_RIDGE_GRID, RandomFeatureRidge
from .aper import AdaptOncePlugin, adapted_backbone, adapting
from .plugins import FeatureStatisticsStrategy
from .prototypes import FrozenBackbone


class RanPACClassifier(RandomFeatureRidge):
    """:class:`~avalanche_maskrkr.ridge.RandomFeatureRidge` over the features of ``model``
    as a :class:`~.prototypes.FrozenBackbone`, or with ``adapter`` as an adapted backbone
    (:func:`~.aper.adapted_backbone`, its adapted features alone): ``(B, ...) -> (B, K)``;
    while the module trains, the temporary head's logits."""

    def __init__(self, model: nn.Module, M: int = 10000, seed: int = 0,
                 ridge_grid: tuple[float, ...] = DEFAULT_RIDGE_GRID,
                 holdout_fraction: float = 0.2, head_name: str | None = None,
                 adapter: str | None = None, adapter_options: dict | None = None):
        backbone = (FrozenBackbone(model, head_name) if adapter is None else
                    adapted_backbone(model, adapter, adapter_options or {}, head_name,
                                     concatenate=False))
        super().__init__(backbone.feature_dim, M, seed, ridge_grid, holdout_fraction)
        self.backbone = backbone

    def forward(self, x: Tensor) -> Tensor:
        if self.training and adapting(self.backbone):
            return self.backbone.training_logits(x)
        return super().forward(self.backbone(x))


class RanPACPlugin(AdaptOncePlugin):
    """RanPAC as a plugin: the model becomes a :class:`RanPACClassifier` (arguments as
    :class:`RanPAC`'s); with an ``adapter``, its module trains on the first experience
    for the strategy's epochs (:class:`~.aper.AdaptOncePlugin`)."""

    def __init__(self, M: int = 10000, seed: int = 0,
                 ridge_grid: tuple[float, ...] = DEFAULT_RIDGE_GRID,
                 holdout_fraction: float = 0.2, head_name: str | None = None,
                 adapter: str | None = None, adapter_options: dict | None = None):
        super().__init__(RanPACClassifier, lambda model: RanPACClassifier(
            model, M, seed, ridge_grid, holdout_fraction, head_name, adapter,
            adapter_options))


class RanPAC(FeatureStatisticsStrategy):
    """RanPAC: ridge classifier on random ReLU projections of a frozen backbone.

    Args:
        model: a classifier (timm, torchvision, ...); its head is removed in place
            (``head_name`` names it when :func:`~..conversion.find_classifier` cannot).
        M: dimension of the random projection (10000 in the paper).
        seed: seed of the projection and of the held-out split choosing lambda.
        ridge_grid: candidate lambdas (default ``10**k`` for ``k`` in -8..8).
        holdout_fraction: share of each experience held out to choose lambda.
        adapter, adapter_options: first-session adaptation (default none): the module
            (as :class:`~.aper.APER`'s) trained on the first experience for
            ``train_epochs`` with ``optimizer``, then frozen; the classifier reads the
            adapted features.
        optimizer, train_epochs: for the adaptation only (nothing trains without it).
        criterion, train_mb_size, eval_mb_size, device, plugins, evaluator, eval_every:
            as :class:`~.prototypes.SimpleCIL`.
    """

    def __init__(self, *, model: nn.Module, M: int = 10000, seed: int = 0,
                 ridge_grid: tuple[float, ...] = DEFAULT_RIDGE_GRID,
                 holdout_fraction: float = 0.2, head_name: str | None = None,
                 adapter: str | None = None, adapter_options: dict | None = None,
                 **kwargs):
        if adapter is not None and kwargs.get("optimizer") is None:
            raise ValueError("first-session adaptation (adapter) needs an optimizer, e.g. "
                             "torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)")
        plugin = RanPACPlugin(M, seed, ridge_grid, holdout_fraction, head_name, adapter,
                              adapter_options)
        super().__init__(model=model, plugin=plugin, **kwargs)
