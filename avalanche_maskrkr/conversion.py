"""Model conversion: find the classifier, wrap the backbone's layers, build the network.

``convert(model, "rkr")`` turns an ordinary classifier (timm, torchvision, Avalanche's
SimpleMLP, ...) into a :class:`TaskAwareNetwork`. The model is modified in place (its
layers are wrapped, keeping the same base parameter objects) and frozen.

Which layers are adapted (SPEC section 2): every ``nn.Linear`` and ``nn.Conv2d`` of the
backbone, grouped and depthwise convolutions included, except
  * the classifier, replaced by per-task heads;
  * the patch-embedding convolution of transformers (modules named ``patch_embed`` as in
    timm, or ``conv_proj`` as in torchvision), unless ``adapt_patch_embed=True``;
  * layers that cannot be wrapped safely, reported in one warning: projections inside
    ``nn.MultiheadAttention`` (it reads their weights directly) and subclasses that
    override ``forward`` (e.g. timm's ``Conv2dSame``).
A fused timm ``qkv`` Linear is split into q, k, v factors when ``split_qkv=True``.
RKR layers save their output for backward (see :mod:`.layers.functional`), so the
network computes RKR and Mask-RKR activations out of place while it trains (see
:class:`~.network.TaskAwareNetwork`).
"""
from __future__ import annotations

import warnings

from torch import nn

from .layers import TaskBatchNorm, TaskContext
from .network import TaskAwareNetwork
from .options import MethodOptions, make_options

HEAD_ATTRIBUTES = ("head", "fc", "classifier", "heads")
PATCH_EMBED_NAMES = ("patch_embed", "conv_proj")


def find_classifier(model: nn.Module, head_name: str | None = None) -> str:
    """Dotted name of the model's final ``nn.Linear`` classifier.

    Looks at ``head_name`` if given, else ``model.get_classifier()`` (timm), else the
    attributes ``head``, ``fc``, ``classifier``, ``heads``; inside a container the last
    Linear is the classifier.
    """
    names = {id(m): n for n, m in model.named_modules()}
    if head_name is not None:
        try:
            candidates = [model.get_submodule(head_name)]
        except AttributeError as err:
            raise ValueError(f"head_name={head_name!r} is not a module of "
                             f"{type(model).__name__}") from err
    else:
        candidates = [model.get_classifier()] if hasattr(model, "get_classifier") else []
        candidates += [getattr(model, attr, None) for attr in HEAD_ATTRIBUTES]
    for head in candidates:
        if isinstance(head, nn.Module) and id(head) in names:
            linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
            if linears:
                return names[id(linears[-1])]
    where = f"{head_name!r}" if head_name else f"get_classifier() or the attributes {HEAD_ATTRIBUTES}"
    raise ValueError(
        f"Could not find the classifier of {type(model).__name__}: no nn.Linear in {where}. "
        "Pass head_name='<dotted module name>' naming its final Linear layer.")


def _wrappable(module: nn.Module) -> bool:
    base = nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d
    return type(module).forward is base.forward


def _adapted_layers(model: nn.Module, options: MethodOptions) -> list[tuple[str, nn.Module]]:
    inside_mha = {id(m) for mha in model.modules() if isinstance(mha, nn.MultiheadAttention)
                  for m in mha.modules()}
    chosen, skipped = [], []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        is_patch_embed = any(part in PATCH_EMBED_NAMES for part in name.split("."))
        if isinstance(module, nn.Conv2d) and is_patch_embed and not options.adapt_patch_embed:
            continue
        if id(module) in inside_mha or not _wrappable(module):
            skipped.append(name)
        else:
            chosen.append((name, module))
    if skipped:
        warnings.warn(f"these layers stay frozen and shared by all tasks (they cannot be "
                      f"wrapped): {skipped}", stacklevel=3)
    return chosen


def convert(model: nn.Module, method: str | MethodOptions = "rkr", **options) -> TaskAwareNetwork:
    """Convert ``model`` in place for ``method`` ("rkr", "piggyback", "mask-rkr").

    ``options`` are the method's (see :mod:`avalanche_maskrkr.options`). Returns the
    ``TaskAwareNetwork``; task parameters and heads are created per experience.
    """
    if isinstance(model, TaskAwareNetwork):
        raise ValueError("the model is already converted")
    opts = make_options(method, **options)
    head_name = find_classifier(model, opts.head_name)
    feature_dim = model.get_submodule(head_name).in_features
    model.set_submodule(head_name, nn.Identity())
    context = TaskContext()
    for name, layer in _adapted_layers(model, opts):
        split = 3 if (opts.split_qkv and isinstance(layer, nn.Linear)
                      and name.split(".")[-1] == "qkv" and layer.out_features % 3 == 0) else 1
        model.set_submodule(name, opts.make_layer(layer, context, split))
    if opts.bn_policy == "per_task":
        norms = [(n, m) for n, m in model.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for name, norm in norms:
            model.set_submodule(name, TaskBatchNorm(norm, context))
    return TaskAwareNetwork(model, feature_dim, opts, context)
