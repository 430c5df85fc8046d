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
import tempfile
import time
import warnings
from pathlib import Path

import timm
import torch

from avalanche_maskrkr.benchmarks import split_digits
from avalanche_maskrkr.benchmarks.probe_check import compare_with_probe
from avalanche_maskrkr.benchmarks.proxy import SHAPES, pretrain_proxy
from avalanche_maskrkr.benchmarks.transforms import resolve_input_spec
from avalanche_maskrkr.checkpoint import load_weights
from avalanche_maskrkr.results import format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="test_efficientnet", help="a timm model name")
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--weights", type=Path, help=".safetensors or .pth weights")
    weights.add_argument("--proxy", action="store_true",
                         help="train the model on synthetic shapes first (offline)")
    parser.add_argument("--img-size", type=int, default=16)
    parser.add_argument("--model-kwargs", default="{}",
                        help="timm.create_model keywords, e.g. \"{'patch_size': 4}\"")
    parser.add_argument("--epochs", default="2,10,30", help="schedules, comma-separated")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--bn-policy", help="every method's bn_policy (default: each one's)")
    parser.add_argument("--mask-lr", type=float, help="every mask method's mask_lr (default: "
                        "a tenth of 1e-3; 1e-3 gives the single rate of one optimizer group)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="task .* has not been trained")
    kwargs = eval(args.model_kwargs, {})  # a literal dict from the command line
    with tempfile.TemporaryDirectory() as tmp:
        path = args.weights
        if args.proxy:
            path = pretrain_proxy(args.model, Path(tmp) / "proxy.safetensors",
                                  image_size=args.img_size, **kwargs)

        def make_model() -> torch.nn.Module:
            model = timm.create_model(args.model, num_classes=len(SHAPES), **kwargs)
            load_weights(model, path)
            return model

        mean_std = resolve_input_spec(make_model()).mean_std
        options = {k: v for k, v in (("bn_policy", args.bn_policy), ("mask_lr", args.mask_lr))
                   if v is not None}
        print(f"{args.model} at {args.img_size}px ({'proxy' if args.proxy else path}), "
              f"digits {args.tasks} tasks, seeds {args.seeds}, Adam lr 1e-3, batch 32"
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
