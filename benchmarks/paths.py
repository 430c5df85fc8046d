"""Fold against activation path of single RKR layers: where the auto rule's crossover lies.

For each layer shape and number of positions P (tokens, or N * H_out * W_out for a
convolution), one training step of the layer (forward, backward with a fixed output
gradient) is timed with ``layer.path`` forced to "fold" and to "activations", in
alternating order; the table gives the median time of each, their ratio, and the path
the "auto" rule of :meth:`RKRLayer.training_path` picks. Usage::

    python benchmarks/paths.py --threads 1
"""
from __future__ import annotations

import argparse
import functools
import statistics

import torch
from torch import nn

from avalanche_maskrkr.layers import RKRLayer, TaskContext
from speed import alternate  # benchmarks/speed.py: the same alternating timing

LINEAR = [(768, 2304, 3), (768, 768, 1), (768, 3072, 1), (3072, 768, 1), (384, 1536, 1),
          (1536, 384, 1), (96, 384, 1)]  # (in, out, n_split): ViT-B/16 and Swin-T layers
POSITIONS = [64, 128, 256, 384, 512, 1024]
CONV = [(256, 8, 32), (256, 8, 16), (256, 8, 8), (512, 4, 32), (128, 16, 4), (128, 16, 2)]
# (channels, feature map side, batch): ResNet-18 3x3 convolutions on CIFAR-sized inputs


def step_seconds(layer: RKRLayer, x: torch.Tensor, g: torch.Tensor, repeats: int) -> dict:
    """Median seconds of a training step of ``layer`` on each forced path, and the path
    the auto rule picks."""
    def step(path: str) -> None:
        layer.path = path
        layer.forward_train(x, 0).backward(g)

    times = alternate({p: functools.partial(step, p) for p in ("fold", "activations")},
                      repeats, warmup=2, device=x.device)
    layer.path = "auto"
    return {p: statistics.median(t) for p, t in times.items()} | {
        "auto": layer.training_path(x, 0)}


def cases():
    """(description, P, layer, input, output gradient) for every shape and P."""
    for n_in, out, split in LINEAR:
        layer = RKRLayer(nn.Linear(n_in, out).requires_grad_(False), TaskContext(),
                         n_split=split)
        layer.add_task(0)
        for p in POSITIONS:
            x = torch.randn(p, n_in, requires_grad=True)
            yield f"Linear {n_in}->{out}", p, layer, x, torch.randn(p, out)
    for channels, side, batch in CONV:
        base = nn.Conv2d(channels, channels, 3, padding=1, bias=False).requires_grad_(False)
        layer = RKRLayer(base, TaskContext())
        layer.add_task(0)
        x = torch.randn(batch, channels, side, side, requires_grad=True)
        yield (f"Conv2d {channels}, 3x3, {side}x{side}", batch * side * side, layer, x,
               torch.randn(batch, channels, side, side))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.repeats} repeats\n")
    print("| layer | P | fold ms | activations ms | fold / activations | auto picks |")
    print("|---|---|---|---|---|---|")
    for name, p, layer, x, g in cases():
        t = step_seconds(layer, x, g, args.repeats)
        print(f"| {name} | {p} | {1e3 * t['fold']:.2f} | {1e3 * t['activations']:.2f} | "
              f"{t['fold'] / t['activations']:.2f} | {t['auto']} |")


if __name__ == "__main__":
    main()
