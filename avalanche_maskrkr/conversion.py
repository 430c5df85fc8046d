"""Model conversion: find the classifier, wrap the backbone's layers, build the network.

``convert(model, "rkr")`` turns an ordinary classifier (timm, torchvision, Avalanche's
SimpleMLP, ...) into a :class:`TaskAwareNetwork`. The model is modified in place (its
layers are wrapped, keeping the same base parameter objects) and frozen.

Which layers are adapted (SPEC section 2): every ``nn.Linear`` and ``nn.Conv2d`` of the
backbone, grouped and depthwise convolutions included, and the packed input projection
of every ``nn.MultiheadAttention`` (torchvision's ViT; exposed as a Linear by
:func:`~.layers.attention.expose_in_proj`), except
  * the classifier, replaced by per-task heads;
  * the patch-embedding convolution of transformers, unless ``adapt_patch_embed=True``:
    convolutions under a module named ``patch_embed`` (timm) or ``conv_proj``
    (torchvision's ViT), and the only convolution of a network when it is a patchify
    one, its kernel equal to its stride (torchvision's Swin, ``features.0.0``);
  * layers that cannot be adapted, named in one warning with the parameters they leave
    shared by all tasks: subclasses that override ``forward`` (e.g. timm's
    ``Conv2dSame``) and the separate q, k, v weights of an ``nn.MultiheadAttention``
    whose ``kdim`` or ``vdim`` differ from its ``embed_dim``.
Code that reads an adapted layer's ``weight`` or ``bias`` instead of calling it
(torchvision's Swin attention, ``nn.MultiheadAttention``) gets the current task's
effective tensors (:meth:`~.layers.TaskAdaptedLayer.current`). A fused q, k, v
projection (timm's ``qkv``, the attention's ``in_proj``) is split into q, k, v factors
when ``split_qkv=True``.
RKR layers save their output for backward (see :mod:`.layers.functional`), so the
network computes RKR and Mask-RKR activations out of place while it trains (see
:class:`~.network.TaskAwareNetwork`).
"""
from __future__ import annotations

import warnings

from torch import nn

from .layers import TaskBatchNorm, TaskBatchStats, TaskContext, TaskModule
from .layers.attention import expose_in_proj
from .network import TaskAwareNetwork
from .options import MethodOptions, make_options

HEAD_ATTRIBUTES = ("head", "fc", "classifier", "heads")
PATCH_EMBED_NAMES = ("patch_embed", "conv_proj")
FUSED_QKV_NAMES = ("qkv", "in_proj")


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


def _patch_embeddings(model: nn.Module) -> set[str]:
    """Names of the patch-embedding convolutions (see the module docstring)."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    names = {n for n, _ in convs if any(part in PATCH_EMBED_NAMES for part in n.split("."))}
    if len(convs) == 1 and tuple(convs[0][1].kernel_size) == tuple(convs[0][1].stride):
        names.add(convs[0][0])
    return names


def _adapted_layers(model: nn.Module, options: MethodOptions) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every layer to wrap; warns about the layers that cannot be."""
    frozen = set() if options.adapt_patch_embed else _patch_embeddings(model)
    chosen, shared = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) and not module._qkv_same_embed_dim:
            weights = [module.q_proj_weight, module.k_proj_weight, module.v_proj_weight]
            shared.append((f"{name} (the separate q, k, v weights of {type(module).__name__})",
                           sum(w.numel() for w in weights)))
        elif not isinstance(module, (nn.Linear, nn.Conv2d)) or name in frozen:
            continue
        elif _wrappable(module):
            chosen.append((name, module))
        else:
            shared.append((f"{name} ({type(module).__name__} overrides forward)",
                           sum(p.numel() for p in module.parameters(recurse=False))))
    if shared:
        warnings.warn("these layers cannot be adapted: " + "; ".join(
            f"{what} stays shared by all tasks: {n} parameters not adapted"
            for what, n in shared), stacklevel=3)
    return chosen


def convert(model: nn.Module, method: str | MethodOptions = "rkr", **options) -> TaskAwareNetwork:
    """Convert ``model`` in place for ``method`` ("rkr", "piggyback", "mask-rkr").

    ``options`` are the method's (see :mod:`avalanche_maskrkr.options`). Returns the
    ``TaskAwareNetwork``; task parameters and heads are created per experience.
    """
    if isinstance(model, TaskAwareNetwork) or any(isinstance(m, TaskModule)
                                                  for m in model.modules()):
        raise ValueError("the model is already converted (in place, by convert or a "
                         "method's strategy or plugin): convert a model of its own")
    opts = make_options(method, **options)
    head_name = find_classifier(model, opts.head_name)
    feature_dim = model.get_submodule(head_name).in_features
    model.set_submodule(head_name, nn.Identity())
    for attention in [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]:
        if attention._qkv_same_embed_dim:
            expose_in_proj(attention)
    context = TaskContext()
    for name, layer in _adapted_layers(model, opts):
        split = 3 if (opts.split_qkv and isinstance(layer, nn.Linear)
                      and name.split(".")[-1] in FUSED_QKV_NAMES
                      and layer.out_features % 3 == 0) else 1
        model.set_submodule(name, opts.make_layer(layer, context, split))
    if opts.bn_policy != "frozen":
        wrapper = TaskBatchNorm if opts.bn_policy == "per_task" else TaskBatchStats
        norms = [(n, m) for n, m in model.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        for name, norm in norms:
            model.set_submodule(name, wrapper(norm, context))
    return TaskAwareNetwork(model, feature_dim, opts, context)
