"""Model files: pretrained weights into a backbone, and the runner's resumable checkpoints.

Avalanche's own checkpointing pickles the whole strategy with dill, which fails here
(SPEC section 7). A run checkpoint is instead a ``torch.save`` of plain data, readable
with ``torch.load(weights_only=True)``::

    {"format": 1, "config": {...}, "next_experience": k,
     "model": state_dict, "clock": {counter: int}, "plugins": {class name: state},
     "metrics": {name: (x_steps, values)}, "rng": {...}}

``model`` carries the task structure (extra state), so loading it into a freshly built
strategy restores every task. ``plugins`` holds what the stateful Avalanche plugins
carry from one experience to the next (:data:`PLUGIN_STATE`): EWC's importances and
saved parameters, SI's, LwF's previous model. ``metrics`` is the evaluator's history,
from which the results are computed. Strategies with a plugin whose state is unknown
here (Replay's buffer, PackNet's pruning state) cannot resume mid-stream:
:func:`can_resume` tells.
"""
from __future__ import annotations

import copy
import os
import random
import sys
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from avalanche.training.plugins import (
    EvaluationPlugin,
    EWCPlugin,
    LwFPlugin,
    SynapticIntelligencePlugin,
)
from avalanche.training.plugins.clock import Clock
from avalanche.training import DER
from avalanche.training.templates import SupervisedTemplate
from avalanche.training.templates.base_sgd import PeriodicEval
from avalanche.training.utils import ParamData
from torch import nn

from .baselines import FreshOptimizerState, StepDecay, SynapticIntelligence
from .cil.plugins import FeatureStatisticsPlugin
from .conversion import find_classifier
from .plugins import MethodPlugin

FORMAT = 1
RESTART_HINT = "pass --restart to start over (the file is replaced) or remove it"

PLUGIN_STATE: dict[type, tuple[str, ...]] = {
    EWCPlugin: ("saved_params", "importances"),
    SynapticIntelligencePlugin: ("ewc_data", "syn_data"),
    SynapticIntelligence: ("ewc_data", "syn_data"),
    LwFPlugin: ("lwf.prev_model", "lwf.expcount", "lwf.prev_classes_by_task"),
}
"""Plugin class -> attributes (dotted) that carry state between experiences."""

STATELESS_PLUGINS = (MethodPlugin, FeatureStatisticsPlugin, FreshOptimizerState, StepDecay,
                     EvaluationPlugin, Clock, PeriodicEval)
"""Plugins whose state between experiences is in the model, the clock or the metric
history (or that reset each experience)."""

STATEFUL_STRATEGIES = (DER,)
"""Strategies that keep state of their own between experiences (DER's buffer), which a
checkpoint does not hold."""

_PARAM_DATA, _MODULE = "__ParamData__", "__module_state__"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, or written by another configuration."""


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the model."""


