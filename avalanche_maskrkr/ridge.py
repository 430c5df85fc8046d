"""RanPAC's classifier (McDonnell et al., NeurIPS 2023): ridge regression on random ReLU
features of fixed (frozen) features.

``h = ReLU(phi W_rand)`` with a fixed Gaussian ``W_rand`` (D, M). Over all data seen,
``G = sum h h^T`` (M, M) and ``C = sum h y^T`` (M, K) (one-hot ``y`` over global class
ids) are accumulated, so the classifier ``W = (G + lambda I)^-1 C`` is exactly the ridge
solution on all that data. ``lambda`` is chosen per experience from a grid: fit on part
of the experience plus the earlier statistics, keep the best accuracy on the rest, then
solve with all of it (one eigendecomposition for the grid, one linear solve for the
final classifier). Statistics and solves are float64. Used by the RanPAC strategy
(:mod:`.cil.ranpac`) and as a router (:mod:`.routing`, ``task_inference="ranpac"``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .routing import GrowingBuffers, unseen_masked

DEFAULT_RIDGE_GRID = tuple(10.0 ** k for k in range(-8, 9))


def ridge_solutions(gram: Tensor, targets: Tensor, ridges: list[float]) -> list[Tensor]:
    """``(gram + r I)^-1 targets`` (M, K) for each ``r``, from one eigendecomposition
    (for the grid of candidates)."""
    eigenvalues, vectors = torch.linalg.eigh(gram)
    projected = vectors.T @ targets
    return [vectors @ (projected / (eigenvalues + r)[:, None]) for r in ridges]


def ridge_solution(gram: Tensor, targets: Tensor, ridge: float) -> Tensor:
    """``(gram + ridge I)^-1 targets`` (M, K) for one ``ridge``, by an LU solve: about a
    tenth of an eigendecomposition's time (M = 4000, float64, on a CPU)."""
    system = gram.clone()
    system.diagonal().add_(ridge)
    return torch.linalg.solve(system, targets)


class RandomFeatureRidge(GrowingBuffers):
    """Ridge classifier on random ReLU projections of (B, D) features: ``-> (B, K)``.

    ``K`` is the largest class id seen + 1; columns of ids not seen yet are -inf.
    Buffers: ``projection`` (D, M), ``gram`` G (M, M), ``targets`` C (M, K), ``weight``
    W (M, K), ``seen`` (K,), ``ridge`` (the last lambda chosen).
    """

    def __init__(self, feature_dim: int, M: int = 10000, seed: int = 0,
                 ridge_grid: tuple[float, ...] = DEFAULT_RIDGE_GRID,
                 holdout_fraction: float = 0.2):
        super().__init__()
        if not ridge_grid or min(ridge_grid) <= 0:
            raise ValueError(f"ridge_grid must hold positive values, got {ridge_grid}")
        if not 0 < holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
        self.ridge_grid = tuple(ridge_grid)
        self.holdout_fraction = holdout_fraction
        self.generator = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(
            feature_dim, M, generator=self.generator))
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

    def forward(self, features: Tensor) -> Tensor:
        logits = self.project(features) @ self.weight
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
        self.weight = ridge_solution(self.gram, self.targets, self.ridge).float()
