"""Class splits of one dataset into task- or class-incremental streams, built with
Avalanche's ``nc_benchmark``."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from avalanche.benchmarks.scenarios.deprecated.generators import nc_benchmark
from avalanche.benchmarks.scenarios.deprecated.new_classes.nc_scenario import (
    NCScenario,
)
from torch.utils.data import Dataset

SCENARIOS = ("task", "class")
"""``"task"``: experience ``i`` has task label ``i`` and classes ``0..C-1``.
``"class"``: every experience has task label 0 and classes are numbered globally."""

PUBLISHED_CLASS_ORDER_SEED = 1993
"""Seed of the class order of the published class-incremental protocols (iCaRL's
CIFAR-100 order as FACIL lists it; PyCIL and LAMDA-PILOT with ``shuffle``): the order
is ``np.random.seed(1993); np.random.permutation(n_classes)``."""


def check_scenario(scenario: str) -> None:
    """Raise ValueError unless ``scenario`` is one of :data:`SCENARIOS`."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose one of {list(SCENARIOS)}")


def class_order(classes: Sequence[int], scenario: str, seed: int | None = None) -> list[int]:
    """The sorted ``classes`` in a seeded random order, one rule per scenario.

    ``"task"``: a permutation from a local torch generator seeded with ``seed``
    (default 0). ``"class"``: numpy's legacy permutation, as the published protocols
    draw it, seeded with ``seed`` (default :data:`PUBLISHED_CLASS_ORDER_SEED`), so that
    CIFAR-100 gets their order. Neither touches a global RNG.
    """
    check_scenario(scenario)
    classes = sorted(classes)
    if scenario == "task":
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
        perm = torch.randperm(len(classes), generator=generator).tolist()
    else:
        seed = PUBLISHED_CLASS_ORDER_SEED if seed is None else seed
        perm = np.random.RandomState(seed).permutation(len(classes)).tolist()
    return [classes[i] for i in perm]


def incremental_split(
    train_set: Dataset,
    test_set: Dataset,
    n_experiences: int,
    scenario: str = "task",
    *,
    seed: int | None = None,
    fixed_class_order: Optional[Sequence[int]] = None,
    train_transform: Optional[Callable] = None,
    eval_transform: Optional[Callable] = None,
) -> NCScenario:
    """Split the classes of ``train_set``/``test_set`` into ``n_experiences``
    experiences of ``C = n_classes / n_experiences`` classes each; samples are
    ``(x, y, t)``. Let ``order = benchmark.classes_order_original_ids``.

    ``scenario="task"``: experience ``i`` has task label ``i`` and its classes
    renumbered ``0..C-1``; label ``y`` is the original class ``order[i * C + y]``.
    ``scenario="class"``: every experience has task label 0 and the global ids
    ``i * C .. (i + 1) * C - 1`` (Avalanche's ``class_ids_from_zero_from_first_exp``);
    label ``y`` is the original class ``order[y]``.

    Args:
        train_set, test_set: datasets with a ``targets`` sequence of integer
            class ids and ``(x, y)`` samples.
        n_experiences: number of experiences; must divide the number of classes.
        scenario: one of :data:`SCENARIOS`.
        seed: seed of the class order (see :func:`class_order`).
        fixed_class_order: explicit class order, overriding ``seed``.
        train_transform, eval_transform: the ``train`` and ``eval`` transform
            groups, switched by ``dataset.train()`` / ``dataset.eval()``.

    Raises:
        ValueError: an unknown ``scenario``.
    """
    check_scenario(scenario)
    if fixed_class_order is None:
        fixed_class_order = class_order({int(c) for c in train_set.targets}, scenario, seed)
    return nc_benchmark(
        train_set,
        test_set,
        n_experiences=n_experiences,
        task_labels=scenario == "task",
        shuffle=False,
        fixed_class_order=[int(c) for c in fixed_class_order],
        class_ids_from_zero_in_each_exp=scenario == "task",
        class_ids_from_zero_from_first_exp=scenario == "class",
        train_transform=train_transform,
        eval_transform=eval_transform,
    )
