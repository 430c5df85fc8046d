"""Train-step time, eval time and peak training memory of each method against fine-tuning.

For each backbone, every method and plain full fine-tuning ("ft": the same timm model,
all parameters trainable, the same optimizer and batch) are built side by side from the
same random weights and measured in one run:

* train: one optimizer step (zero_grad, forward, cross-entropy, backward, Adam step) on
  a fixed synthetic batch. Methods train task 0, except Mask-RKR, which trains the masks
  of task 1 over the real factors of a finished task 0 (its first task trains exactly
  like RKR). Methods are called as Avalanche calls a ``MultiTaskModule``:
  ``net(x, task_labels)``.
* eval: one forward pass without gradients of a finished task (folded weights) against
  the plain network. The benchmark checks that the fold cache is reused across passes.
  In evaluation "ft", the control and the floor are three copies of the plain network,
  each with its own copy of the weights; a copy's place in memory can make it faster or
  slower for a whole run, so the table gives each configuration's time both against
  "ft" ("eval vs plain") and against the median of the three copies in each repeat
  ("eval vs plain copies").
* control: a second fine-tuning setup, timed like the others; how far its ratios are
  from 1 shows the timing noise of the run.
* floor: the frozen backbone trained at its classifier only, with the gradient carried
  back to the input through every layer: the time below which no method that trains
  parameters in every layer can go (the base's forward and its input-gradient backward).
* memory: peak training memory, measured in a fresh process per configuration over two
  training steps (the first allocates gradients and optimizer state). CUDA:
  ``torch.cuda.max_memory_allocated`` above the allocation after building the model.
  CPU: the peak resident set size (``VmHWM`` in ``/proc/self/status``, reset through
  ``/proc/self/clear_refs`` after ``malloc_trim``) above the resident size after building
  the model, so it counts every allocation torch makes, including its CPU caches; and
  the peak heap in use above the built model (:class:`avalanche_maskrkr.heap.HeapPeak`,
  sampled after every op), which does not depend on what the allocator returns to the
  system and so is the same from run to run ("heap MiB", "heap vs ft"; complete with
  ``--threads 1``, see :mod:`avalanche_maskrkr.heap`).

Timings alternate the configurations within each repeat, rotating their order; a
ratio is computed within each repeat against the reference measured in that repeat,
and the table reports medians over repeats. Usage::

    python benchmarks/speed.py --backbones vit-tiny,resnet18 --repeats 9
    python benchmarks/speed.py --backbones vit-b16,swin-t,resnet18 --device cuda --precision bf16
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from avalanche_maskrkr.acceleration import autocast, to_channels_last
from avalanche_maskrkr.accounting import create_backbone
from avalanche_maskrkr.conversion import convert
from avalanche_maskrkr.heap import HeapPeak, heap_peak_available
from avalanche_maskrkr.layers import TaskAdaptedLayer

METHODS = ("rkr", "piggyback", "mask-rkr")
CONTROL = "ft-copy"  # a second fine-tuning setup: its ratios show the timing noise
FLOOR = "floor"  # frozen backbone, head trained, gradient carried back to the input
PLAIN_COPIES = ("ft", CONTROL, FLOOR)  # in evaluation, each runs the plain network
CLASSES = 10


@dataclass(frozen=True)
class Backbone:
    """A timm model at an input size, with default batch sizes per device."""

    timm_name: str
    img_size: int
    cpu_batch: int
    cuda_batch: int


BACKBONES = {
    "vit-tiny": Backbone("vit_tiny_patch16_224", 224, 8, 64),
    "vit-b16": Backbone("vit_base_patch16_224", 224, 4, 32),
    "swin-t": Backbone("swin_tiny_patch4_window7_224", 224, 4, 32),
    "resnet18": Backbone("resnet18_cifar", 32, 32, 128),
}


@dataclass
class Setup:
    """One configuration: its model, how to call it, and what its optimizer updates."""

    model: nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    task: int | None = None  # the task a method's network trains (None: fine-tuning)


def build_setup(base: nn.Module, method: str, device: torch.device, batch: int,
                channels_last: bool, compile: bool = False,
                foreach: bool | None = None) -> Setup:
    """``method`` ("ft", CONTROL, FLOOR or one of METHODS) over a copy of ``base``, ready
    to train with Adam (``foreach`` as torch.optim.Adam takes it: None picks the
    multi-tensor implementation on CUDA only); with ``compile``, its inner network (the
    timm model, or a method network's backbone) is compiled with ``torch.compile``'s
    default backend."""
    model, task = copy.deepcopy(base), None
    if method in ("ft", CONTROL):
        model.requires_grad_(True)
        params, forward = list(model.parameters()), model
    elif method == FLOOR:
        model.requires_grad_(False)
        params = list(model.get_classifier().requires_grad_(True).parameters())

        def forward(x: torch.Tensor, net=model) -> torch.Tensor:
            return net(x.detach().requires_grad_(True))
    else:
        model = convert(model, method)
        model.add_task(0, CLASSES)
        task = 0
        if method == "mask-rkr":
            model.finish_task(0)
            model.add_task(1, CLASSES)
            task = 1
        params = model.trainable_parameters([task])
        model.max_class_label = CLASSES  # what Avalanche's adaptation would set
        labels = torch.full((batch,), task, device=device)

        def forward(x: torch.Tensor, net=model, labels=labels) -> torch.Tensor:
            return net(x, labels)
    model.to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        getattr(model, "backbone", model).compile()
    return Setup(model, forward, torch.optim.Adam(params, lr=1e-4, foreach=foreach), task)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(setup: Setup, x: torch.Tensor, y: torch.Tensor, precision: str) -> None:
    setup.optimizer.zero_grad(set_to_none=True)
    with autocast(x.device, precision):
        loss = F.cross_entropy(setup.forward(x), y)
    loss.backward()
    setup.optimizer.step()


@torch.no_grad()
def eval_step(setup: Setup, x: torch.Tensor, precision: str) -> None:
    with autocast(x.device, precision):
        setup.forward(x)


def alternate(steps: dict[str, Callable[[], None]], repeats: int, warmup: int,
              device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each step, timed in rotating order within each repeat."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            _sync(device)
            start = time.perf_counter()
            steps[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def ratios(times: dict[str, list[float]], *references: str) -> dict[str, float]:
    """Median over repeats of each configuration's time over the reference's time in the
    same repeat; with several references, over the median of their times in it."""
    per_repeat = [statistics.median(r) for r in zip(*(times[n] for n in references))]
    return {name: statistics.median(t / ref for t, ref in zip(ts, per_repeat))
            for name, ts in times.items()}


def fold_snapshot(net: nn.Module) -> list[int]:
    """Identity of every cached folded weight of ``net`` (empty for a plain model)."""
    return [id(m._fold_cache[3][0]) for m in net.modules()
            if isinstance(m, TaskAdaptedLayer) and m._fold_cache is not None]


# -- memory, one fresh process per configuration -----------------------------------------
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_cpu_peak() -> int:
    """Return freed heap to the system and restart the peak RSS count; RSS in bytes."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return _rss_kib("VmRSS") * 1024


def measure_peak_memory(args: argparse.Namespace, backbone: str,
                        method: str) -> tuple[int, int | None]:
    """Peak bytes of two training steps above the built model (run in a fresh process):
    (CUDA allocation or CPU resident set, CPU heap in use or None)."""
    device, batch = torch.device(args.device), batch_size(args, backbone)
    base, x, y = make_inputs(args, backbone, device)
    setup = build_setup(base, method, device, batch, args.channels_last, args.compile)
    del base
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = _reset_cpu_peak()
    heap = HeapPeak() if device.type == "cpu" and heap_peak_available() else nullcontext()
    with heap:
        for _ in range(2):
            train_step(setup, x, y, args.precision)
    heap_peak = heap.peak if isinstance(heap, HeapPeak) else None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, heap_peak
    return _rss_kib("VmHWM") * 1024 - before, heap_peak


def peak_memory_in_subprocess(args: argparse.Namespace, backbone: str,
                              method: str) -> tuple[int, int | None]:
    command = [sys.executable, __file__, "--memory-probe", f"{backbone}:{method}",
               "--device", args.device, "--precision", args.precision,
               "--threads", str(args.threads)]
    if args.batch:
        command += ["--batch", str(args.batch)]
    if args.img_size:
        command += ["--img-size", str(args.img_size)]
    if args.channels_last:
        command.append("--channels-last")
    if args.compile:
        command.append("--compile")
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    peak, heap = out.strip().splitlines()[-1].split()
    return int(peak), None if heap == "None" else int(heap)


# -- the run ---------------------------------------------------------------------------------
def batch_size(args: argparse.Namespace, backbone: str) -> int:
    spec = BACKBONES[backbone]
    return args.batch or (spec.cuda_batch if args.device.startswith("cuda") else spec.cpu_batch)


def make_inputs(args: argparse.Namespace, backbone: str, device: torch.device):
    """(base model, batch of images, labels), the same for every configuration."""
    spec = BACKBONES[backbone]
    img = args.img_size or spec.img_size
    torch.manual_seed(0)
    base = create_backbone(spec.timm_name, CLASSES, img_size=img)
    batch = batch_size(args, backbone)
    x = torch.randn(batch, 3, img, img, device=device)
    if args.channels_last:
        x = to_channels_last(x)
    return base, x, torch.randint(0, CLASSES, (batch,), device=device)


def benchmark(args: argparse.Namespace, backbone: str) -> list[dict]:
    device = torch.device(args.device)
    base, x, y = make_inputs(args, backbone, device)
    names = [*PLAIN_COPIES, *args.methods]
    setups = {n: build_setup(base, n, device, len(x), args.channels_last, args.compile)
              for n in names}
    train = alternate({n: (lambda s=s: train_step(s, x, y, args.precision))
                       for n, s in setups.items()}, args.repeats, args.warmup, device)
    for setup in setups.values():
        if setup.task is not None:
            setup.model.finish_task(setup.task)  # evaluation of a finished task
        setup.model.eval()
    evals = {n: (lambda s=s: eval_step(s, x, args.precision)) for n, s in setups.items()}
    for step in evals.values():
        step()  # fold once
    folds = {n: fold_snapshot(s.model) for n, s in setups.items()}
    evaluate = alternate(evals, args.eval_repeats, args.warmup, device)
    memory = ({n: peak_memory_in_subprocess(args, backbone, n) for n in names
               if n not in (CONTROL, FLOOR)}
              if args.memory else {})
    train_ratio, eval_ratio = ratios(train, "ft"), ratios(evaluate, "ft")
    eval_pooled = ratios(evaluate, *PLAIN_COPIES)
    rows = []
    for n in names:
        t_train, t_eval = statistics.median(train[n]), statistics.median(evaluate[n])
        peak, heap = memory.get(n, (None, None))
        rows.append({
            "backbone": backbone, "img": x.shape[-1], "batch": len(x), "method": n,
            "train_ms": 1e3 * t_train, "train_ratio": train_ratio[n],
            "train_img_s": len(x) / t_train,
            "eval_ms": 1e3 * t_eval, "eval_ratio": eval_ratio[n],
            "eval_ratio_plain_copies": eval_pooled[n], "eval_img_s": len(x) / t_eval,
            "fold_cache_reused": fold_snapshot(setups[n].model) == folds[n],
            "peak_mib": peak / 2 ** 20 if peak is not None else None,
            "memory_ratio": peak / memory["ft"][0] if peak is not None else None,
            "heap_mib": heap / 2 ** 20 if heap is not None else None,
            "heap_ratio": heap / memory["ft"][1] if heap is not None else None})
    return rows


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} "
            f"torch threads (torch {torch.__version__})")


