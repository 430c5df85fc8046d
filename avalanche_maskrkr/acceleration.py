"""Speed options for any strategy: mixed precision, channels-last, torch.compile, loading.

:class:`AccelerationPlugin` works on any Avalanche ``SupervisedTemplate`` (the method
strategies included) through its hooks, which run in this order per training iteration
(``avalanche/training/templates/update_type/sgd_update.py``)::

    before_forward -> forward -> after_forward -> loss -> before_backward -> backward
    -> after_backward -> before_update -> optimizer.step() -> after_update

so autocast is entered in ``before_forward`` and left in ``before_backward`` (forward
and loss in low precision, backward outside autocast as PyTorch recommends). For fp16
the loss is scaled in ``before_backward``; in ``before_update`` the gradients are
unscaled and, if any is inf or NaN, dropped so that ``optimizer.step()`` skips every
parameter (the step of ``torch.amp.GradScaler``); ``after_update`` adapts the scale.

``torch.compile`` is applied to the inner ``model.backbone`` with ``nn.Module.compile``
(state-dict keys unchanged), never to the ``MultiTaskModule`` itself: Avalanche passes
task labels only to a model that *is* a ``MultiTaskModule``. Dynamo guards on the task
that the network's ``TaskContext`` selects, on the train/eval mode and on the task
layers, which a new task can change: the backbone is recompiled for each task and mode,
and with RKR factors also for each earlier task evaluated after a new one: with the test
stream evaluated after each experience its frame collects about ``T**2 / 2``
compilations over ``T`` tasks (about 60 for 10). Past
``torch._dynamo.config.recompile_limit`` (8 by default) Dynamo silently runs the frame
eagerly, so compiling raises that limit and ``accumulated_recompile_limit``
(process-wide settings) to at least the plugin's ``recompile_limit``. The fused training
paths trace into one graph per compilation (no graph break): RKR's near-zero scales are
found by the network before the backbone runs (:func:`~.layers.zero_scales_found`), and
RKR's fold and Piggyback's masked weight are left to the compiler's own memory
planning instead of written into the network's work buffers or out= tensors. Where
Mask-RKR's masks change how many scales are zero, Dynamo recompiles until it treats
those sizes as dynamic.

:func:`loader_kwargs` gives data-loader arguments for ``strategy.train(exp, **kwargs)``
and ``strategy.eval(stream, **kwargs)``, which Avalanche 0.6 forwards to its loaders.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from torch import nn

PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device | str, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``precision`` ("fp32": a no-op context) on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def to_channels_last(tensor: torch.Tensor) -> torch.Tensor:
    """A 4-d (batch, channels, height, width) tensor in channels-last layout; others as is."""
    return tensor.contiguous(memory_format=torch.channels_last) if tensor.dim() == 4 else tensor


def loader_kwargs(device: torch.device | str, num_workers: int | None = None) -> dict[str, Any]:
    """Data-loader arguments: pinned memory on CUDA, worker processes kept across epochs.

    ``num_workers`` defaults to half the CPU cores (at most 8) on CUDA and to 0 on CPU,
    where worker processes would compete with the training threads.
    """
    on_cuda = torch.device(device).type == "cuda"
    if num_workers is None:
        num_workers = min(8, (os.cpu_count() or 2) // 2) if on_cuda else 0
    return {"num_workers": num_workers, "pin_memory": on_cuda,
            "persistent_workers": num_workers > 0}


class LossScaler:
    """Dynamic loss scaling for fp16 (the rules of ``torch.amp.GradScaler``).

    The scale is multiplied by ``backoff`` after a step with a non-finite gradient and
    by ``growth`` after ``interval`` consecutive finite steps.
    """

    def __init__(self, init_scale: float = 2.0 ** 16, growth: float = 2.0,
                 backoff: float = 0.5, interval: int = 2000):
        self.scale, self.growth, self.backoff, self.interval = init_scale, growth, backoff, interval
        self.good_steps = 0

    @torch.no_grad()
    def unscale(self, params: list[torch.Tensor]) -> bool:
        """Divide the gradients of ``params`` by the scale; True if any is inf or NaN."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return False
        for grad in grads:
            grad.mul_(1.0 / self.scale)
        peaks = torch.stack([torch.linalg.vector_norm(g, float("inf")).float() for g in grads])
        return not bool(torch.isfinite(peaks).all())

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale *= self.backoff
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps == self.interval:
            self.scale *= self.growth
            self.good_steps = 0


