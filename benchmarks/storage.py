"""Bytes on disk per task: the file ``export_task`` writes against SPEC section 4's accounting.

For each backbone (random weights, nothing downloaded) and method, one task is added with
``CLASSES`` classes and exported; Mask-RKR is reported for its first task (which holds
the real factors) and for a later task (masks only). "accounted" is what SPEC section 4
says a task costs on disk: its head and task parameters in their dtype, masks bit-packed
(``TaskModule.task_cost(task).nbytes`` summed over the layers, plus the head). "params" is
the paper's convention (a mask bit counts 1/32 of a parameter). "single" is a whole
fine-tuned model (base and head) in float32, for scale. Usage::

    python benchmarks/storage.py --backbones vit-b16,swin-t,resnet18
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from avalanche_maskrkr.accounting import create_backbone
from avalanche_maskrkr.conversion import convert
from avalanche_maskrkr.export import export_task

CLASSES = 10
BACKBONES = {
    "vit-b16": ("vit_base_patch16_224", 224),
    "swin-t": ("swin_tiny_patch4_window7_224", 224),
    "resnet18": ("resnet18_cifar", 32),
    "vit-tiny": ("vit_tiny_patch16_224", 224),
}
CASES = (("rkr", 0), ("piggyback", 0), ("mask-rkr", 0), ("mask-rkr", 1))


def accounted(net, task: int) -> tuple[int, float]:
    """(bytes, paper-convention parameters) of ``task``: its layers' cost and its head."""
    costs = [m.task_cost(task) for m in net.task_modules]
    head = list(net.heads[str(task)].parameters())
    head_bytes = sum(p.numel() * p.element_size() for p in head)
    params = sum(c.real + c.mask / 32 for c in costs) + sum(p.numel() for p in head)
    return sum(c.nbytes for c in costs) + head_bytes, params


def measure(backbone: str, folder: str) -> list[dict]:
    name, img = BACKBONES[backbone]
    torch.manual_seed(0)
    base = create_backbone(name, CLASSES, img_size=img)
    single = sum(p.numel() * p.element_size() for p in base.parameters())
    rows = [{"backbone": backbone, "method": "single", "task": "-", "accounted": single,
             "params": sum(p.numel() for p in base.parameters()), "file": None}]
    for method, task in CASES:
        torch.manual_seed(0)
        net = convert(create_backbone(name, CLASSES, img_size=img), method)
        for t in range(task + 1):
            net.add_task(t, CLASSES)
            net.finish_task(t)
        path = os.path.join(folder, f"{backbone}-{method}-{task}.safetensors")
        size = export_task(net, task, path)
        nbytes, params = accounted(net, task)
        rows.append({"backbone": backbone, "method": method,
                     "task": "later" if task else "first", "accounted": nbytes,
                     "params": params, "file": size})
        os.remove(path)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| backbone | method | task | params (paper) | accounted bytes | file bytes | "
             "file - accounted | file / accounted |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        file = ("- | - | -" if r["file"] is None else
                f"{r['file']:,} | {r['file'] - r['accounted']:,} | "
                f"{r['file'] / r['accounted']:.4f}")
        lines.append(f"| {r['backbone']} | {r['method']} | {r['task']} | "
                     f"{r['params']:,.0f} | {r['accounted']:,} | {file} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="vit-b16,swin-t,resnet18",
                        help=f"comma-separated, from {sorted(BACKBONES)}")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        rows = [r for b in args.backbones.split(",") for r in measure(b, folder)]
    print(f"{CLASSES} classes per task, float32 factors and heads\n")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)


if __name__ == "__main__":
    main()
