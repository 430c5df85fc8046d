"""One task in one small file: what SPEC section 4 says a task costs, and nothing more.

``export_task(network, task, path)`` writes a safetensors file holding three flat
tensors: ``bits`` (every binary mask of the task, each bit-packed to ceil(n / 8) bytes),
``real.<dtype>`` (the task's real-valued factors, per-task BatchNorm state and head, in
their training dtype) and, when per-task BatchNorm is on, ``int.int64`` (its batch
counters). No names or shapes are stored per tensor: the loader rebuilds the task's
structure by converting a fresh base model with the stored method options, and checks a
hash of that layout. The file is therefore ``TaskModule.task_cost(task).nbytes`` summed
over the layers, plus the head, plus a header of about a kilobyte.

``load_task(model_or_network, path)`` adds the task to a converted network (or converts
an unconverted base model first) as a finished task; its outputs are bit-for-bit those
of the exporting network, provided the base weights are the same (checked by hash).

Mask-RKR: the real factors (LM, RM, F) belong to the first task a network learned, and
every later task stores only masks over them. The first task's export holds the real
set; a later task's export records which task owns it and a hash of it, and loading it
requires that task to be loaded first (a ``ValueError`` says which).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .conversion import convert
from .layers import BinaryMask, RKRLayer, TaskModule, pack_bits
from .network import TaskAwareNetwork
from .options import make_options

FORMAT = "avalanche-maskrkr-task/1"


def _entries(params: nn.Module, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors a finished task keeps, in a fixed order: real parameters and buffers
    as they are, each mask as packed bits (packed here if the task is still training)."""
    for name, module in params.named_modules(prefix=prefix):
        if isinstance(module, BinaryMask):
            yield f"{name}.bits", module.bits if module.frozen else pack_bits(module.mask())
            continue
        yield from ((f"{name}.{n}", t) for n, t in module.named_parameters(recurse=False))
        yield from ((f"{name}.{n}", t) for n, t in module.named_buffers(recurse=False)
                    if t is not None)


def _owned_modules(network: TaskAwareNetwork) -> list[tuple[str, TaskModule]]:
    names = {id(m): n for n, m in network.backbone.named_modules()}
    return [(names[id(m)], m) for m in network.task_modules]


def task_entries(network: TaskAwareNetwork, task: int) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of ``task`` (task layers in backbone order, then its head)."""
    entries = []
    for name, module in _owned_modules(network):
        if module.has_task(task):
            entries += _entries(module.tasks[str(task)], f"{name}.tasks.{task}")
    return entries + list(_entries(network.heads[str(task)], f"heads.{task}"))


def _digest(tensors: list[torch.Tensor]) -> str:
    sha = hashlib.sha256()
    for t in tensors:
        sha.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return sha.hexdigest()


def _layout_digest(entries: list[tuple[str, torch.Tensor]]) -> str:
    layout = [(name, tuple(t.shape), str(t.dtype)) for name, t in entries]
    return hashlib.sha256(repr(layout).encode()).hexdigest()


def base_digest(network: TaskAwareNetwork) -> str:
    """Hash of everything shared by all tasks: base weights and base buffers."""
    return _digest([t for n, t in network.backbone.state_dict().items()
                    if ".tasks." not in f".{n}" and torch.is_tensor(t)])


def _shared_owner(network: TaskAwareNetwork, task: int) -> str | None:
    """The task whose real factors ``task`` masks (Mask-RKR), if not ``task`` itself."""
    owners = {m.first_task for m in network.task_modules
              if isinstance(m, RKRLayer) and (m.mask_rg or m.mask_sfg) and m.has_task(task)}
    owners.discard(str(task))
    if len(owners) > 1:
        raise ValueError(f"the layers disagree on the task owning the shared factors: {owners}")
    return owners.pop() if owners else None


def _shared_digest(network: TaskAwareNetwork, owner: str) -> str:
    return _digest([t for m in network.task_modules if isinstance(m, RKRLayer)
                    for _, t in _entries(m.tasks[owner], "")])


def _blob_key(name: str, t: torch.Tensor) -> str:
    """Which flat tensor holds an entry: ``bits``, ``real.<dtype>`` or ``int.<dtype>``."""
    if name.endswith(".bits"):
        return "bits"
    return f"{'real' if t.dtype.is_floating_point else 'int'}.{str(t.dtype).split('.')[-1]}"


def _blobs(entries: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The entries concatenated per :func:`_blob_key`, in order."""
    groups: dict[str, list[torch.Tensor]] = {}
    for name, t in entries:
        groups.setdefault(_blob_key(name, t), []).append(t.detach().cpu().reshape(-1))
    return {key: torch.cat(parts) for key, parts in groups.items()}


