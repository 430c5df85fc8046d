"""Task-incremental class splits of one dataset, built with Avalanche's ``nc_benchmark``."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from avalanche.benchmarks.scenarios.deprecated.generators import nc_benchmark
from avalanche.benchmarks.scenarios.deprecated.new_classes.nc_scenario import (
    NCScenario,
)
from torch.utils.data import Dataset


def task_incremental_split(
    train_set: Dataset,
    test_set: Dataset,
    n_experiences: int,
    *,
    seed: int = 0,
    fixed_class_order: Optional[Sequence[int]] = None,
    train_transform: Optional[Callable] = None,
    eval_transform: Optional[Callable] = None,
) -> NCScenario:
    """Split the classes of ``train_set``/``test_set`` into ``n_experiences`` tasks.

    Experience ``i`` has task label ``i`` and its classes renumbered
    ``0..C-1`` in class-order position (``C = n_classes / n_experiences``);
    samples are ``(x, y, t)``. Label ``y`` of experience ``i`` is the original
    class ``benchmark.classes_order_original_ids[i * C + y]``.

    Args:
        train_set, test_set: datasets with a ``targets`` sequence of integer
            class ids and ``(x, y)`` samples.
        n_experiences: number of tasks; must divide the number of classes.
        seed: the class order is a permutation of the sorted class ids drawn
            from a local generator seeded with it (torch's global RNG is
            left untouched).
        fixed_class_order: explicit class order, overriding ``seed``.
        train_transform, eval_transform: the ``train`` and ``eval`` transform
            groups, switched by ``dataset.train()`` / ``dataset.eval()``.
    """
    if fixed_class_order is None:
        classes = sorted({int(c) for c in train_set.targets})
        perm = torch.randperm(len(classes), generator=torch.Generator().manual_seed(seed))
        fixed_class_order = [classes[i] for i in perm.tolist()]
    return nc_benchmark(
        train_set,
        test_set,
        n_experiences=n_experiences,
        task_labels=True,
        shuffle=False,
        fixed_class_order=list(fixed_class_order),
        class_ids_from_zero_in_each_exp=True,
        train_transform=train_transform,
        eval_transform=eval_transform,
    )
