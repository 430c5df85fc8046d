"""Binary masks with a straight-through estimator, and their 1-bit storage.

A mask over a tensor W holds real-valued scores S (same shape as W) while its task trains;
the mask applied is M = 1[S > threshold] and the straight-through estimator passes the
gradient of M to S unchanged, so dL/dS = dL/dW_eff * W (Piggyback, Mallya et al. 2018).
When the task is finished the scores are dropped and only the packed bits are kept.
"""
from __future__ import annotations

import math

import torch
from torch import nn

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor of any shape -> uint8 tensor of ceil(numel / 8) bytes (MSB first)."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = nn.functional.pad(flat, (0, (-flat.numel()) % 8))
    return (flat.view(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 (ceil(n / 8),) -> bool tensor of ``shape``."""
    n = math.prod(shape)
    unpacked = (bits.unsqueeze(1) & _BIT_WEIGHTS.to(bits.device)) != 0
    return unpacked.reshape(-1)[:n].reshape(shape)


class _StraightThroughMask(torch.autograd.Function):
    """W_eff = W * 1[S > threshold]; dL/dS = dL/dW_eff * W, dL/dW = dL/dW_eff * M.

    Saves only the two leaves it was given (no full-size temporary is kept for backward);
    the binary mask is recomputed in backward only when W itself needs a gradient.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, scores: torch.Tensor, threshold: float):
        ctx.save_for_backward(weight, scores)
        ctx.threshold = threshold
        return weight * (scores > threshold)  # two ops; torch.where with a 0 takes three

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, scores = ctx.saved_tensors
        grad_weight = grad_scores = None
        if ctx.needs_input_grad[0]:
            grad_weight = torch.where(scores > ctx.threshold, grad, 0)
        if ctx.needs_input_grad[1]:
            grad_scores = grad * weight
        return grad_weight, grad_scores, None


class BinaryMask(nn.Module):
    """A learnable binary mask over a tensor of ``shape``.

    While training: ``scores`` is a Parameter initialised to ``init``. After :meth:`freeze`:
    the scores are gone and a uint8 buffer ``bits`` (1 bit per entry) holds the mask.
    """

    def __init__(self, shape: tuple[int, ...], init: float, threshold: float,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.shape = tuple(shape)
        self.threshold = threshold
        self.scores: nn.Parameter | None = nn.Parameter(
            torch.full(self.shape, float(init), device=device, dtype=dtype))
        self.register_buffer("bits", None)

    @property
    def frozen(self) -> bool:
        return self.scores is None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def mask(self) -> torch.Tensor:
        """The binary mask as a bool tensor of ``shape``."""
        if self.frozen:
            return unpack_bits(self.bits, self.shape)
        return self.scores.detach() > self.threshold

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor * M``, differentiable in the scores while they exist."""
        if self.frozen:
            return torch.where(self.mask(), tensor, 0)
        return _StraightThroughMask.apply(tensor, self.scores, self.threshold)

    @torch.no_grad()
    def freeze(self) -> None:
        """Replace the real-valued scores by the packed binary mask (1 bit per entry)."""
        if self.frozen:
            return
        bits = pack_bits(self.mask())
        del self.scores
        self.scores = None
        self.bits = bits

    def extra_repr(self) -> str:
        return f"shape={self.shape}, threshold={self.threshold}, frozen={self.frozen}"