def export_task(network: TaskAwareNetwork, task: int, path: str | os.PathLike) -> int:
    """Write ``task`` of ``network`` to ``path`` (safetensors); returns the file size.

    A task still training is exported as it computes now (its masks binarised).
    """
    if not isinstance(network, TaskAwareNetwork):
        raise TypeError(f"export_task needs a converted network, got {type(network).__name__}")
    if str(task) not in network.heads or task not in network.adapted_tasks:
        raise ValueError(f"the network has no task {task}; its tasks: {network.adapted_tasks}")
    entries = task_entries(network, task)
    owner = _shared_owner(network, task)
    meta = {"format": FORMAT, "method": network.options.name,
            "options": dataclasses.asdict(network.options), "task": task,
            "n_classes": network.heads[str(task)].out_features,
            "layout": _layout_digest(entries), "base": base_digest(network),
            "shared_task": None if owner is None else int(owner),
            "shared": None if owner is None else _shared_digest(network, owner)}
    save_file(_blobs(entries), os.fspath(path), metadata={"maskrkr": json.dumps(meta)})
    return os.path.getsize(path)


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of an exported task (method, options, task label, classes, hashes)."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        meta = (f.metadata() or {}).get("maskrkr")
    if meta is None or json.loads(meta).get("format") != FORMAT:
        raise ValueError(f"{path} is not a task exported by avalanche_maskrkr.export_task")
    return json.loads(meta)


@torch.no_grad()
def load_task(model_or_network: nn.Module, path: str | os.PathLike,
              check_base: bool = True) -> TaskAwareNetwork:
    """Add the task stored at ``path`` to a network, as a finished task.

    Args:
        model_or_network: a network converted with the stored options, or the
            unconverted base model (converted here, in place, with those options).
        path: a file written by :func:`export_task`.
        check_base: verify that the base weights hash to those of the exporting network
            (different base weights would silently give different outputs).
    Returns the network (the converted one, when a base model was given). The task's
    tensors take the dtype they were exported in.
    """
    meta = read_metadata(path)
    options = make_options(meta["method"], **meta["options"])
    network = model_or_network
    if not isinstance(network, TaskAwareNetwork):
        network = convert(network, options)
    elif network.options != options:
        raise ValueError(f"the task was exported from a network converted with {options}, "
                         f"not {network.options}")
    task = meta["task"]
    if task in network.adapted_tasks:
        raise ValueError(f"the network already has task {task}")
    if check_base and base_digest(network) != meta["base"]:
        raise ValueError("the base weights differ from those of the exporting network: "
                         "load the same base weights (or pass check_base=False)")
    _check_shared(network, meta)
    blobs = load_file(os.fspath(path))
    network.add_task(task, meta["n_classes"])
    network.finish_task(task)
    real = [key for key in blobs if key.startswith("real.")]
    if len(real) == 1:  # the stored dtype, whatever dtype new parameters are created in
        dtype = getattr(torch, real[0].split(".")[1])
        for module in [network.heads[str(task)], *(
                m.tasks[str(task)] for m in network.task_modules if m.has_task(task))]:
            module.to(dtype)
    entries = task_entries(network, task)
    if _layout_digest(entries) != meta["layout"]:
        raise ValueError("the exported task does not fit this network (another backbone or "
                         "other conversion options)")
    offsets = dict.fromkeys(blobs, 0)
    for name, t in entries:
        key = _blob_key(name, t)
        start = offsets[key]
        t.copy_(blobs[key][start:start + t.numel()].view(t.shape))
        offsets[key] = start + t.numel()
    network.max_class_label = max(network.max_class_label, meta["n_classes"])
    network.known_train_tasks_labels.add(task)
    return network


def _check_shared(network: TaskAwareNetwork, meta: dict) -> None:
    """A later Mask-RKR task needs the task owning the real factors, as exported."""
    owner = meta["shared_task"]
    if owner is None:
        return
    first = {m.first_task if m.tasks else None for m in network.task_modules
             if isinstance(m, RKRLayer)}
    if first != {str(owner)}:
        has = "no task yet" if first == {None} else f"first task {sorted(map(str, first))}"
        raise ValueError(
            f"task {meta['task']} learned masks over the real factors of task {owner}: "
            f"load task {owner}'s export first (the network has {has})")
    if _shared_digest(network, str(owner)) != meta["shared"]:
        raise ValueError(f"the network's task {owner} is not the one task {meta['task']} "
                         "was trained over (its real factors differ)")