def markdown(rows: list[dict]) -> str:
    head = ("| backbone | img | batch | method | train ms | train vs ft | train img/s | "
            "eval ms | eval vs plain | eval vs plain copies | eval img/s | fold cache reused | "
            "peak MiB | memory vs ft | heap MiB | heap vs ft |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        memory = (f"{r['peak_mib']:.0f} | {r['memory_ratio']:.2f}x"
                  if r["peak_mib"] is not None else "- | -")
        memory += (f" | {r['heap_mib']:.0f} | {r['heap_ratio']:.3f}x"
                   if r["heap_mib"] is not None else " | - | -")
        lines.append(
            f"| {r['backbone']} | {r['img']} | {r['batch']} | {r['method']} | "
            f"{r['train_ms']:.1f} | {r['train_ratio']:.2f}x | {r['train_img_s']:.1f} | "
            f"{r['eval_ms']:.1f} | {r['eval_ratio']:.3f}x | "
            f"{r['eval_ratio_plain_copies']:.3f}x | {r['eval_img_s']:.1f} | "
            f"{'yes' if r['fold_cache_reused'] else 'NO'} | {memory} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="vit-tiny",
                        help=f"comma-separated, from {sorted(BACKBONES)}")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None,
                        help="default: per backbone and device (see BACKBONES)")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--eval-repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every configuration's inner network (the "
                        "warm-up steps include compilation)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the peak-memory subprocesses")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.compile:  # one entry per model and mode: more than Dynamo's default limit of 8
        config = torch._dynamo.config
        config.recompile_limit = config.accumulated_recompile_limit = 256
    if args.memory_probe:
        backbone, method = args.memory_probe.split(":")
        print(*measure_peak_memory(args, backbone, method))
        return
    device = torch.device(args.device)
    load = os.getloadavg()[0]
    rows = [row for name in args.backbones.split(",") for row in benchmark(args, name)]
    print(f"{datetime.date.today()}, {describe_machine(device)}, precision {args.precision}"
          f"{', channels-last' if args.channels_last else ''}"
          f"{', compiled' if args.compile else ''}, {args.repeats} train / "
          f"{args.eval_repeats} eval repeats; 1-min load average {load:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after\n")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)


if __name__ == "__main__":
    main()
