"""Reproduce the paper's Split CIFAR-100 results (SPEC section 5): 10 tasks of 10 classes.

Rows: RKR (K=2), Piggyback, Mask-RKR (K=2), Mask-RKR (K+: the rank whose total matches
RKR's), Single and Multi-Head, all with Piggyback's recipe (Adam, lr 1e-4, x0.1 after
15 epochs, 30 epochs, batch 32) at 32x32. One backbone per run; results go to
--out/<model> and --out/paper_table.md puts every backbone run so far beside the paper's
numbers (average accuracy after the last task). --data-root holds cifar-100-python/;
nothing is downloaded except with --pretrained.

    python examples/reproduce_cifar100.py --data-root ~/data --model resnet18_cifar --device cuda
    python examples/reproduce_cifar100.py --data-root ~/data --model vit_base_patch16_224 \\
        --weights ~/weights/ViT-B_16.npz --device cuda
    python examples/reproduce_cifar100.py --data-root ~/data \\
        --model swin_tiny_patch4_window7_224 --pretrained --device cuda

resnet18_cifar has no pretrained weights: without --weights its base trains on the first
task and is frozen afterwards (RKR's protocol). ViT and Swin run at 32x32 as in the paper
(timm resamples their position tables when loading weights). Any option of
``python -m avalanche_maskrkr run`` applies (--epochs, --lr, --rank, ...). --smoke runs
the whole pipeline in seconds on miniature CIFAR files with a tiny random model.
"""
from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np

from avalanche_maskrkr import paper

PAPER = {
    "rkr": (0.794, 0.843, 0.858),
    "piggyback": (0.804, 0.838, 0.875),
    "mask-rkr": (0.781, 0.840, 0.841),
    "mask-rkr-k+": (0.796, 0.845, 0.858),
    "single": (None, None, 0.876),
}
"""Average accuracy reported by the paper (ResNet-18, ViT, Swin)."""


def write_miniature_cifar100(folder: Path, per_class: int = 2) -> Path:
    """``folder/cifar-100-python/{train,test,meta}`` in the official pickle format, with
    ``per_class`` random 32x32 images per class in train and one in test."""
    rng = np.random.default_rng(0)
    target = folder / "cifar-100-python"
    target.mkdir(parents=True)
    for split, count in (("train", per_class), ("test", 1)):
        labels = [c for c in range(100) for _ in range(count)]
        data = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
        with open(target / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels,
                         "coarse_labels": [c // 5 for c in labels]}, f)
    with open(target / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{c}" for c in range(100)]}, f)
    return folder


def main(argv: list[str] | None = None) -> None:
    paper.reproduce_paper(argv, __doc__, "Split CIFAR-100", PAPER, write_miniature_cifar100,
                          benchmark="cifar100", model="resnet18_cifar")


if __name__ == "__main__":
    main(sys.argv[1:])
