"""Where glibc serves a block: ``mallinfo2().hblks`` counts the blocks it mapped on their own."""

from __future__ import annotations

import ctypes

import numpy as np


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mallinfo2() -> MallInfo2:
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2()


def mapped_on_its_own(block_bytes: int = 1 << 20) -> int:
    """1 if glibc maps a fresh block of ``block_bytes`` on its own (over its mmap threshold), 0 if from the heap."""
    before = _mallinfo2().hblks
    block = np.ones(block_bytes // 8)
    mapped = _mallinfo2().hblks - before
    del block
    return int(mapped)
