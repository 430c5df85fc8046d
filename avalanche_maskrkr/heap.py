"""Peak heap in use on CPU during a block of tensor code: for comparing training paths.

The CPU counterpart of ``torch.cuda.max_memory_allocated``: glibc's ``mallinfo2`` gives
the bytes malloc has handed out (heap chunks in use plus mmapped chunks: every tensor,
and everything else the process allocates), sampled after every aten op run in the
block, forward and backward. Unlike the peak resident set size it does not depend on
what the allocator returns to the system, so two runs of the same code give the same
figure. Sampling costs a Python call per op: use it to measure, not to train.
``mallinfo2`` counts the main thread's heap and every thread's mmapped chunks, not the
heaps glibc gives other threads: run the block with one torch thread
(``torch.set_num_threads(1)``) for a complete figure.
"""
from __future__ import annotations

import ctypes
import ctypes.util

from torch.utils._python_dispatch import TorchDispatchMode


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


def _libc():
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return libc


def heap_peak_available() -> bool:
    """Whether this C library can report the heap in use (glibc 2.33 or later)."""
    return _libc() is not None


class HeapPeak(TorchDispatchMode):
    """``with HeapPeak() as heap: ...`` then ``heap.peak``: the most bytes in use at the
    end of any aten op of the block, above those in use when it was entered."""

    def __init__(self):
        super().__init__()
        self._libc = _libc()
        if self._libc is None:
            raise RuntimeError("HeapPeak needs glibc's mallinfo2 (glibc 2.33 or later)")
        self.start = self.peak = 0

    def in_use(self) -> int:
        info = self._libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def __enter__(self):
        self.start, self.peak = self.in_use(), 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.in_use() - self.start)
        return out