def _float_logits(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: a head's logits in fp32. Avalanche's ``MultiTaskModule.forward``
    gathers the per-task outputs into a float32 tensor, which rejects autocast's
    low-precision logits; the loss is computed in fp32 under autocast anyway."""
    return output.float()


class AccelerationPlugin(SupervisedPlugin, supports_distributed=True):
    """Mixed precision, channels-last and ``torch.compile`` for any strategy.

    Args:
        precision: "fp32" (default), "bf16" or "fp16" autocast of forward and loss;
            the heads of a converted network return fp32 logits; fp16 adds dynamic
            loss scaling (:class:`LossScaler`).
        channels_last: convert the model's 4-d parameters and the 4-d inputs to the
            channels-last layout (faster convolutions on recent GPUs).
        compile: ``torch.compile`` the model's ``backbone`` (True, or a dict of
            ``torch.compile`` keyword arguments such as ``{"mode": "max-autotune"}``).
        recompile_limit: when compiling, Dynamo's recompile limits are raised to at
            least this many compilations per frame (never lowered), so that a long
            stream keeps running compiled: 256 covers about 20 tasks with the test
            stream evaluated after each.
    """

    def __init__(self, precision: str = "fp32", channels_last: bool = False,
                 compile: bool | dict[str, Any] = False, recompile_limit: int = 256):
        super().__init__()
        autocast("cpu", precision)  # validates the name
        self.precision = precision
        self.channels_last = channels_last
        self.compile_kwargs = ({} if compile is True else compile) if compile else None
        self.recompile_limit = recompile_limit
        self.scaler = LossScaler() if precision == "fp16" else None
        self._autocast: contextlib.AbstractContextManager | None = None
        self._loss: torch.Tensor | None = None
        self._found_inf = False
        self._compiled: set[int] = set()

    # -- model preparation ----------------------------------------------------------
    def _prepare_model(self, strategy) -> None:
        model = strategy.model
        heads = getattr(model, "heads", None)
        if self.precision != "fp32" and isinstance(heads, nn.ModuleDict):
            for head in heads.values():
                if _float_logits not in head._forward_hooks.values():
                    head.register_forward_hook(_float_logits)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.compile_kwargs is not None and id(model) not in self._compiled:
            backbone = getattr(model, "backbone", None)
            if not isinstance(backbone, nn.Module):
                raise TypeError(
                    f"compile=True compiles the model's inner `backbone` module, and "
                    f"{type(model).__name__} has none: use a converted network "
                    "(avalanche_maskrkr.convert or a method strategy)")
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, self.recompile_limit)
            config.accumulated_recompile_limit = max(config.accumulated_recompile_limit,
                                                     self.recompile_limit)
            backbone.compile(**self.compile_kwargs)
            self._compiled.add(id(model))

    def before_training(self, strategy, **kwargs):
        self._prepare_model(strategy)

    def before_training_exp(self, strategy, **kwargs):
        self._prepare_model(strategy)  # parameters created by this experience's adaptation

    def before_eval_exp(self, strategy, **kwargs):
        self._prepare_model(strategy)  # heads created by the evaluation's adaptation

    # -- autocast around forward and loss ---------------------------------------------
    def _enter(self, strategy) -> None:
        self._leave()
        if self.channels_last:
            strategy.mbatch[0] = to_channels_last(strategy.mbatch[0])
        self._autocast = autocast(strategy.device, self.precision)
        self._autocast.__enter__()

    def _leave(self) -> None:
        if self._autocast is not None:
            self._autocast.__exit__(None, None, None)
            self._autocast = None

    def before_forward(self, strategy, **kwargs):
        self._enter(strategy)

    def before_backward(self, strategy, **kwargs):
        self._leave()
        if self.scaler is not None:
            self._loss = strategy.loss
            strategy.loss = strategy.loss * self.scaler.scale

    def after_backward(self, strategy, **kwargs):
        if self._loss is not None:  # metrics read the unscaled loss
            strategy.loss, self._loss = self._loss, None

    def before_update(self, strategy, **kwargs):
        if self.scaler is None:
            return
        params = [p for group in strategy.optimizer.param_groups for p in group["params"]]
        self._found_inf = self.scaler.unscale(params)
        if self._found_inf:
            for param in params:
                param.grad = None  # the optimizer skips parameters without a gradient

    def after_update(self, strategy, **kwargs):
        if self.scaler is not None:
            self.scaler.update(self._found_inf)

    def before_eval_forward(self, strategy, **kwargs):
        self._enter(strategy)

    def after_eval_iteration(self, strategy, **kwargs):
        self._leave()

    def after_training_epoch(self, strategy, **kwargs):
        self._leave()  # never leave autocast on if an iteration was interrupted

    def after_eval(self, strategy, **kwargs):
        self._leave()
