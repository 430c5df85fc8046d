"""RKR, Piggyback and Mask-RKR against the linear probe on a frozen pretrained backbone.

Each method runs as a plain Avalanche strategy with its default options and
``Adam(model.parameters(), lr=1e-3)`` on split digits (5 tasks of 2 classes, resized to
the backbone's input side, normalised with its mean and std); the linear probe is one
head per task on the frozen base, under the same optimizer, schedule and seeds. Prints
per-task accuracy (mean over seeds) for each schedule.

    # a timm model and a local weights file
    python benchmarks/pretrained.py --model efficientnet_b0 --weights b0.safetensors --img-size 64
    # the offline proxy: the model trained on synthetic shapes first
    python benchmarks/pretrained.py --proxy --model test_efficientnet --img-size 16
"""
from __future__ import annotations

import argparse
import time
import warnings

from backbone_choice import add_backbone_arguments, backbone_factory, describe

from avalanche_maskrkr.benchmarks import split_digits
from avalanche_maskrkr.benchmarks.probe_check import compare_with_probe
from avalanche_maskrkr.benchmarks.transforms import resolve_input_spec
from avalanche_maskrkr.results import format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backbone_arguments(parser)
    parser.add_argument("--epochs", default="2,10,30", help="schedules, comma-separated")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--bn-policy", help="every method's bn_policy (default: each one's)")
    parser.add_argument("--mask-lr", type=float, help="every mask method's mask_lr (default: "
                        "a tenth of 1e-3; 1e-3 gives the single rate of one optimizer group)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="task .* has not been trained")
    with backbone_factory(args) as make_model:
        mean_std = resolve_input_spec(make_model()).mean_std
        options = {k: v for k, v in (("bn_policy", args.bn_policy), ("mask_lr", args.mask_lr))
                   if v is not None}
        print(f"{describe(args)}, digits {args.tasks} tasks, seeds {args.seeds}, "
              "Adam lr 1e-3, batch 32"
              + "".join(f", {k}={v}" for k, v in options.items()))
        for epochs in map(int, args.epochs.split(",")):
            start = time.perf_counter()
            table = compare_with_probe(
                make_model, lambda seed: split_digits(args.tasks, image_size=args.img_size,
                                                      channels=3, seed=seed, mean_std=mean_std),
                epochs, [int(s) for s in args.seeds.split(",")], args.tasks, **options)
            print(f"\n{epochs} epochs ({time.perf_counter() - start:.0f} s):")
            print(format_table(table.round(3).rename_axis("method").reset_index()))


if __name__ == "__main__":
    main()
