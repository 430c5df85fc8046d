"""RanPAC (McDonnell et al., NeurIPS 2023): a frozen backbone's features through
:class:`~avalanche_maskrkr.ridge.RandomFeatureRidge`, a ridge classifier on random ReLU
projections whose streamed solution is the ridge solution on all data seen."""
from __future__ import annotations

from torch import Tensor, nn

from ..ridge import DEFAULT_RIDGE_GRID, RandomFeatureRidge
from .plugins import FeatureStatisticsPlugin, FeatureStatisticsStrategy
from .prototypes import FrozenBackbone


class RanPACClassifier(RandomFeatureRidge):
    """:class:`~avalanche_maskrkr.ridge.RandomFeatureRidge` over the features of ``model``
    as a :class:`~.prototypes.FrozenBackbone`: ``(B, ...) -> (B, K)``."""

    def __init__(self, model: nn.Module, M: int = 10000, seed: int = 0,
                 ridge_grid: tuple[float, ...] = DEFAULT_RIDGE_GRID,
                 holdout_fraction: float = 0.2, head_name: str | None = None):
        backbone = FrozenBackbone(model, head_name)
        super().__init__(backbone.feature_dim, M, seed, ridge_grid, holdout_fraction)
        self.backbone = backbone

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.backbone(x))


class RanPACPlugin(FeatureStatisticsPlugin):
    """RanPAC as a plugin: the model becomes a :class:`RanPACClassifier` (arguments as
    :class:`RanPAC`'s)."""

    def __init__(self, M: int = 10000, seed: int = 0,
                 ridge_grid: tuple[float, ...] = DEFAULT_RIDGE_GRID,
                 holdout_fraction: float = 0.2, head_name: str | None = None):
        super().__init__(RanPACClassifier, lambda model: RanPACClassifier(
            model, M, seed, ridge_grid, holdout_fraction, head_name))


class RanPAC(FeatureStatisticsStrategy):
    """RanPAC: ridge classifier on random ReLU projections of a frozen backbone.

    Args:
        model: a classifier (timm, torchvision, ...); its head is removed in place
            (``head_name`` names it when :func:`~..conversion.find_classifier` cannot).
        M: dimension of the random projection (10000 in the paper).
        seed: seed of the projection and of the held-out split choosing lambda.
        ridge_grid: candidate lambdas (default ``10**k`` for ``k`` in -8..8).
        holdout_fraction: share of each experience held out to choose lambda.
        criterion, train_mb_size, eval_mb_size, device, plugins, evaluator, eval_every:
            as :class:`~.prototypes.SimpleCIL`.
    """

    def __init__(self, *, model: nn.Module, M: int = 10000, seed: int = 0,
                 ridge_grid: tuple[float, ...] = DEFAULT_RIDGE_GRID,
                 holdout_fraction: float = 0.2, head_name: str | None = None, **kwargs):
        plugin = RanPACPlugin(M, seed, ridge_grid, holdout_fraction, head_name)
        super().__init__(model=model, plugin=plugin, **kwargs)
