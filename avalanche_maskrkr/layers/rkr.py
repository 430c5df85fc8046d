"""RKR and Mask-RKR: low-rank weight rectification (RG) and output scaling (SFG) per task.

For a frozen layer with weight W and bias b, task t computes

    y = F_t * ((W + R_t) x + b),      R_t = LM_t RM_t reshaped to W's shape,

with F_t broadcast over the output channels (Singh et al., RKR, CVPR 2021).

Factor layout (the paper's, kernel k_h x k_w, ``in`` = input channels per group):
  * Linear: LM (in, K), RM (K, out); R^T = LM RM, i.e. R = (LM RM)^T in PyTorch's layout.
  * Conv2d: LM (k_h * in, K) with rows indexed (kernel row, input channel), RM
    (K, k_w * out) with columns indexed (kernel column, output channel), so
    R[o, i, a, b] = sum_r LM[(a, i), r] RM[r, (b, o)]. This choice makes R a sum of K
    separable kernels: applying it to activations is a (k_h x 1) convolution from ``in``
    to K channels followed by a (1 x k_w) one from K to ``out`` channels.
    Parameters per layer: K * (k_h * in + k_w * out), i.e. K * k * (in + out).
  * A fused ``qkv`` Linear split into ``n_split`` parts has one (LM, RM) pair per part:
    LM (n_split, in, K), RM (n_split, K, out / n_split). Every layer stores the leading
    ``n_split`` axis (1 when not split).
Initialisation: LM ~ N(0, 1 / fan_in), RM = 0, F = 1, so a new task starts from the base.

Mask-RKR (Takeda & Yanai 2022): LM, RM and F are learned on the first task only; every
later task learns binary masks over them (:class:`BinaryMask`): R_t = (LM*M^L_t)(RM*M^R_t),
F_t = F * M^F_t. ``mask_rg`` / ``mask_sfg`` choose which generator is masked; a generator
that is not masked gets real-valued per-task parameters as in RKR, so masking nothing is
RKR. ``placement`` says where the masks go: ``"factors"`` (on LM and RM),
``"product"`` (one mask on the full product R instead) or ``"none"`` (no mask at all,
whatever ``mask_rg`` and ``mask_sfg`` say: RKR).

Training runs the fused :func:`~.functional.rectified` over the frozen base: per call it
either folds F * (W + R) into one weight or adds the rank-K path of :mod:`.rank_path` to
the base op's output, whichever reads less memory for the shapes at hand
(:meth:`RKRLayer.training_path`); neither computes a weight gradient of W. Evaluation
uses the cached fold of :class:`~.base.TaskAdaptedLayer`.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .base import TaskAdaptedLayer, TaskContext
from .functional import compute_dtype, near_zero, rectified
from .masks import BinaryMask
from .rank_path import make_rank_path

PLACEMENTS = ("factors", "product", "none")


def _masked_or_real(own: nn.Module | torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """A task's component: its own real tensor, or its binary mask applied to ``shared``."""
    return own(shared) if isinstance(own, BinaryMask) else own


