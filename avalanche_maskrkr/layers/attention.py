"""``nn.MultiheadAttention`` with its packed input projection as a Linear module.

``nn.MultiheadAttention`` (torchvision's ViT) keeps the packed q, k, v projection as two
bare parameters, ``in_proj_weight`` (3E, E) and ``in_proj_bias`` (3E,), and passes them
with ``out_proj.weight`` and ``out_proj.bias`` straight to
``F.multi_head_attention_forward`` (or to its fused inference kernel) instead of calling
a module. :func:`expose_in_proj` moves the two parameters (the same objects) into an
``nn.Linear`` named ``in_proj`` and makes ``in_proj_weight`` and ``in_proj_bias`` read
that module's ``weight`` and ``bias``. Once ``in_proj`` and ``out_proj`` are wrapped in
task layers, whose ``weight`` and ``bias`` are the current task's effective tensors
(:meth:`~.base.TaskAdaptedLayer.current`), the attention computes the current task,
through torch's own forward.
"""
from __future__ import annotations

import torch
from torch import nn


class InProjMultiheadAttention(nn.MultiheadAttention):
    """An ``nn.MultiheadAttention`` whose ``in_proj_weight`` and ``in_proj_bias`` are its
    ``in_proj`` module's ``weight`` and ``bias``. Made from an existing attention by
    :func:`expose_in_proj`, which swaps its class in place (as
    ``torch.nn.utils.parametrize`` does), never constructed directly."""

    in_proj: nn.Module

    @property
    def in_proj_weight(self) -> torch.Tensor:
        return self.in_proj.weight

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        return self.in_proj.bias


def expose_in_proj(attention: nn.MultiheadAttention) -> None:
    """Make ``attention`` an :class:`InProjMultiheadAttention` in place: its packed
    in-projection parameters move, unchanged, into ``attention.in_proj``, an
    ``nn.Linear(E, 3E)`` (state-dict keys ``in_proj.weight`` and ``in_proj.bias``).

    Only for an attention with one packed projection (``kdim`` and ``vdim`` equal to
    ``embed_dim``); one with separate q, k, v weights raises ``ValueError``.
    """
    if not attention._qkv_same_embed_dim:
        raise ValueError("this nn.MultiheadAttention has separate q, k, v projection "
                         "weights (kdim or vdim differ from embed_dim), not a packed one")
    weight, bias = attention.in_proj_weight, attention.in_proj_bias
    in_proj = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                        device="meta")  # no memory: its parameters are replaced below
    in_proj.weight, in_proj.bias = weight, bias
    del attention.in_proj_weight, attention.in_proj_bias
    attention.__class__ = InProjMultiheadAttention
    attention.in_proj = in_proj
