"""Split CIFAR-100, task- or class-incremental, from a local ``cifar-100-python`` folder."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

from avalanche.benchmarks.datasets.dataset_utils import default_dataset_location
from avalanche.benchmarks.scenarios.deprecated.new_classes.nc_scenario import (
    NCScenario,
)
from torchvision import transforms as T
from torchvision.datasets import CIFAR100

from .task_split import incremental_split
from .transforms import Backbone, InputSpec, MeanStd, resolve_input_spec, to_normalized_tensor

CIFAR100_MEAN_STD: MeanStd = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
CIFAR_SPEC = InputSpec(32, CIFAR100_MEAN_STD)


class LocalCIFAR100(CIFAR100):
    """torchvision ``CIFAR100`` that never downloads and checks that the
    ``train``/``test``/``meta`` pickles exist, not their md5.

    torchvision refuses files whose checksum differs from the official
    archive's; dropping the checksums (``check_integrity(path, None)`` only
    tests existence) lets the same parser read copies that were re-packed,
    subsampled, or written in the same pickle format for tests.
    """

    train_list = [[name, None] for name, _ in CIFAR100.train_list]
    test_list = [[name, None] for name, _ in CIFAR100.test_list]
    meta = {**CIFAR100.meta, "md5": None}

    def __init__(self, root: str | Path, train: bool) -> None:
        folder = Path(root) / self.base_folder
        for name, _ in self.train_list + self.test_list + [[self.meta["filename"], None]]:
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"CIFAR-100 file not found: {folder / name}. Download the "
                    "CIFAR-100 python version (cifar-100-python.tar.gz from "
                    f"https://www.cs.toronto.edu/~kriz/cifar.html) and extract it in {root}"
                )
        super().__init__(str(root), train=train, download=False)


def cifar_transforms(spec: InputSpec, train: bool) -> T.Compose:
    """CIFAR pipeline: PIL 32x32 -> (3, S, S); training adds a random crop with
    ``4 * S / 32`` padding and a horizontal flip; ``Resize(S)`` when S != 32."""
    size = spec.image_size
    steps: list = [] if size == 32 else [T.Resize(size, interpolation=spec.interpolation)]
    if train:
        steps += [T.RandomCrop(size, padding=round(4 * size / 32)), T.RandomHorizontalFlip()]
    return to_normalized_tensor(steps, spec.mean_std)


def split_cifar100(
    n_experiences: int = 10,
    root: str | Path | None = None,
    image_size: int | None = None,
    seed: int | None = None,
    fixed_class_order: Optional[Sequence[int]] = None,
    train_transform: Optional[Callable] = None,
    eval_transform: Optional[Callable] = None,
    mean_std: MeanStd | None = None,
    backbone: Backbone | None = None,
    scenario: str = "task",
) -> NCScenario:
    """Split CIFAR-100 into ``n_experiences`` experiences of ``C = 100 / n_experiences``
    classes; experience ``i`` has task label ``i`` and classes ``0..C-1``
    (``scenario="task"``), or task label 0 and classes ``i*C..(i+1)*C-1``
    (``scenario="class"``: with the defaults, the B0-Inc10 protocol in the published
    class order; ``n_experiences=20`` for B0-Inc5).

    Args:
        n_experiences: number of experiences (must divide 100).
        root: folder holding ``cifar-100-python/{train,test,meta}``; default
            Avalanche's ``~/.avalanche/data/cifar100``. Nothing is downloaded.
        image_size: output side (default 32, or the backbone's input size).
        seed: seed of the class order (ignored with ``fixed_class_order``); default
            0 for ``"task"`` and 1993 for ``"class"``, the published protocols' seed
            (see :func:`~.task_split.class_order`).
        fixed_class_order: the 100 original class ids in experience order.
        train_transform, eval_transform: replace the default pipelines
            (see :func:`cifar_transforms`).
        mean_std: normalisation (default CIFAR-100 statistics, or the backbone's).
        backbone: timm model or name giving image size and normalisation.
        scenario: ``"task"`` or ``"class"`` (see :func:`~.task_split.incremental_split`).

    Raises:
        FileNotFoundError: the ``cifar-100-python`` files are not under ``root``.
    """
    root = default_dataset_location("cifar100") if root is None else Path(root)
    spec = resolve_input_spec(backbone, image_size, mean_std, default=CIFAR_SPEC)
    if train_transform is None:
        train_transform = cifar_transforms(spec, train=True)
    if eval_transform is None:
        eval_transform = cifar_transforms(spec, train=False)
    return incremental_split(
        LocalCIFAR100(root, train=True),
        LocalCIFAR100(root, train=False),
        n_experiences,
        scenario,
        seed=seed,
        fixed_class_order=fixed_class_order,
        train_transform=train_transform,
        eval_transform=eval_transform,
    )
