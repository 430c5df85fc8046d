"""RKR's rank-K rectification applied to activations, R x = B (A x), as thin matmuls.

R never has to be formed: it is a product of a (rank x in) map A and an (out x rank) map
B. Both stages and their gradients are written as matmuls over the channel axis, which
read each activation once (thin convolutions with K output channels are far slower
than that on CPU backends). A path gives:

* ``kernels(lm, rm) -> (A, B^T)`` and the inverse map of gradients ``kernel_grads``;
* ``first(x, A) -> z`` (K channels per part), ``add_second(y, z, B^T)`` (y += B z in
  place);
* ``second_grads(g, z, B^T) -> (dL/dz, dL/dB^T)`` and ``first_grads(dz, x, A, dx=None)
  -> dL/dA`` for the output gradient g; ``first_grads`` adds the path's dL/dx to ``dx``
  in place when given.

A and B^T are contiguous with the rank axis first, and every thin product is computed
with the rank axis as its leading (row) axis: on CPU, (K x n) @ (n x P) runs about
twice as fast as the same product written as (P x n) @ (n x K) (measured in
benchmarks/RESULTS.md).

Linear (``n_split`` parts, e.g. q, k, v of a fused qkv): A (s*K, in) stacks the parts'
LM^T, B^T (s*K, out) is block-diagonal in the parts' RM; z is kept transposed, z^T
(s*K, P) over the P positions, and so is dL/dz.

Conv2d, with the factor layout of :mod:`.rkr` (R is a sum of K separable kernels):
A (k_h*K, in) maps the input to k_h*K maps, one per kernel row a; z sums them shifted by
a rows (the base's vertical stride, dilation and padding): z is the (k_h x 1)
convolution of x. B (out, k_w*K) maps the k_w horizontally shifted copies of z (the
base's horizontal stride and dilation) to the output: the (1 x k_w) convolution of z.
The shifts act on K-channel maps only. Inputs are used in NCHW layout (others are made
contiguous for the rank path).
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F


class LinearRankPath:
    """R x for a Linear split into ``n_split`` parts along its outputs."""

    def __init__(self, base: nn.Linear, rank: int, n_split: int):
        self.rank, self.n_split = rank, n_split
        self.part = base.out_features // n_split

    def kernels(self, lm: torch.Tensor, rm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LM (s, in, K), RM (s, K, out/s) -> A (s*K, in), B^T (s*K, out), contiguous."""
        s, n_in, k = lm.shape
        bt = rm[0] if s == 1 else torch.block_diag(*rm)
        return lm.transpose(1, 2).reshape(s * k, n_in).contiguous(), bt

    def kernel_grads(self, d_a: torch.Tensor, d_bt: torch.Tensor):
        """(dL/dA, dL/dB^T) -> (dL/dLM, dL/dRM): the diagonal blocks of dL/dB."""
        s, k, p = self.n_split, self.rank, self.part
        d_lm = d_a.view(s, k, -1).transpose(1, 2)
        blocks = d_bt.view(s, k, s, p).diagonal(dim1=0, dim2=2)  # (K, out/s, s)
        return d_lm, blocks.permute(2, 0, 1)

    def first(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> z^T = A x^T, (s*K, P)."""
        return a @ x.reshape(-1, x.shape[-1]).T

    def add_second(self, y: torch.Tensor, zt: torch.Tensor, bt: torch.Tensor) -> None:
        y.view(-1, y.shape[-1]).addmm_(zt.T, bt)

    def second_grads(self, g: torch.Tensor, zt: torch.Tensor, bt: torch.Tensor):
        """-> ((dL/dz)^T (s*K, P), dL/dB^T (s*K, out))."""
        g2 = g.reshape(-1, g.shape[-1])
        return bt @ g2.T, zt @ g2

    def first_grads(self, dzt: torch.Tensor, x: torch.Tensor, a: torch.Tensor,
                    dx: torch.Tensor | None = None) -> torch.Tensor:
        if dx is not None:
            dx.view(-1, dx.shape[-1]).addmm_(dzt.T, a)
        return dzt @ x.reshape(-1, x.shape[-1])


class ConvRankPath:
    """R x for a Conv2d (groups 1, integer padding, zero padding mode)."""

    def __init__(self, base: nn.Conv2d, rank: int):
        self.rank = rank
        (self.kh, self.kw), (self.sh, self.sw) = base.kernel_size, base.stride
        (self.ph, self.pw), (self.dh, self.dw) = base.padding, base.dilation

    def kernels(self, lm: torch.Tensor, rm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LM (1, k_h*in, K) rows (a, i), RM (1, K, k_w*out) columns (b, o) ->
        A (k_h*K, in) rows (a, r), B^T (k_w*K, out) rows (b, r), contiguous."""
        k = self.rank
        a = lm[0].view(self.kh, -1, k).transpose(1, 2).reshape(self.kh * k, -1)
        bt = rm[0].view(k, self.kw, -1).transpose(0, 1).reshape(self.kw * k, -1)
        return a.contiguous(), bt.contiguous()

    def kernel_grads(self, d_a: torch.Tensor, d_bt: torch.Tensor):
        k = self.rank
        d_lm = d_a.view(self.kh, k, -1).transpose(1, 2).reshape(1, -1, k)
        d_rm = d_bt.view(self.kw, k, -1).transpose(0, 1).reshape(1, k, -1)
        return d_lm, d_rm

    def _row_slices(self, h_out: int):
        """For each kernel row a: the padded-input rows that output rows 0..h_out-1 read."""
        span = self.sh * (h_out - 1) + 1
        return [slice(a * self.dh, a * self.dh + span, self.sh) for a in range(self.kh)]

    def _col_slices(self, w_out: int):
        span = self.sw * (w_out - 1) + 1
        return [slice(b * self.dw, b * self.dw + span, self.sw) for b in range(self.kw)]

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        """The base convolution's output height and width for an H x W input."""
        return ((h + 2 * self.ph - self.dh * (self.kh - 1) - 1) // self.sh + 1,
                (w + 2 * self.pw - self.dw * (self.kw - 1) - 1) // self.sw + 1)

    def first(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """x (N, in, H, W) -> z (N, K, H_out, W + 2 p_w): the (k_h x 1) convolution."""
        n, c, h, w = x.shape
        k = self.rank
        maps = torch.matmul(a, x.contiguous().view(n, c, h * w)).view(n, -1, h, w)
        maps = F.pad(maps, (self.pw, self.pw, self.ph, self.ph))
        rows = self._row_slices(self.out_size(h, w)[0])
        shifted_rows = (maps[:, i * k:(i + 1) * k, r] for i, r in enumerate(rows))
        return functools.reduce(torch.add, shifted_rows)

    def _shifted(self, z: torch.Tensor, w_out: int) -> torch.Tensor:
        """z -> its k_w horizontally shifted copies, (N, k_w*K, H_out * W_out)."""
        n = z.shape[0]
        return torch.cat([z[..., c] for c in self._col_slices(w_out)], 1).view(n, -1, z.shape[2] * w_out)

    def add_second(self, y: torch.Tensor, z: torch.Tensor, bt: torch.Tensor) -> None:
        n, o, h_out, w_out = y.shape
        y.view(n, o, h_out * w_out).baddbmm_(bt.T.expand(n, o, -1), self._shifted(z, w_out))

    def second_grads(self, g: torch.Tensor, z: torch.Tensor, bt: torch.Tensor):
        n, o, h_out, w_out = g.shape
        g3 = g.contiguous().view(n, o, h_out * w_out)
        shifted = self._shifted(z, w_out)
        d_bt = torch.matmul(shifted, g3.transpose(1, 2)).sum(0)
        d_shifted = torch.matmul(bt, g3).view(n, self.kw, self.rank, h_out, w_out)
        dz = torch.zeros_like(z)
        for i, c in enumerate(self._col_slices(w_out)):
            dz[..., c].add_(d_shifted[:, i])  # in place: `+=` on an index also copies back
        return dz, d_bt

    def first_grads(self, dz: torch.Tensor, x: torch.Tensor, a: torch.Tensor,
                    dx: torch.Tensor | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        k = self.rank
        d_maps = dz.new_zeros(n, self.kh * k, h + 2 * self.ph, w + 2 * self.pw)
        for i, r in enumerate(self._row_slices(dz.shape[2])):
            d_maps[:, i * k:(i + 1) * k, r].add_(dz)
        d_maps = d_maps[:, :, self.ph:self.ph + h, self.pw:self.pw + w].reshape(n, -1, h * w)
        d_a = torch.matmul(d_maps, x.contiguous().view(n, c, h * w).transpose(1, 2)).sum(0)
        if dx is not None:  # any memory layout (channels-last included)
            dx += torch.matmul(a.T, d_maps).view(n, c, h, w)
        return d_a


def make_rank_path(base: nn.Linear | nn.Conv2d, rank: int, n_split: int):
    if isinstance(base, nn.Linear):
        return LinearRankPath(base, rank, n_split)
    return ConvRankPath(base, rank)
