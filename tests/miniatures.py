"""Miniature on-disk datasets in the real formats, for loader tests.

Images encode their class in their colour so that tests can check labels
against pixels.
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def class_colour(c: int) -> tuple[int, int, int]:
    """A distinct RGB colour per class id (robust to JPEG compression)."""
    return (40 * (c % 6) + 20, 40 * ((c // 6) % 6) + 20, 100)


def write_jpeg(path: Path, colour: tuple[int, int, int], size: tuple[int, int]) -> None:
    """Solid-colour JPEG of ``size`` = (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=95)


class _Py2StrPickler(pickle._Pickler):
    """Pickles ``bytes`` as Python 2 ``str`` (BINSTRING opcodes), as in the
    official CIFAR files: they load as ``str`` with ``encoding="latin1"``
    (torchvision) and as ``bytes`` with ``encoding="bytes"``."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _dump_py2(obj: object, path: Path) -> None:
    with open(path, "wb") as f:
        _Py2StrPickler(f, protocol=2).dump(obj)


def write_cifar100(root: Path, train_per_class: int = 2, test_per_class: int = 1) -> Path:
    """``root/cifar-100-python/{train,test,meta}`` with 100 classes; every
    pixel of an image of class ``c`` is ``c`` (all channels)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        fine = [c for c in range(100) for _ in range(per_class)]
        data = np.repeat(np.array(fine, dtype=np.uint8)[:, None], 3072, axis=1)
        _dump_py2(
            {
                b"filenames": [f"img_{i}.png".encode() for i in range(len(fine))],
                b"batch_label": f"{split} batch".encode(),
                b"fine_labels": fine,
                b"coarse_labels": [c // 5 for c in fine],
                b"data": data,
            },
            folder / split,
        )
    _dump_py2(
        {
            b"fine_label_names": [f"class{c}".encode() for c in range(100)],
            b"coarse_label_names": [f"super{c}".encode() for c in range(20)],
        },
        folder / "meta",
    )
    return folder


def write_imagenet(root: Path, n_classes: int = 10, train_per_class: int = 2) -> list[str]:
    """``root/{train,val}/<wnid>/*.JPEG`` (1 val image per class); returns the wnids."""
    wnids = [f"n{1440764 + c:08d}" for c in range(n_classes)]
    for c, wnid in enumerate(wnids):
        for split, count in (("train", train_per_class), ("val", 1)):
            for k in range(count):
                write_jpeg(root / split / wnid / f"{wnid}_{k}.JPEG", class_colour(c), (12, 10))
    return wnids


def write_decathlon(
    root: Path, domains: dict[str, int], counts: dict[str, list[int]]
) -> dict[tuple[str, str], list[int]]:
    """A ``decathlon-1.0`` folder: ``annotations/<d>_<split>.json`` and
    ``data/<d>/<split>/NNNNNN.jpg`` (shorter side 72, like the real images).

    Args:
        domains: domain -> decathlon index (category ids ``index*10**7 + k``,
            k = 1..C, as in the real files).
        counts: split -> images per class (0 leaves the class out of the split);
            its length is the number of classes C of every domain.

    Returns:
        (domain, split) -> expected label of each image, in file order.
    """
    expected = {}
    for domain, index in domains.items():
        n_classes = len(next(iter(counts.values())))
        cat_ids = [index * 10**7 + k + 1 for k in range(n_classes)]
        # listed unsorted: the loader must sort categories by id
        categories = [
            {"id": i, "name": f"{domain}_class{i - cat_ids[0]}", "supercategory": domain}
            for i in reversed(cat_ids)
        ]
        image_id = index * 10**7 + 200001
        for split, per_class in counts.items():
            labels = [k for k in range(n_classes) for _ in range(per_class[k])][::-1]
            images, annotations = [], []
            for n, label in enumerate(labels, start=1):
                file_name = f"data/{domain}/{split}/{n:06d}.jpg"
                write_jpeg(root / file_name, class_colour(label), (72 + 9 * (n % 3), 72))
                images.append({"id": image_id, "width": 72, "height": 72, "file_name": file_name})
                annotations.append(
                    {"id": image_id, "image_id": image_id, "category_id": cat_ids[label],
                     "segmentation": [], "area": 0, "bbox": [], "iscrowd": 0}
                )
                image_id += 1
            coco = {"info": {"description": "Decathlon"}, "images": images,
                    "annotations": annotations, "categories": categories, "licenses": []}
            (root / "annotations").mkdir(parents=True, exist_ok=True)
            (root / "annotations" / f"{domain}_{split}.json").write_text(json.dumps(coco))
            expected[domain, split] = labels
    return expected
