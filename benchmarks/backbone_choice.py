"""The frozen pretrained backbone of a benchmark script, chosen on its command line: a timm
model with a local weights file, or the offline proxy (the model trained on synthetic
shapes first, :mod:`avalanche_maskrkr.benchmarks.proxy`)."""
from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import timm
import torch
from torch import nn

from avalanche_maskrkr.benchmarks.proxy import SHAPES, pretrain_proxy
from avalanche_maskrkr.checkpoint import load_weights


def add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--weights`` or ``--proxy``, ``--img-size``, ``--model-kwargs`` and
    ``--threads``."""
    parser.add_argument("--model", default="test_efficientnet", help="a timm model name")
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--weights", type=Path, help=".safetensors or .pth weights")
    weights.add_argument("--proxy", action="store_true",
                         help="train the model on synthetic shapes first (offline)")
    parser.add_argument("--img-size", type=int, default=16)
    parser.add_argument("--model-kwargs", default="{}",
                        help="timm.create_model keywords, e.g. \"{'patch_size': 4}\"")
    parser.add_argument("--threads", type=int, default=1)


@contextmanager
def backbone_factory(args: argparse.Namespace) -> Iterator[Callable[[], nn.Module]]:
    """A function returning a fresh copy of the chosen backbone, its weights loaded (the
    proxy's are trained on entering the block and kept in a temporary folder until its
    end); sets torch's thread count."""
    torch.set_num_threads(args.threads)
    kwargs = eval(args.model_kwargs, {})  # a literal dict from the command line
    with tempfile.TemporaryDirectory() as tmp:
        path = args.weights
        if args.proxy:
            path = pretrain_proxy(args.model, Path(tmp) / "proxy.safetensors",
                                  image_size=args.img_size, **kwargs)

        def make_model() -> nn.Module:
            model = timm.create_model(args.model, num_classes=len(SHAPES), **kwargs)
            load_weights(model, path)
            return model

        yield make_model


def describe(args: argparse.Namespace) -> str:
    """E.g. ``test_efficientnet at 16px (proxy)``."""
    return f"{args.model} at {args.img_size}px ({'proxy' if args.proxy else args.weights})"
