"""Fused training paths of the method layers: autograd functions that compute only the
gradients a method needs, and keep as little as possible alive for backward.

A layer's operation is a :class:`LinearOp` or a :class:`ConvOp` (y = op(x, w) + b); both
give the input and weight gradients of the op for an output gradient g, each only when
asked for. Built on them:

* :func:`rectified` (RKR, Mask-RKR): y = F * ((W + R) x + b) with R = LM RM. Forward
  folds F * (W + R) into one weight when the output has at least as many positions as
  the weight has entries per output channel (then the fold costs less than passes over
  the output), else it runs the base op and adds R x (:mod:`.rank_path`) in place.
  Backward computes dL/dx like the frozen base (through the folded weight, or through W
  and the rank-K path), the factors' gradients from the rank-K path's thin activations
  z = A x (computed in forward on both paths), and never a weight gradient of W. The
  fold is written into a work buffer of the network's :class:`~.base.TaskContext`, shared
  by every layer, in forward and again in backward rather than kept per layer (RKR's
  training memory is far below fine-tuning's, so the buffer costs nothing that counts).
  It saves the output y rather than the pre-scale output u (which autograd would keep
  for dL/dF): dL/dF = sum(g * y) / F, with u kept only for the channels whose |F| is too
  small to divide by (found for the whole network at once by
  :func:`~.rkr.zero_scales_found` when it runs the layer). The output is usually saved
  anyway by the next op (GELU, attention), so this costs no memory.
* :func:`masked` (Piggyback): y = (W * M) x + b with M = 1[S > threshold] and the
  straight-through estimator dL/dS = dL/d(W * M) * W. It saves x and S, not the masked
  weight: backward recomputes W * M instead of keeping a weight-sized copy per layer
  alive. W * M is a new tensor each time, dropped as soon as its op has run, and
  backward allocates dL/dS only once it is gone: like fine-tuning, which holds dL/dW,
  a layer holds one weight-sized tensor at a time, so Piggyback's peak training memory
  is at most fine-tuning's.

Both run their math in the autocast dtype when autocast is on (as ``F.linear`` would);
autograd casts each gradient they return to its input's dtype. The frozen base must not
require a gradient (the layers use plain autograd while it trains with the first task).
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.nn import functional as F


class LinearOp:
    """y = x w^T (+ b) over the last axis; w (out, in)."""

    channel_dim = -1

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None):
        return F.linear(x, w, b)

    def grads(self, g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, input: bool,
              weight: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(dL/dx, dL/dw) for the output gradient ``g`` (each None unless asked for)."""
        dx = g @ w if input else None
        dw = (g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])) if weight else None
        return dx, dw


