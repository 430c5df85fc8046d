"""Host cost of each method: the tensor ops a step issues and its time at tiny sizes.

On a GPU every tensor op that is not a view is a kernel launch, and a step whose
kernels are short is bound by the host issuing them: the Python of each adapted layer
and the launch of each of its ops. Both are measured here, on the CPU, at batch 1 and a
small input, for every method against fine-tuning ("ft": the same backbone, every
parameter trained) and, in evaluation, against the plain network:

* ops: aten ops of one training step (forward, loss and backward; the optimizer step
  excluded) and of one evaluation forward, counted with a ``TorchDispatchMode``. Views
  and allocations, which launch no kernel, are not counted. The counts are the same on
  every machine; "extra per layer" is (method - ft) / adapted layers.
* host ms: median time of a training step (optimizer step included, Adam with
  ``foreach=True`` as on CUDA) and of an evaluation forward, the configurations
  alternating as in ``speed.py``. At these sizes the time is mostly host time, but it
  still includes each op's arithmetic and one read of the weights.

Usage::

    python benchmarks/host.py --threads 1 --backbones vit-tiny,vit-b16,resnet18
"""
from __future__ import annotations

import argparse
import datetime
import statistics
from collections import Counter

import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from avalanche_maskrkr.layers import TaskAdaptedLayer
from speed import (BACKBONES, FLOOR, METHODS, Setup, alternate, build_setup,  # benchmarks/
                   describe_machine, eval_step, make_inputs, train_step)

SMALL_INPUT = {"vit-tiny": 32, "vit-b16": 32, "swin-t": 224, "resnet18": 32}  # Swin-T: its windows
NO_KERNEL = {"aten._unsafe_view.default", "aten.empty.memory_format",
             "aten.empty_strided.default", "aten.new_empty_strided.default",
             "aten.new_empty.default", "aten.empty_like.default",
             "aten.promote_types.default", "aten.lift_fresh.default"}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run inside the block that launch a kernel (views excluded)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and str(func) not in NO_KERNEL:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def count_train_ops(setup: Setup, x: torch.Tensor, y: torch.Tensor) -> int:
    setup.optimizer.zero_grad(set_to_none=True)
    with OpCounter() as counter:
        F.cross_entropy(setup.forward(x), y).backward()
    return counter.total


@torch.no_grad()
def count_eval_ops(setup: Setup, x: torch.Tensor) -> int:
    with OpCounter() as counter:
        setup.forward(x)
    return counter.total


def adapted_layers(setup: Setup) -> int:
    return sum(isinstance(m, TaskAdaptedLayer) for m in setup.model.modules())


def measure(args: argparse.Namespace, backbone: str) -> list[dict]:
    device = torch.device("cpu")
    inputs = argparse.Namespace(**vars(args))
    inputs.img_size = args.img_size or SMALL_INPUT[backbone]
    base, x, y = make_inputs(inputs, backbone, device)
    names = ["ft", FLOOR, *args.methods]
    setups = {n: build_setup(base, n, device, len(x), False, foreach=True) for n in names}
    for setup in setups.values():
        train_step(setup, x, y, "fp32")  # optimizer state, work buffers
    ops = {n: count_train_ops(s, x, y) for n, s in setups.items()}
    train = alternate({n: (lambda s=s: train_step(s, x, y, "fp32")) for n, s in setups.items()},
                      args.repeats, 3, device)
    for setup in setups.values():
        if setup.task is not None:
            setup.model.finish_task(setup.task)
        setup.model.eval()
        eval_step(setup, x, "fp32")  # fold once
    eval_ops = {n: count_eval_ops(s, x) for n, s in setups.items()}
    evaluate = alternate({n: (lambda s=s: eval_step(s, x, "fp32")) for n, s in setups.items()},
                         args.repeats, 3, device)
    rows = []
    for n, setup in setups.items():
        layers = adapted_layers(setup) or None
        rows.append({
            "backbone": backbone, "img": x.shape[-1], "method": n, "layers": layers,
            "train_ops": ops[n],
            "train_extra": (ops[n] - ops["ft"]) / layers if layers else None,
            "train_ms": 1e3 * statistics.median(train[n]),
            "eval_ops": eval_ops[n],
            "eval_extra": (eval_ops[n] - eval_ops["ft"]) / layers if layers else None,
            "eval_ms": 1e3 * statistics.median(evaluate[n])})
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| backbone | img | method | adapted layers | train ops | extra per layer | "
            "train host ms | eval ops | extra per layer | eval host ms |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        extra = [f"{r[k]:+.1f}" if r[k] is not None else "-"
                 for k in ("train_extra", "eval_extra")]
        lines.append(
            f"| {r['backbone']} | {r['img']} | {r['method']} | {r['layers'] or '-'} | "
            f"{r['train_ops']} | {extra[0]} | {r['train_ms']:.2f} | {r['eval_ops']} | "
            f"{extra[1]} | {r['eval_ms']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="vit-tiny",
                        help=f"comma-separated, from {sorted(BACKBONES)}")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--img-size", type=int, default=None,
                        help="input size (default: 32, 4 patches for the ViTs; Swin-T 224)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.batch, args.device, args.channels_last = 1, "cpu", False  # what make_inputs reads
    torch.set_num_threads(args.threads)
    rows = [row for name in args.backbones.split(",") for row in measure(args, name)]
    print(f"{datetime.date.today()}, {describe_machine(torch.device('cpu'))}, batch 1, "
          f"{args.repeats} repeats\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
