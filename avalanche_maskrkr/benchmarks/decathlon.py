"""Visual Decathlon: one task per domain, read from the official decathlon-1.0 layout.

``root`` is the ``decathlon-1.0`` folder::

    annotations/<domain>_{train,val,test}.json   COCO-style, ids offset per domain
    data/<domain>/{train,val,test}/NNNNNN.jpg    images, shorter side 72

Each JSON has ``images`` ``[{id, file_name, ...}]`` (``file_name`` relative to
``root``, e.g. ``data/dtd/train/000001.jpg``), ``annotations``
``[{image_id, category_id, ...}]`` and ``categories`` ``[{id, name, ...}]``.
``<domain>_test_stripped.json`` (the devkit's unlabelled test set) is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from avalanche.benchmarks.scenarios.deprecated.classification_scenario import (
    GenericCLScenario,
)
from avalanche.benchmarks.utils import _make_taskaware_classification_dataset
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from .transforms import (
    IMAGENET_MEAN_STD,
    Backbone,
    InputSpec,
    MeanStd,
    resolve_input_spec,
    to_normalized_tensor,
)

DEFAULT_DOMAINS = ("dtd", "gtsrb", "svhn", "ucf101", "vgg-flowers")

DOMAIN_MEAN_STD: dict[str, MeanStd] = {
    "dtd": ((0.527, 0.470, 0.424), (0.252, 0.241, 0.250)),
    "gtsrb": ((0.339, 0.312, 0.320), (0.276, 0.266, 0.271)),
    "svhn": ((0.438, 0.444, 0.473), (0.198, 0.201, 0.197)),
    "ucf101": ((0.500, 0.499, 0.500), (0.109, 0.108, 0.107)),
    "vgg-flowers": ((0.434, 0.383, 0.297), (0.285, 0.238, 0.264)),
}
"""Per-domain RGB normalisation of the reference loader (others: ImageNet)."""

NO_AUGMENTATION = frozenset({"gtsrb", "omniglot", "svhn"})
"""Domains (signs, characters, digits) trained without random crop or flip."""

REFERENCE_ACCURACY: dict[str, float] = {
    "imagenet12": 59.87,
    "aircraft": 60.34,
    "cifar100": 82.12,
    "daimlerpedcls": 92.82,
    "dtd": 55.53,
    "gtsrb": 97.53,
    "vgg-flowers": 81.41,
    "omniglot": 87.69,
    "svhn": 96.55,
    "ucf101": 51.20,
}
"""Test accuracy (%) of the fine-tuning baseline that sets the decathlon score."""

REFERENCE_SIZE, REFERENCE_RESIZE = 64, 72


class DecathlonSplit(Dataset):
    """One labelled split of one domain; samples are ``(PIL RGB image, label)``.

    Labels are the positions of the category ids in the sorted ``categories``
    list of the annotation file, so they do not depend on which classes the
    split contains. ``classes`` holds the category names in label order.

    Args:
        root: the ``decathlon-1.0`` folder.
        domain: e.g. ``"dtd"``.
        split: ``"train"``, ``"val"`` or ``"test"`` (labelled test file).

    Raises:
        FileNotFoundError: annotation file or ``data/<domain>`` folder missing.
        ValueError: an image of the split has no label.
    """

    def __init__(self, root: str | Path, domain: str, split: str) -> None:
        root = Path(root)
        path = root / "annotations" / f"{domain}_{split}.json"
        if not path.is_file():
            stripped = path.with_name(f"{domain}_{split}_stripped.json")
            hint = (
                f"; {stripped.name} has no labels and cannot be used for evaluation"
                if stripped.is_file()
                else ""
            )
            raise FileNotFoundError(f"Decathlon annotations not found: {path}{hint}")
        image_dir = root / "data" / domain
        if not image_dir.is_dir():
            raise FileNotFoundError(f"Decathlon images not found: {image_dir}")
        with open(path) as f:
            coco = json.load(f)
        categories = sorted(coco["categories"], key=lambda c: c["id"])
        label_of_category = {c["id"]: i for i, c in enumerate(categories)}
        label_of_image = {
            a["image_id"]: label_of_category[a["category_id"]] for a in coco["annotations"]
        }
        unlabelled = [im["id"] for im in coco["images"] if im["id"] not in label_of_image]
        if unlabelled:
            raise ValueError(
                f"{len(unlabelled)} of {len(coco['images'])} images in {path} have no "
                "label (an unlabelled split such as *_test_stripped.json?)"
            )
        self.domain = domain
        self.classes = [c["name"] for c in categories]
        self.samples = [(root / im["file_name"], label_of_image[im["id"]]) for im in coco["images"]]
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        with Image.open(path) as image:
            return image.convert("RGB"), label


def decathlon_transforms(domain: str, spec: InputSpec, train: bool) -> T.Compose:
    """Reference pipeline, PIL image -> (3, S, S) with ``S = spec.image_size``.

    Resize the shorter side to ``S * 72 / 64``, then random crop ``S`` + flip
    (training) or center crop ``S`` (eval). Domains in
    :data:`NO_AUGMENTATION` are only resized and center-cropped, to the
    whole 72x72 centre at the reference size 64 (as the reference loader),
    to ``S`` at any other size so that every domain has the same shape.
    """
    size, interp = spec.image_size, spec.interpolation
    resize = round(size * REFERENCE_RESIZE / REFERENCE_SIZE)
    if domain in NO_AUGMENTATION:
        side = resize if size == REFERENCE_SIZE else size
        steps = [T.Resize(side, interpolation=interp), T.CenterCrop(side)]
    elif train:
        steps = [
            T.Resize(resize, interpolation=interp),
            T.RandomCrop(size),
            T.RandomHorizontalFlip(),
        ]
    else:
        steps = [T.Resize(resize, interpolation=interp), T.CenterCrop(size)]
    return to_normalized_tensor(steps, spec.mean_std)


def visual_decathlon(
    root: str | Path,
    domains: Sequence[str] = DEFAULT_DOMAINS,
    test_split: str = "val",
    image_size: int | None = None,
    mean_std: MeanStd | None = None,
    backbone: Backbone | None = None,
    train_transform: Optional[Callable] = None,
    eval_transform: Optional[Callable] = None,
) -> GenericCLScenario:
    """One experience per domain, in ``domains`` order: experience ``i`` has
    task label ``i`` and the domain's classes ``0..C_i-1``.

    Train experiences read ``<domain>_train.json``; test experiences read
    ``<domain>_val.json`` (``test_split="val"``) or the labelled
    ``<domain>_test.json`` (``test_split="test"``).

    Args:
        root: the ``decathlon-1.0`` folder.
        domains: decathlon domain names, one task each.
        test_split: ``"val"`` or ``"test"``.
        image_size: output side (default 64, or the backbone's input size).
        mean_std: normalisation for every domain (default: per-domain
            :data:`DOMAIN_MEAN_STD`, ImageNet's for other domains, or the
            backbone's).
        backbone: timm model or name giving image size and normalisation.
        train_transform, eval_transform: replace the per-domain pipelines of
            :func:`decathlon_transforms` for every domain.

    Raises:
        ValueError: ``test_split`` is not ``"val"`` or ``"test"``.
        FileNotFoundError: an annotation file or image folder is missing.
    """
    if test_split not in ("val", "test"):
        raise ValueError(
            f"test_split must be 'val' or 'test' (labelled <domain>_test.json), got "
            f"{test_split!r}; the devkit's *_test_stripped.json files have no labels"
        )
    streams: dict[str, list] = {"train": [], "test": []}
    for task, domain in enumerate(domains):
        default = InputSpec(REFERENCE_SIZE, DOMAIN_MEAN_STD.get(domain, IMAGENET_MEAN_STD))
        spec = resolve_input_spec(backbone, image_size, mean_std, default=default)
        groups = {
            group: (decathlon_transforms(domain, spec, group == "train") if tf is None else tf, None)
            for group, tf in (("train", train_transform), ("eval", eval_transform))
        }
        for stream, split, group in (("train", "train", "train"), ("test", test_split, "eval")):
            streams[stream].append(
                _make_taskaware_classification_dataset(
                    DecathlonSplit(root, domain, split),
                    task_labels=task,
                    transform_groups=groups,
                    initial_transform_group=group,
                )
            )
    return GenericCLScenario(
        stream_definitions={name: (datasets,) for name, datasets in streams.items()}
    )


def decathlon_score(errors: Mapping[str, float]) -> float:
    """Decathlon score ``S = sum_d 1000 * (max(0, Emax_d - E_d) / Emax_d)^2``.

    ``Emax_d`` is twice the error of the fine-tuning baseline
    (:data:`REFERENCE_ACCURACY`), so a domain scores 250 at the baseline's
    error, 1000 at zero error and 0 at ``Emax_d`` or worse.

    Args:
        errors: test error of each evaluated domain as a fraction in [0, 1]
            (e.g. ``{"dtd": 0.4447}``, not percent).
    """
    score = 0.0
    for domain, error in errors.items():
        if domain not in REFERENCE_ACCURACY:
            raise ValueError(
                f"unknown decathlon domain {domain!r}; known: {sorted(REFERENCE_ACCURACY)}"
            )
        if not 0.0 <= error <= 1.0:
            raise ValueError(f"error of {domain!r} must be a fraction in [0, 1], got {error}")
        e_max = 2.0 * (1.0 - REFERENCE_ACCURACY[domain] / 100.0)
        score += 1000.0 * (max(0.0, e_max - error) / e_max) ** 2
    return score
