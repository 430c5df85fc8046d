"""RanPAC (McDonnell et al., NeurIPS 2023): ridge regression on random ReLU features.

``h = ReLU(phi(x) W_rand)`` with a fixed Gaussian ``W_rand`` (D, M). Over all data seen,
``G = sum h h^T`` (M, M) and ``C = sum h y^T`` (M, K) (one-hot ``y`` over global class
ids) are accumulated, so the classifier ``W = (G + lambda I)^-1 C`` is exactly the ridge
solution on all that data. ``lambda`` is chosen per experience from a grid: fit on part
of the experience plus the earlier statistics, keep the best accuracy on the rest, then
solve with all of it. Statistics and solves are float64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..routing import GrowingBuffers, unseen_masked
from .prototypes import FeatureStatisticsStrategy, FrozenBackbone

DEFAULT_RIDGE_GRID = tuple(10.0 ** k for k in range(-8, 9))


def ridge_solutions(gram: Tensor, targets: Tensor, ridges: list[float]) -> list[Tensor]:
    """``(gram + r I)^-1 targets`` (M, K) for each ``r``, from one eigendecomposition."""
    eigenvalues, vectors = torch.linalg.eigh(gram)
    projected = vectors.T @ targets
    return [vectors @ (projected / (eigenvalues + r)[:, None]) for r in ridges]


class RanPACClassifier(GrowingBuffers):
    """Ridge classifier on randomly projected frozen features: ``(B, ...) -> (B, K)``.

    ``K`` is the largest class id seen + 1; columns of ids not seen yet are -inf.
    Buffers: ``projection`` (D, M), ``gram`` G (M, M), ``targets`` C (M, K), ``weight``
    W (M, K), ``seen`` (K,), ``ridge`` (the last lambda chosen).
    """

    def __init__(self, model: nn.Module, M: int = 10000, seed: int = 0,
                 ridge_grid: tuple[float, ...] = DEFAULT_RIDGE_GRID,
                 holdout_fraction: float = 0.2, head_name: str | None = None):
        super().__init__()
        if not ridge_grid or min(ridge_grid) <= 0:
            raise ValueError(f"ridge_grid must hold positive values, got {ridge_grid}")
        if not 0 < holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
        self.backbone = FrozenBackbone(model, head_name)
        self.ridge_grid = tuple(ridge_grid)
        self.holdout_fraction = holdout_fraction
        self.generator = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(
            self.backbone.feature_dim, M, generator=self.generator))
        self.register_buffer("gram", torch.zeros(M, M, dtype=torch.float64))
        self.register_buffer("targets", torch.zeros(M, 0, dtype=torch.float64))
        self.register_buffer("weight", torch.zeros(M, 0))
        self.register_buffer("seen", torch.zeros(0, dtype=torch.bool))
        self.ridge: float | None = None

    def get_extra_state(self) -> dict:
        return {"generator": self.generator.get_state(), "ridge": self.ridge}

    def set_extra_state(self, state: dict) -> None:
        """The held-out splits go on where the saved classifier's stopped."""
        self.generator.set_state(state["generator"])
        self.ridge = state["ridge"]

    def project(self, features: Tensor) -> Tensor:
        """Random ReLU features ``h`` (N, M) of backbone features (N, D)."""
        return F.relu(features @ self.projection)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.project(self.backbone(x)) @ self.weight
        return unseen_masked(logits, self.seen)

    def _statistics(self, h: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``h^T h`` (M, M) and ``h^T onehot(labels)`` (M, K) in float64."""
        h = h.double()
        return h.T @ h, h.T @ F.one_hot(labels, self.targets.shape[1]).double()

    @torch.no_grad()
    def learn(self, features: Tensor, labels: Tensor) -> None:
        """Add an experience (features (N, D), labels (N,)), choose lambda, solve W."""
        size = max(len(self.seen), int(labels.max()) + 1)
        self.targets = F.pad(self.targets, (0, size - self.targets.shape[1]))
        self.seen = F.pad(self.seen, (0, size - len(self.seen)))
        self.seen[labels.unique()] = True
        h = self.project(features)
        order = torch.randperm(len(labels), generator=self.generator).to(labels.device)
        n_held = max(1, int(self.holdout_fraction * len(labels)))
        held, fit = order[:n_held], order[n_held:]
        gram, targets = self._statistics(h[fit], labels[fit])
        candidates = ridge_solutions(self.gram + gram, self.targets + targets, list(self.ridge_grid))
        accuracies = [((h[held].double() @ w).argmax(1) == labels[held]).double().mean()
                      for w in candidates]
        self.ridge = self.ridge_grid[int(torch.stack(accuracies).argmax())]
        gram, targets = self._statistics(h, labels)
        self.gram += gram
        self.targets += targets
        self.weight = ridge_solutions(self.gram, self.targets, [self.ridge])[0].float()


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
        classifier = RanPACClassifier(model, M, seed, ridge_grid, holdout_fraction, head_name)
        super().__init__(model=classifier, **kwargs)