class ConvOp:
    """A 2-d convolution (groups 1) with fixed stride, integer padding and dilation."""

    channel_dim = 1

    def __init__(self, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation)

    def grads(self, g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, input: bool,
              weight: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(dL/dx, dL/dw) for the output gradient ``g`` (each None unless asked for)."""
        if not (input or weight):
            return None, None
        dx, dw, _ = torch.ops.aten.convolution_backward(
            g, x, w, None, self.stride, self.padding, self.dilation, False, (0, 0), 1,
            (input, weight, False))
        return dx, dw


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the op runs in: autocast's when it is on, else the inputs' promotion."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, weight.dtype)


def autocast_off(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast switched off for ``x``'s device where it is on (the fused functions cast
    to the compute dtype themselves), else a no-op context: entering ``torch.autocast``
    costs more host time than several small ops."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``: ``t`` itself when it already is (no alias of an input, which
    Dynamo cannot trace through an autograd function when it is saved for backward)."""
    return t if t.dtype == dtype else t.to(dtype)


def near_zero(f: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Bool (out,): the scales F too small to divide by in ``dtype`` (F's own by default).
    For those channels dL/dF comes from the pre-scale output instead of sum(g * y) / F."""
    return f.abs() < torch.finfo(dtype or f.dtype).tiny ** 0.5


def make_op(base: nn.Linear | nn.Conv2d) -> LinearOp | ConvOp | None:
    """The op of ``base``; None for convolutions the fused paths do not cover (grouped,
    string padding, non-zero padding modes), which keep plain autograd."""
    if isinstance(base, nn.Linear):
        return LinearOp()
    if base.groups != 1 or base.padding_mode != "zeros" or isinstance(base.padding, str):
        return None
    return ConvOp(base.stride, base.padding, base.dilation)


def _rows(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(out,) -> broadcastable over the leading (output channel) axis of a weight."""
    return v.view(-1, *[1] * (like.dim() - 1))


def _channels(op, v: torch.Tensor, ndim: int) -> torch.Tensor:
    """(out,) -> broadcastable over a ``ndim``-d output of ``op``."""
    return v if op.channel_dim == -1 else v.view(-1, *[1] * (ndim - 2))


def _channel_sum(op, t: torch.Tensor) -> torch.Tensor:
    """Sum over every axis but the channel axis: (..., out) or (N, out, H, W) -> (out,)."""
    if op.channel_dim == -1:
        return t.reshape(-1, t.shape[-1]).sum(0)
    return t.sum((0, 2, 3))


def _take_channels(op, t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return t.index_select(op.channel_dim % t.dim(), index)


def _channel_dot(op, g: torch.Tensor, y: torch.Tensor, chunk: int = 2 ** 17) -> torch.Tensor:
    """sum(g * y) over every axis but the channel axis. On CPU in blocks of about
    ``chunk`` entries along the first axis: the products of every full block are
    accumulated into the first block's (``addcmul_``, one op per block, no temporary
    beyond one block, each block read while the accumulator is in cache). Elsewhere in
    one product: on a GPU each block would cost a kernel launch (hundreds per layer at
    large batches)."""
    if g.device.type != "cpu":
        return _channel_sum(op, g * y)
    rows = g.reshape(-1, g.shape[-1]) if op.channel_dim == -1 else g
    other = y.reshape(rows.shape)
    n, step = len(rows), max(1, chunk // math.prod(rows.shape[1:]))
    total, end = rows[:step] * other[:step], step
    while end + step <= n:
        total.addcmul_(rows[end:end + step], other[end:end + step])
        end += step
    total = _channel_sum(op, total)
    if end < n:
        total += _channel_sum(op, rows[end:] * other[end:])
    return total


class _Rectified(torch.autograd.Function):
    """See :func:`rectified`; ``layer`` gives the op, the rank path and the fold."""

    @staticmethod
    def forward(ctx, x, lm, rm, f, layer, fold: bool, dtype: torch.dtype, small):
        base, op, path = layer.base, layer.op, layer.rank_path
        with autocast_off(x):  # an autograd function's forward runs without grad
            xc, fc, lmc, rmc = (cast(t, dtype) for t in (x, f, lm, rm))
            bias = None if base.bias is None else cast(base.bias, dtype)
            if small is None:  # a host sync on GPU, a graph break under torch.compile
                small = near_zero(fc).nonzero().flatten()
            a, bt = path.kernels(lmc, rmc)
            z, u_small = path.first(xc, a), None
            if fold:
                if len(small):
                    w_rect = _rectified_weight(layer, lm, rm, None, dtype)  # W + R
                    u_small = op(xc, w_rect[small], None if bias is None else bias[small])
                    w_eff = w_rect.mul_(_rows(fc, w_rect))
                else:
                    w_eff = _rectified_weight(layer, lm, rm, f, dtype)
                y = op(xc, w_eff, None if bias is None else fc * bias)
            else:
                y = op(xc, base.weight.to(dtype), bias)
                path.add_second(y, z, bt)
                if len(small):
                    u_small = _take_channels(op, y, small)
                y.mul_(_channels(op, fc, y.dim()))
        ctx.layer, ctx.fold, ctx.dtype = layer, fold, dtype
        ctx.save_for_backward(xc, y, lm, rm, f, a, bt, fc, z, small, u_small)
        return y

    @staticmethod
    def backward(ctx, g):
        xc, y, lm, rm, f, a, bt, fc, z, small, u_small = ctx.saved_tensors
        layer = ctx.layer
        op, path = layer.op, layer.rank_path
        g = g.to(ctx.dtype)
        df = dx = None
        if ctx.needs_input_grad[3]:
            df = _channel_dot(op, g, y).div_(fc)  # inf or nan where F = 0: overwritten below
            if len(small):
                df[small] = _channel_sum(op, _take_channels(op, g, small) * u_small)
        if ctx.needs_input_grad[0] and not ctx.fold:
            # dL/dx = (g F) W + dL/dz A: the one pass for g F serves every product
            gf = g * _channels(op, fc, g.dim())
            dz, d_bt = path.second_grads(gf, z, bt)
            dx, _ = op.grads(gf, xc, layer.base.weight.to(ctx.dtype), True, False)
            d_a = path.first_grads(dz, xc, a, dx)
        else:  # F goes on B^T and on dL/dB^T, small tensors, instead of a pass over g
            dz, d_bt = path.second_grads(g, z, bt * fc)
            d_bt.mul_(fc)
            d_a = path.first_grads(dz, xc, a)
            if ctx.needs_input_grad[0]:
                w_eff = _rectified_weight(layer, lm, rm, f, ctx.dtype)
                dx, _ = op.grads(g, xc, w_eff, True, False)
        d_lm, d_rm = path.kernel_grads(d_a, d_bt)
        return dx, d_lm, d_rm, df, None, None, None, None  # autograd casts each to its dtype


def rectified(layer, x: torch.Tensor, lm: torch.Tensor, rm: torch.Tensor, f: torch.Tensor,
              fold: bool, dtype: torch.dtype, small: torch.Tensor | None = None) -> torch.Tensor:
    """RKR training output y = F * ((W + R) x + b) of ``layer`` (an :class:`RKRLayer`).

    x: the layer's input, (..., in) or (N, in, H, W). lm, rm, f: the task's factors with
    masks applied. ``fold``: fold F * (W + R) into one weight, else add the rank-K path
    to the base op's output. ``dtype``: the compute dtype (:func:`compute_dtype`).
    ``small``: the indices of :func:`near_zero` channels of ``f`` in ``dtype`` when
    known (found here otherwise).
    """
    return _Rectified.apply(x, lm, rm, f, layer, fold, dtype, small)


def _rectified_weight(layer, lm: torch.Tensor, rm: torch.Tensor, f: torch.Tensor | None,
                      dtype: torch.dtype) -> torch.Tensor:
    """F * (W + R), or W + R without ``f``, in ``dtype``, written into the context's work
    buffers.

    Forward and backward each fold it again instead of keeping a weight-sized copy per
    layer alive between them: the fold path is taken only where a fold costs less than
    passes over the activations, and on CPU every layer writing the same buffer spares
    the page faults of fresh allocations.
    """
    if torch.compiler.is_compiling():  # a compiler plans its own memory
        return layer.rectified_weight(lm, rm, f).to(dtype)
    weight = layer.base.weight

    def scratch(in_dtype: torch.dtype) -> torch.Tensor:
        return layer.context.scratch("rectified_weight", weight.shape, in_dtype, weight.device)

    w_eff = layer.rectified_weight(lm, rm, f, out=scratch(weight.dtype))
    return w_eff if w_eff.dtype == dtype else scratch(dtype).copy_(w_eff)


def _masked_weight(scores: torch.Tensor, weight: torch.Tensor, threshold: float,
                   dtype: torch.dtype) -> torch.Tensor:
    """W * 1[S > threshold] in ``dtype``: a new tensor, which the caller drops as soon as
    its op has run.

    The comparison writes its 0/1 result straight into a float tensor, which is then
    multiplied by W in place: on CPU much faster than ``torch.where`` over a bool tensor
    (see benchmarks/RESULTS.md). It is not written into a work buffer kept across layers:
    such a buffer stays alive through the whole step and adds the largest layer's
    weight to the peak, above fine-tuning's (the "heap vs ft" column of
    ``benchmarks/speed.py``). On CPU the new tensors can cost page faults instead.
    """
    if torch.compiler.is_compiling():  # a compiler fuses this itself
        return torch.where(scores > threshold, weight, 0).to(dtype)
    return torch.gt(scores, threshold, out=torch.empty_like(scores)).mul_(weight).to(dtype)


class _Masked(torch.autograd.Function):
    """See :func:`masked`."""

    @staticmethod
    def forward(ctx, x, scores, threshold: float, layer):
        base = layer.base
        dtype = compute_dtype(x, base.weight)
        with autocast_off(x):
            xc = cast(x, dtype)
            y = layer.op(xc, _masked_weight(scores, base.weight, threshold, dtype),
                         None if base.bias is None else cast(base.bias, dtype))
        ctx.layer, ctx.threshold, ctx.dtype = layer, threshold, dtype
        ctx.save_for_backward(xc, scores)
        return y

    @staticmethod
    def backward(ctx, g):
        xc, scores = ctx.saved_tensors
        op, weight, g = ctx.layer.op, ctx.layer.base.weight, g.to(ctx.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            dx, _ = op.grads(g, xc, _masked_weight(scores, weight, ctx.threshold, ctx.dtype),
                             True, False)
        # the masked weight is freed before dL/dS is allocated: like fine-tuning, which
        # holds dL/dW, the layer holds one weight-sized tensor at a time
        _, dw = op.grads(g, xc, weight, False, True)
        return dx, dw.to(scores.dtype).mul_(weight), None, None  # autograd casts dx


def masked(layer, x: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Piggyback training output y = (W * 1[S > threshold]) x + b of ``layer`` (a
    :class:`PiggybackLayer`); x: (..., in) or (N, in, H, W), scores: W's shape."""
    return _Masked.apply(x, scores, threshold, layer)
