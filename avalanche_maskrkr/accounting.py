"""Parameter accounting with the paper's conventions (SPEC section 4).

Totals count, for T tasks: the base network, T heads, and what each task's layers add,
read from the layers that conversion creates (the same objects training uses), with a
binary mask entry counting 1/32 of a parameter. "+x%" is relative to one single-task
model (base + one head). Models are built on the ``meta`` device: shapes without memory
or random initialisation, so no weights are downloaded or allocated.

``bytes_per_task`` is what a user pays on disk: the mean over the T tasks of each task's
head and task parameters in their dtype, masks bit-packed (1 bit per entry); for
``single`` it is a whole model.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import pandas as pd
import torch
from torch import nn

from .baseline_accounting import class_statistics
from .conversion import convert, find_classifier
from .models import create_backbone
from .network import TaskAwareNetwork

ModelSpec = str | Callable[[], nn.Module]


def _factory(model: ModelSpec, classes_per_task: int,
             img_size: int | None) -> Callable[[], nn.Module]:
    if isinstance(model, str):
        def build() -> nn.Module:
            with torch.device("meta"):
                return create_backbone(model, classes_per_task, img_size)
        return build
    return model


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def populated_network(build: Callable[[], nn.Module], method: str, tasks: int,
                      classes_per_task: int, **options) -> TaskAwareNetwork:
    """``build()`` converted for ``method`` with ``tasks`` tasks of ``classes_per_task``."""
    net = convert(build(), method, **options)
    for task in range(tasks):
        net.add_task(task, classes_per_task)
    return net


def method_cost(net: TaskAwareNetwork) -> dict[str, float]:
    """Convention total (parameters) and mean bytes per task of a populated network;
    class-incremental, the prototype router's class means count too."""
    costs = [[m.task_cost(int(t)) for m in net.task_modules] for t in net.heads]
    heads = [list(h.parameters()) for h in net.heads.values()]
    task_params = sum(c.real + c.mask / 32 for task in costs for c in task)
    task_bytes = sum(c.nbytes for task in costs for c in task) + sum(_nbytes(h) for h in heads)
    means = class_statistics(net)
    return {"total_params": _numel(net.base_parameters()) + sum(_numel(h) for h in heads)
            + task_params + means.params,
            "bytes_per_task": (task_bytes + means.nbytes) / len(net.heads)}


def single_model_size(model: ModelSpec, classes_per_task: int,
                      img_size: int | None = None) -> tuple[int, int]:
    """(parameters, bytes) of one single-task model: base + one head (the reference of
    "+x%"). ``model``: a timm name (built on the meta device) or a model factory."""
    params = list(_factory(model, classes_per_task, img_size)().parameters())
    return _numel(params), _nbytes(params)


def find_k_plus(model: ModelSpec, tasks: int, rank: int = 2, classes_per_task: int = 10,
                img_size: int | None = None, **options) -> int:
    """K+: the largest rank at which Mask-RKR's total does not exceed RKR's at ``rank``.

    ``model``: a timm name (built on the meta device) or a callable returning a fresh
    unconverted model.
    """
    build = _factory(model, classes_per_task, img_size)

    def total(method: str, k: int) -> float:
        net = populated_network(build, method, tasks, classes_per_task, rank=k, **options)
        return method_cost(net)["total_params"]

    target = total("rkr", rank)
    low, high = rank, rank  # Mask-RKR(rank) <= RKR(rank) for tasks >= 1
    while total("mask-rkr", high) <= target:
        low, high = high, high * 2
    while high - low > 1:  # invariant: total(low) <= target < total(high)
        mid = (low + high) // 2
        low, high = (mid, high) if total("mask-rkr", mid) <= target else (low, mid)
    return low


def parameter_report(model: ModelSpec = "vit_base_patch16_224", img_size: int | None = 224,
                     tasks: int = 10, classes_per_task: int = 10, rank: int = 2,
                     **options) -> pd.DataFrame:
    """Totals per method for ``tasks`` tasks, with the paper's conventions.

    Columns: ``method, rank, total_params, overhead_pct, bytes_per_task`` (totals rounded
    to whole parameters, overhead to 0.001 %); rows
    ``single``, ``multi-head``, ``rkr``, ``piggyback``, ``mask-rkr``, ``mask-rkr-k+``.
    ``options`` are conversion options shared by the methods (e.g. ``split_qkv``).
    """
    build = _factory(model, classes_per_task, img_size)
    single, single_bytes = single_model_size(build, classes_per_task)
    head = classes_per_task * (build().get_submodule(find_classifier(build())).in_features + 1)
    rows = [("single", None, tasks * single, single_bytes),
            ("multi-head", None, single + (tasks - 1) * head, head * 4)]
    k_plus = find_k_plus(build, tasks, rank, classes_per_task, **options)
    for label, method, k in (("rkr", "rkr", rank), ("piggyback", "piggyback", None),
                             ("mask-rkr", "mask-rkr", rank), ("mask-rkr-k+", "mask-rkr", k_plus)):
        extra = {"rank": k} if k is not None else {}
        net = populated_network(build, method, tasks, classes_per_task, **extra, **options)
        cost = method_cost(net)
        rows.append((label, k, cost["total_params"], cost["bytes_per_task"]))
    frame = pd.DataFrame(rows, columns=["method", "rank", "total_params", "bytes_per_task"])
    frame["rank"] = frame["rank"].astype("Int64")
    frame["overhead_pct"] = (100 * (frame["total_params"] - single) / single).round(3)
    frame["total_params"] = frame["total_params"].round().astype("int64")
    frame["bytes_per_task"] = frame["bytes_per_task"].map(math.ceil)
    return frame[["method", "rank", "total_params", "overhead_pct", "bytes_per_task"]]
