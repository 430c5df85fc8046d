"""Reproduce the paper's ImageNet-1k results (SPEC section 5): 10 tasks of 100 classes.

Rows: RKR (K=2), Piggyback, Mask-RKR (K=2), Mask-RKR (K+), Single and Multi-Head, with
Piggyback's recipe (Adam, lr 1e-4, x0.1 after 15 epochs, 30 epochs, batch 32) at
224x224. One backbone per run; results go to --out/<model> and --out/paper_table.md
puts every backbone run so far beside the paper's average accuracies. --data-root holds
train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (the usual ImageFolder layout; nothing is
downloaded except with --pretrained).

    python examples/reproduce_imagenet.py --data-root ~/imagenet --model resnet18 \\
        --weights ~/weights/resnet18.safetensors --device cuda --workers 8
    python examples/reproduce_imagenet.py --data-root ~/imagenet \\
        --model vit_base_patch16_224 --weights ~/weights/ViT-B_16.npz --device cuda --workers 8
    python examples/reproduce_imagenet.py --data-root ~/imagenet \\
        --model swin_tiny_patch4_window7_224 --pretrained --device cuda --workers 8

With pretrained weights the input pipeline uses the backbone's normalisation. Note that
backbones pretrained on ImageNet-1k have seen these images. Any option of
``python -m avalanche_maskrkr run`` applies. --smoke runs the whole pipeline in seconds
on a miniature image folder with a tiny random model.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from avalanche_maskrkr import paper

PAPER = {
    "rkr": (0.545, 0.885, 0.892),
    "piggyback": (0.440, 0.881, 0.805),
    "mask-rkr": (0.557, 0.879, 0.870),
    "mask-rkr-k+": (0.582, 0.885, 0.894),
    "single": (None, None, 0.902),
}
"""Average accuracy reported by the paper (ResNet-18, ViT, Swin)."""


def write_miniature_imagenet(folder: Path, classes: int = 4, per_class: int = 2) -> Path:
    """``folder/{train,val}/<wnid>/*.JPEG``: random 40x40 images, ``per_class`` per class
    for training and one for validation."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        wnid = f"n{c:08d}"
        for split, count in (("train", per_class), ("val", 1)):
            (folder / split / wnid).mkdir(parents=True)
            for k in range(count):
                pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / split / wnid / f"{wnid}_{k}.JPEG")
    return folder


def main(argv: list[str] | None = None) -> None:
    paper.reproduce_paper(argv, __doc__, "ImageNet-1k", PAPER, write_miniature_imagenet,
                          benchmark="imagenet", model="resnet18")


if __name__ == "__main__":
    main(sys.argv[1:])
