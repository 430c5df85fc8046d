"""Split Digits: scikit-learn's bundled 8x8 digits as a tiny task- or class-incremental
stream."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from avalanche.benchmarks.scenarios.deprecated.new_classes.nc_scenario import (
    NCScenario,
)
from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from .task_split import incremental_split


def split_digits(
    n_experiences: int = 5,
    image_size: int | None = None,
    channels: int = 1,
    seed: int = 0,
    test_fraction: float = 0.3,
    mean_std: tuple[Sequence[float], Sequence[float]] | None = None,
    scenario: str = "task",
) -> NCScenario:
    """The 1797 digits (no download) as ``n_experiences`` experiences in class
    order 0..9: with 5, experience ``i`` holds digits ``{2i, 2i+1}``, labelled 0 and 1
    with task label ``i`` (``scenario="task"``) or labelled ``2i`` and ``2i+1`` with
    task label 0 (``scenario="class"``).

    Samples are ``(x, y, t)`` with ``x`` float32 in [0, 1] (normalised with
    ``mean_std`` when given) of shape
    ``(channels, S, S)`` (``S = 8`` unless ``image_size``); all tensors are
    prepared once, there are no per-sample transforms.

    Args:
        n_experiences: number of experiences (must divide 10).
        image_size: side ``S`` to resize to (bilinear), e.g. 32 for small CNNs.
        channels: 1, or 3 to repeat the grey channel for RGB backbones.
        seed: seed of the stratified train/test split.
        test_fraction: fraction of each digit held out for testing.
        mean_std: per-channel ``(mean, std)`` to normalise with, e.g. a pretrained
            backbone's (:func:`~.transforms.resolve_input_spec`).
        scenario: ``"task"`` or ``"class"`` (see :func:`~.task_split.incremental_split`).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size is not None:
        images = F.interpolate(
            images, size=(image_size, image_size), mode="bilinear", align_corners=False
        ).clamp_(0.0, 1.0)
    images = images.expand(-1, channels, -1, -1).contiguous()
    if mean_std is not None:
        mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in mean_std)
        images = (images - mean) / std
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=test_fraction,
        stratify=digits.target,
        random_state=seed,
    )
    train_set, test_set = (
        _make_taskaware_tensor_classification_dataset(images[idx], labels[idx])
        for idx in map(torch.as_tensor, (train_idx, test_idx))
    )
    return incremental_split(
        train_set, test_set, n_experiences, scenario, fixed_class_order=range(10)
    )