# -- pretrained weights --------------------------------------------------------------------
def load_weights(model: nn.Module, path: str | os.PathLike, head_name: str | None = None) -> None:
    """Load a local checkpoint into ``model``, its classifier excepted (heads are per task).

    ``.safetensors`` and ``.pth``/``.pt``/``.bin`` state dicts (also nested under
    ``state_dict``/``model``) pass through the model's timm ``checkpoint_filter_fn``
    when it has one (which e.g. resamples ViT position embeddings to the model's image
    size); ``.npz`` is timm's original ViT (JAX) format, read by the model's own
    ``load_pretrained``. Integer buffers that the file leaves out (BatchNorm's
    ``num_batches_tracked``, as many exported timm files do) keep the model's values.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        WeightsError: the file does not fit the model (missing or unexpected keys, or
            shapes that differ, all named), or the model cannot read ``.npz``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix.lower() == ".npz":
        if not hasattr(model, "load_pretrained"):
            raise WeightsError(f"{path.name}: .npz is timm's original ViT (JAX) format, which "
                               f"{type(model).__name__} cannot read; pass .safetensors or .pth")
        try:
            timm.models.load_checkpoint(model, str(path))
        except (KeyError, RuntimeError, ValueError) as err:
            raise WeightsError(f"{path.name} does not fit {type(model).__name__}: {err}") from err
        return
    try:
        state = timm.models.load_state_dict(str(path), weights_only=True)
    except Exception as err:  # torch and safetensors raise many types for unreadable files
        raise WeightsError(f"cannot read {path.name} as a state dict ({type(err).__name__}: "
                           f"{str(err).splitlines()[0][:200]})") from err
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    head = find_classifier(model, head_name) + "."
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    # Integer buffers (BatchNorm's num_batches_tracked, index tables) hold no learned
    # state: many exported files leave them out, and the model's own values stand.
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(head)
                and (k in state or v.is_floating_point())}
    problems = []
    if missing := sorted(set(expected) - set(state)):
        problems.append(f"missing keys {missing}")
    if unexpected := sorted(set(state) - set(expected)):
        problems.append(f"unexpected keys {unexpected}")
    problems += [f"{k}: shape {tuple(v.shape)} in the file, {tuple(expected[k].shape)} in "
                 "the model" for k, v in state.items()
                 if k in expected and v.shape != expected[k].shape]
    if problems:
        raise WeightsError(f"{path.name} does not fit {type(model).__name__} (classifier "
                           f"{head[:-1]!r} skipped): " + "; ".join(problems))
    model.load_state_dict(state, strict=False)


# -- plain-data encoding of plugin state ---------------------------------------------------
def _encode(value: Any) -> Any:
    """ParamData, modules and defaultdicts -> data that ``weights_only`` loading accepts."""
    if isinstance(value, ParamData):
        return {_PARAM_DATA: value.name, "data": value.data}
    if isinstance(value, nn.Module):
        return {_MODULE: value.state_dict(), "training": value.training}
    if isinstance(value, Mapping):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_encode(v) for v in value)
    return value


def _decode(value: Any, like: Any, model: nn.Module, device: torch.device) -> Any:
    """Inverse of :func:`_encode`; ``like`` is the attribute's current value (its container
    type is kept) and ``model`` the template of encoded modules."""
    if isinstance(value, dict) and _PARAM_DATA in value:
        return ParamData(value[_PARAM_DATA], init_tensor=value["data"].to(device), device=device)
    if isinstance(value, dict) and _MODULE in value:
        module = copy.deepcopy(model)
        module.load_state_dict(value[_MODULE])
        return module.train(value["training"])
    if isinstance(value, dict):
        inner = like if isinstance(like, Mapping) else {}
        decoded = {k: _decode(v, inner.get(k), model, device) for k, v in value.items()}
        if isinstance(like, defaultdict):
            return defaultdict(like.default_factory, decoded)
        return decoded
    if isinstance(value, (list, tuple)):
        same = isinstance(like, (list, tuple)) and len(like) == len(value)
        items = like if same else [None] * len(value)
        return type(value)(_decode(v, w, model, device) for v, w in zip(value, items))
    return value


def _split(obj: Any, dotted: str) -> tuple[Any, str]:
    *path, name = dotted.split(".")
    for part in path:
        obj = getattr(obj, part)
    return obj, name


def can_resume(strategy: SupervisedTemplate) -> bool:
    """Whether :func:`capture` saves everything ``strategy`` carries between experiences."""
    return not isinstance(strategy, STATEFUL_STRATEGIES) and all(
        isinstance(p, STATELESS_PLUGINS) or type(p) in PLUGIN_STATE for p in strategy.plugins)


# -- run checkpoints -----------------------------------------------------------------------
def rng_state() -> dict:
    """The states of torch (CPU and CUDA), numpy and Python's random generators."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                      *np_state[2:]),
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def capture(strategy: SupervisedTemplate) -> dict:
    """What a run needs to continue ``strategy`` after the current experience."""
    plugins = {}
    for plugin in strategy.plugins:
        for dotted in PLUGIN_STATE.get(type(plugin), ()):
            owner, name = _split(plugin, dotted)
            plugins.setdefault(type(plugin).__name__, {})[dotted] = _encode(getattr(owner, name))
    history = strategy.evaluator.get_all_metrics()
    return {"model": strategy.model.state_dict(),
            "clock": {k: v for k, v in vars(strategy.clock).items() if type(v) is int},
            "plugins": plugins,
            "metrics": {name: (list(xs), list(values)) for name, (xs, values) in history.items()},
            "rng": rng_state()}


def restore(strategy: SupervisedTemplate, state: Mapping[str, Any]) -> None:
    """Put a freshly built ``strategy`` back in the state :func:`capture` recorded."""
    strategy.model.load_state_dict(state["model"])
    device = torch.device(strategy.device)
    strategy.model.to(device)
    vars(strategy.clock).update(state["clock"])
    for plugin in strategy.plugins:
        for dotted, value in state["plugins"].get(type(plugin).__name__, {}).items():
            owner, name = _split(plugin, dotted)
            setattr(owner, name, _decode(value, getattr(owner, name), strategy.model, device))
    evaluator = strategy.evaluator
    for name, (xs, values) in state["metrics"].items():
        evaluator.all_metric_results[name][0].extend(xs)
        evaluator.all_metric_results[name][1].extend(values)
        evaluator.last_metric_results[name] = values[-1]
    set_rng_state(state["rng"])


def save_checkpoint(path: Path, payload: Mapping[str, Any]) -> None:
    """``torch.save`` to a temporary file beside ``path``, then an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **payload}, tmp)
    os.replace(tmp, path)


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    return [f"{key}: {saved.get(key)!r} in the checkpoint, {current.get(key)!r} now"
            for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]


def read_checkpoint(path: Path, config: Mapping[str, Any]) -> dict | None:
    """The checkpoint at ``path`` if it was written by ``config``; ``None`` if there is none.

    Raises:
        CheckpointError: the file cannot be read, or another configuration wrote it.
    """
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"not a format-{FORMAT} run checkpoint")
    except Exception as err:  # torch.load raises many types for damaged files
        raise CheckpointError(f"cannot read checkpoint {path}: damaged, or not a run checkpoint "
                              f"({type(err).__name__}); {RESTART_HINT}") from err
    if differences := _differences(payload["config"], config):
        raise CheckpointError(f"checkpoint {path} was written by another configuration ("
                              + "; ".join(differences) + f"); {RESTART_HINT}")
    return payload