class RKRLayer(TaskAdaptedLayer):
    """RKR (and Mask-RKR) wrapper of a frozen Linear or Conv2d.

    Args:
        base: the frozen layer. context: the network's task context.
        rank: K, the rank of each rectification. n_split: independent parts along the
            output axis (3 for a fused qkv).
        mask_rg, mask_sfg, placement, mask_init, mask_threshold: Mask-RKR options (the
            defaults here give plain RKR).
    """

    def __init__(self, base: nn.Linear | nn.Conv2d, context: TaskContext, rank: int = 2,
                 n_split: int = 1, mask_rg: bool = False, mask_sfg: bool = False,
                 placement: str = "factors", mask_init: float = 1e-2,
                 mask_threshold: float = 5e-3):
        super().__init__(base, context)
        out_ch, in_ch = base.weight.shape[:2]
        if out_ch % n_split:
            raise ValueError(f"cannot split {out_ch} outputs into {n_split} parts")
        self.kh, self.kw = base.weight.shape[2:] if self.is_conv else (1, 1)
        self.rank, self.n_split = rank, n_split
        self.lm_shape = (n_split, self.kh * in_ch, rank)
        self.rm_shape = (n_split, rank, self.kw * out_ch // n_split)
        self.mask_rg = mask_rg and placement != "none"
        self.mask_sfg = mask_sfg and placement != "none"
        self.placement = placement
        self.mask_init, self.mask_threshold = mask_init, mask_threshold
        self.path = "auto"
        # (task, dtype, indices of its near-zero scales), set by zero_scales_found
        self.zero_scales: tuple[int, torch.dtype, torch.Tensor] | None = None
        self.rank_path = make_rank_path(base, rank, n_split) if self.op is not None else None

    # -- parameters ----------------------------------------------------------------
    @property
    def first_task(self) -> str:
        return next(iter(self.tasks.keys()))

    def _mask(self, shape) -> BinaryMask:
        return BinaryMask(shape, self.mask_init, self.mask_threshold,
                          **self.factory_kwargs)

    def add_task(self, task: int) -> None:
        like = self.factory_kwargs
        owns_real = len(self.tasks) == 0  # Mask-RKR: the first task learns the real set
        params = nn.Module()
        if owns_real or not self.mask_rg:
            fan_in = self.lm_shape[1]
            params.lm = nn.Parameter(torch.randn(self.lm_shape, **like) / math.sqrt(fan_in))
            params.rm = nn.Parameter(torch.zeros(self.rm_shape, **like))
        elif self.placement == "factors":
            params.lm = self._mask(self.lm_shape)
            params.rm = self._mask(self.rm_shape)
        else:
            params.r = self._mask(tuple(self.base.weight.shape))
        if owns_real or not self.mask_sfg:
            params.f = nn.Parameter(torch.ones(self.base.weight.shape[0], **like))
        else:
            params.f = self._mask((self.base.weight.shape[0],))
        self.tasks[str(task)] = params

    def fold_dependencies(self, task: int) -> list[torch.Tensor]:
        deps = super().fold_dependencies(task)
        first = self.tasks[self.first_task]
        return deps + [*first.parameters(), *first.buffers()]

    def _masks_product(self, task: int) -> bool:
        """Whether ``task`` has one mask on the full product R (``placement="product"``)."""
        return "r" in self.tasks[str(task)]._modules

    def scale(self, task: int) -> torch.Tensor:
        """F of ``task``, its mask applied."""
        return _masked_or_real(self.tasks[str(task)].f, self.tasks[self.first_task].f)

    def factors(self, task: int):
        """(LM, RM, F, product mask or None) of ``task``, masks applied."""
        own, shared, f = self.tasks[str(task)], self.tasks[self.first_task], self.scale(task)
        if self._masks_product(task):
            return shared.lm, shared.rm, f, own.r
        return _masked_or_real(own.lm, shared.lm), _masked_or_real(own.rm, shared.rm), f, None

    # -- the computation -------------------------------------------------------------
    def rectification(self, lm: torch.Tensor, rm: torch.Tensor) -> torch.Tensor:
        """R with the base weight's shape: (out, in) or (out, in, k_h, k_w)."""
        s = self.n_split
        prod = torch.bmm(lm, rm)  # (s, k_h * in, k_w * out / s)
        prod = prod.view(s, self.kh, -1, self.kw, self.rm_shape[2] // self.kw)
        # (s, k_h, in, k_w, out/s) -> (s, out/s, in, k_h, k_w) -> W's shape
        return prod.permute(0, 4, 2, 1, 3).reshape(self.base.weight.shape)

    def rectified_weight(self, lm: torch.Tensor, rm: torch.Tensor,
                         f: torch.Tensor | None = None,
                         out: torch.Tensor | None = None) -> torch.Tensor:
        """F * (W + R), or W + R without ``f``, of W's shape and dtype: a new tensor, or
        written into ``out`` (contiguous, W's shape) when given.

        For a Linear: W scaled by F, then one batched GEMM with F folded into RM, written
        in place in W's layout (no separate R, no permuted copy of it, no extra pass over
        the weight to scale it).
        """
        w = self.base.weight
        if self.is_conv:
            rectified = torch.add(w, self.rectification(lm, rm), out=out)
            return rectified if f is None else rectified.mul_(f.view(-1, 1, 1, 1))
        s, rows, cols = self.n_split, rm.transpose(1, 2), lm.transpose(1, 2)
        parts = (s, -1, w.shape[1])
        if f is None:
            out = None if out is None else out.view(parts)
            return torch.baddbmm(w.view(parts), rows, cols, out=out).view(w.shape)
        scaled = torch.mul(w, f[:, None], out=out).view(parts)
        return scaled.baddbmm_(rows * f.view(s, -1, 1), cols).view(w.shape)

    def effective(self, task: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        lm, rm, f, r_mask = self.factors(task)
        if r_mask is None:
            weight = self.rectified_weight(lm, rm, f)
        else:
            rectified = self.base.weight + r_mask(self.rectification(lm, rm))
            weight = f.view(-1, *[1] * (rectified.dim() - 1)) * rectified
        bias = None if self.base.bias is None else f * self.base.bias
        return weight, bias

    def training_path(self, x: torch.Tensor, task: int) -> str:
        """How :meth:`forward_train` computes ``task`` on ``x``: "fold" (one op with
        F * (W + R)), "activations" (base op plus the rank-K path) or "autograd" (the
        effective weight by plain autograd: a base that trains, a grouped or padded-mode
        convolution, or a mask on the full product R).

        ``self.path`` ("auto" by default) may force "fold" or "activations". Auto folds
        when the fold's passes over the weight cost no more than the passes the rank-K
        path adds over the activations (measured crossovers in benchmarks/RESULTS.md):
        * Linear, P positions: the fold writes F * (W + R) in forward and again in
          backward (a scaled copy of W, then a rank-K update in place: about eight
          reads and writes of a weight-sized tensor per step); the activation path adds
          R x into the output and scales it by F in forward, and in backward forms g * F
          and adds its rank-K term into dL/dx (about six reads and writes of an
          output-sized tensor, two of an input-sized one): fold when
          P * (3 * out + in) >= 4 * out * in;
        * Conv2d: fold when the output has at least as many positions as W has entries
          per output channel (the rank path's shifts are cheaper than that model says).
        """
        if not self.can_fuse or self._masks_product(task):
            return "autograd"
        if self.path != "auto":
            return self.path
        weight = self.base.weight
        if self.is_conv:
            n, _, h, w = x.shape
            h_out, w_out = self.rank_path.out_size(h, w)
            fold = n * h_out * w_out >= weight[0].numel()
        else:
            out, n_in = weight.shape
            fold = (x.numel() // n_in) * (3 * out + n_in) >= 4 * out * n_in
        return "fold" if fold else "activations"

    def forward_train(self, x: torch.Tensor, task: int) -> torch.Tensor:
        path = self.training_path(x, task)
        if path == "autograd":
            return super().forward_train(x, task)
        lm, rm, f, _ = self.factors(task)
        found, dtype = self.zero_scales, compute_dtype(x, self.base.weight)
        small = found[2] if found is not None and found[:2] == (task, dtype) else None
        return rectified(self, x, lm, rm, f, path == "fold", dtype, small)

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, n_split={self.n_split}, mask_rg={self.mask_rg}, "
                f"mask_sfg={self.mask_sfg}, placement={self.placement}, "
                f"{super().extra_repr()}")


@contextmanager
def zero_scales_found(layers: list[RKRLayer], task: int) -> Iterator[None]:
    """Within the block, each of ``layers`` knows which of ``task``'s scales F are too small
    to divide by (:func:`~.functional.near_zero`), found for all layers at once.

    A layer that finds them itself does so in every training forward, a host sync per
    layer on GPU and a graph break under ``torch.compile``; this costs one sync per
    network forward where no F is near zero (RKR), two where some are (Mask-RKR's masked
    scales), and one comparison over all layers' scales together. Where the layers
    compute in several dtypes, the largest of their limits is used for all: a channel
    taken as near zero is still exact, it only takes the slower pre-scale path. Outside
    the block (or in another dtype) each layer finds them itself.
    """
    with torch.no_grad():
        layers = [layer for layer in layers if layer.has_task(task)]
        scales = [layer.scale(task) for layer in layers]
        dtypes = [compute_dtype(f, layer.base.weight) for f, layer in zip(scales, layers)]
        found = None
        if layers:
            limit = max(set(dtypes), key=lambda dtype: torch.finfo(dtype).tiny)
            flat = torch.cat([f.to(dtype) for f, dtype in zip(scales, dtypes)])
            found = near_zero(flat, limit).nonzero().flatten()
        if found is not None and len(found):
            ends = list(itertools.accumulate(len(f) for f in scales))
            owner = torch.bucketize(found, torch.tensor(ends, device=found.device), right=True)
            parts = found.split(owner.bincount(minlength=len(scales)).tolist())
            found = [part - start for part, start in zip(parts, [0, *ends[:-1]])]
        else:
            found = [found] * len(layers)
    for layer, dtype, small in zip(layers, dtypes, found):
        layer.zero_scales = (task, dtype, small)
    try:
        yield
    finally:
        for layer in layers:
            layer.zero_scales = None
