"""The paper's Mask-RKR ablations on Split CIFAR-100 (SPEC section 5).

Rows: which generator is masked on the later tasks, none (= RKR), RG only, SFG only or
both (Mask-RKR); and where the RG's mask sits, on the factors LM and RM (Mask-RKR's
default) or on their full product R (1 bit per weight). Every row has K=2 and
Piggyback's recipe (Adam, lr 1e-4, x0.1 after 15 epochs, 30 epochs, batch 32). One
backbone per run; results go to --out/<model> and --out/paper_table.md puts every
backbone run so far beside the paper's ablation numbers (none reported for the
product placement).

    python examples/ablations.py --data-root ~/data --model resnet18_cifar --device cuda
    python examples/ablations.py --data-root ~/data --model vit_base_patch16_224 \\
        --weights ~/weights/ViT-B_16.npz --device cuda
    python examples/ablations.py --data-root ~/data --model swin_tiny_patch4_window7_224 \\
        --pretrained --device cuda

Any option of ``python -m avalanche_maskrkr run`` applies (--benchmark too). --smoke
runs every row in seconds on miniature CIFAR files with a tiny random model.
"""
from __future__ import annotations

import sys

from reproduce_cifar100 import write_miniature_cifar100

from avalanche_maskrkr import paper
from avalanche_maskrkr.config import Variant

PAPER = {
    "mask none": (0.794, 0.843, 0.858),
    "mask rg": (0.780, 0.844, 0.846),
    "mask sfg": (0.794, 0.845, 0.858),
    "mask rg+sfg": (0.781, 0.840, 0.841),
}
"""The paper's ablation (masks on RG / SFG; ResNet-18, ViT, Swin)."""

ABLATIONS = [
    Variant("mask none", "mask-rkr", {"rank": 2, "mask_placement": "none"}),
    Variant("mask rg", "mask-rkr", {"rank": 2, "mask_sfg": False}),
    Variant("mask sfg", "mask-rkr", {"rank": 2, "mask_rg": False}),
    Variant("mask rg+sfg", "mask-rkr", {"rank": 2}),
    Variant("mask on product", "mask-rkr", {"rank": 2, "mask_placement": "product"}),
]


def main(argv: list[str] | None = None) -> None:
    paper.reproduce_paper(argv, __doc__, "Mask-RKR ablations", PAPER, write_miniature_cifar100,
                          variants=lambda config, scenario: ABLATIONS, name="ablations",
                          benchmark="cifar100", model="resnet18_cifar")


if __name__ == "__main__":
    main(sys.argv[1:])
