"""Split ImageNet-1k (or a subset: ImageNet-100, ImageNet-R, ...), task- or
class-incremental, from a local ``train/``, ``val/`` tree."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

from avalanche.benchmarks.scenarios.deprecated.new_classes.nc_scenario import (
    NCScenario,
)
from torchvision.datasets import ImageFolder

from .task_split import incremental_split
from .transforms import Backbone, MeanStd, backbone_transforms


def _image_folders(root: Path) -> tuple[ImageFolder, ImageFolder]:
    """``ImageFolder`` of ``root/train`` and ``root/val``, checked to share
    the same class folders (so that class ids agree)."""
    folders = []
    for split in ("train", "val"):
        path = root / split
        if not path.is_dir():
            raise FileNotFoundError(
                f"ImageNet {split} folder not found: {path} "
                f"(expected {split}/<wnid>/*.JPEG under {root})"
            )
        folders.append(ImageFolder(str(path)))
    train, val = folders
    if train.classes != val.classes:
        differ = sorted(set(train.classes) ^ set(val.classes))
        raise ValueError(
            f"{root}/train and {root}/val have different class folders; "
            f"only in one of them: {differ[:10]}{' ...' if len(differ) > 10 else ''}"
        )
    return train, val


def split_imagenet(
    root: str | Path,
    n_experiences: int = 10,
    image_size: int | None = None,
    seed: int | None = None,
    fixed_class_order: Optional[Sequence[int]] = None,
    train_transform: Optional[Callable] = None,
    eval_transform: Optional[Callable] = None,
    mean_std: MeanStd | None = None,
    backbone: Backbone | None = None,
    scenario: str = "task",
) -> NCScenario:
    """Split the folder's classes into ``n_experiences`` experiences of ``C`` classes
    (10 of 100 for ImageNet-1k by default); experience ``i`` has task label ``i`` and
    classes ``0..C-1`` (``scenario="task"``), or task label 0 and classes
    ``i*C..(i+1)*C-1`` (``scenario="class"``).

    Args:
        root: folder with ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``;
            class ids are the sorted wnids' positions.
        n_experiences: number of experiences (must divide the number of classes).
        image_size: output side (default 224, or the backbone's input size).
        seed: seed of the class order (ignored with ``fixed_class_order``); default
            0 for ``"task"`` and 1993 for ``"class"``, the published protocols' seed
            (see :func:`~.task_split.class_order`).
        fixed_class_order: the original class ids in experience order.
        train_transform, eval_transform: replace the defaults of
            :func:`backbone_transforms` (random resized crop + flip; resize to
            ``S / 0.875`` + center crop).
        mean_std: normalisation (default ImageNet statistics, or the backbone's).
        backbone: timm model or name giving size, normalisation and crop ratio.
        scenario: ``"task"`` or ``"class"`` (see :func:`~.task_split.incremental_split`).

    Raises:
        FileNotFoundError: ``root/train`` or ``root/val`` is missing.
        ValueError: the two splits have different class folders.
    """
    train_set, val_set = _image_folders(Path(root))
    if train_transform is None:
        train_transform = backbone_transforms(backbone, image_size, True, mean_std)
    if eval_transform is None:
        eval_transform = backbone_transforms(backbone, image_size, False, mean_std)
    return incremental_split(
        train_set,
        val_set,
        n_experiences,
        scenario,
        seed=seed,
        fixed_class_order=fixed_class_order,
        train_transform=train_transform,
        eval_transform=eval_transform,
    )
