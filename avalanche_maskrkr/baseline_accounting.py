"""What each baseline stores, counted with the methods' conventions (SPEC section 4).

A baseline's total after T tasks is its model's parameters plus the state its plugin
keeps from one task to the next, read from the plugin's own tensors; a bit counts 1/32
of a parameter. Bytes are those tensors' bytes in their dtype, bits packed.

* ``naive``, ``multi-head``: base + T heads; ``single``: T whole models. No other state.
* class-incremental classifiers (SimpleCIL, RanPAC, APER): the model's parameters and
  the class statistics they keep between experiences (:func:`class_statistics`: class
  means; RanPAC's projection, Gram and target matrices and ridge solution).
* ``ewc`` (Avalanche's "separate" mode): for each trained task, an importance and a
  reference value of every parameter the model had then.
* ``si``: two values per regularised parameter, its reference weight and its running
  path integral (from which Avalanche derives the importance, clamped). SI's per-step
  scratch copies (weights before and after a step, gradient, this task's path) are
  rebuilt every task and not counted.
* ``lwf``: the previous model, a whole copy of the network (base + heads).
* ``replay``: each buffered sample's input values, counted like parameters (the float
  tensor the model reads); its class and task labels are left out. ``der`` (a strategy
  keeping its own buffer): each buffered sample's input values and its stored logits;
  ``icarl``: its exemplars' input values and its class means (Avalanche keeps one
  embedding for every class of the stream from the first experience on, zero until the
  class is seen).
* ``packnet``: one network, plus which task owns each prunable weight: after T tasks a
  weight belongs to one of the T tasks or is still free, so ``ceil(log2(T + 1))`` bits
  per weight (``owner_bits``). Ownership is nested (task t sees the weights of tasks
  <= t), so an index per weight is enough; a bit mask per task, as Piggyback needs for
  its independent masks, would cost T bits. Avalanche keeps the index in a byte.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.packnet import PackNetModel, WeightAndBiasPackNetModule
from avalanche.training import DER
from avalanche.training.supervised.icarl import _ICaRLPlugin
from avalanche.training.plugins import (
    EWCPlugin,
    LwFPlugin,
    ReplayPlugin,
    SynapticIntelligencePlugin,
)
from torch import nn

from .routing import GrowingBuffers


@dataclass(frozen=True)
class Storage:
    """``params``: stored values by SPEC's convention (a bit is 1/32); ``nbytes``: their
    bytes."""

    params: float = 0.0
    nbytes: float = 0.0

    def __add__(self, other: Storage) -> Storage:
        return Storage(self.params + other.params, self.nbytes + other.nbytes)


def tensor_storage(tensors: Iterable[torch.Tensor]) -> Storage:
    """Every value of ``tensors``, in their dtype."""
    return sum((Storage(t.numel(), t.numel() * t.element_size()) for t in tensors),
               Storage())


def owner_bits(tasks: int) -> int:
    """Bits per weight that tell which of ``tasks`` tasks owns it, or that it is free."""
    return math.ceil(math.log2(tasks + 1))


def class_statistics(model: nn.Module) -> Storage:
    """The floating-point buffers of ``model``'s :class:`~.routing.GrowingBuffers`
    modules: what class-incremental classifiers and the prototype router keep between
    experiences (class means, RanPAC's projection and statistics)."""
    return tensor_storage(buffer for module in model.modules()
                          if isinstance(module, GrowingBuffers)
                          for buffer in module.buffers(recurse=False)
                          if buffer.is_floating_point())


def model_storage(model: nn.Module) -> Storage:
    """The model's parameters and :func:`class_statistics`; a PackNet model adds each
    prunable weight's owner."""
    storage = tensor_storage(model.parameters()) + class_statistics(model)
    if isinstance(model, PackNetModel):
        weights = sum(m.task_index.numel() for m in model.modules()
                      if isinstance(m, WeightAndBiasPackNetModule))
        bits = weights * owner_bits(model.task_count)
        storage += Storage(bits / 32, bits / 8)
    return storage


def _ewc_state(plugin: EWCPlugin) -> Storage:
    tables = [*plugin.saved_params.values(), *plugin.importances.values()]
    return tensor_storage(value.data for table in tables for value in table.values())


def _si_state(plugin: SynapticIntelligencePlugin) -> Storage:
    tables = [plugin.ewc_data[0], plugin.syn_data["cum_trajectory"]]
    return tensor_storage(value.data for table in tables for value in table.values())


def _lwf_state(plugin: LwFPlugin) -> Storage:
    previous = plugin.lwf.prev_model
    return Storage() if previous is None else tensor_storage(previous.parameters())


def _replay_state(plugin: ReplayPlugin) -> Storage:
    buffer = plugin.storage_policy.buffer
    if len(buffer) == 0:
        return Storage()
    sample = buffer[0][0]
    return Storage(len(buffer) * sample.numel(),
                   len(buffer) * sample.numel() * sample.element_size())


def _der_state(strategy: DER) -> Storage:
    return sum((tensor_storage([x, logits]) for x, _, _, logits in
                strategy.storage_policy.buffer), Storage())


def _icarl_state(plugin: _ICaRLPlugin) -> Storage:
    return tensor_storage([*plugin.x_memory, *plugin.class_means.values()])


PLUGIN_STATE: dict[type, Callable[[SupervisedPlugin], Storage]] = {
    EWCPlugin: _ewc_state,
    SynapticIntelligencePlugin: _si_state,
    LwFPlugin: _lwf_state,
    ReplayPlugin: _replay_state,
    DER: _der_state,
    _ICaRLPlugin: _icarl_state,
}
"""Plugin class (subclasses included; or a strategy class that keeps state itself, as
DER) -> what it keeps between tasks."""


def plugin_storage(plugin: SupervisedPlugin) -> Storage:
    """What ``plugin`` keeps from one task to the next (nothing for other plugins)."""
    for cls, state in PLUGIN_STATE.items():
        if isinstance(plugin, cls):
            return state(plugin)
    return Storage()


def baseline_cost(model: nn.Module, plugins: Iterable[SupervisedPlugin]) -> dict[str, float]:
    """``{"total_params", "bytes_per_task"}`` of a baseline: its model and its plugins'
    state (pass the strategy among ``plugins`` when it keeps state itself, as DER);
    bytes per task divide the whole by the tasks trained (``known_train_tasks_labels``
    of a ``MultiTaskModule``, else 1)."""
    storage = sum((plugin_storage(p) for p in plugins), model_storage(model))
    tasks = len(getattr(model, "known_train_tasks_labels", ())) or 1
    return {"total_params": storage.params, "bytes_per_task": storage.nbytes / tasks}
