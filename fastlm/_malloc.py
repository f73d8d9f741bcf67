"""glibc's malloc, told to keep freed memory in a training process.

A training step allocates its activations and gradients and frees them again, hundreds of
tensors from ~100 KB up. glibc serves allocations above its mmap threshold with fresh pages
from the kernel and returns freed heap memory above its trim threshold, so every step pays
page faults to get zeroed pages back: ~300 faults and ~2 ms of system time a step in the
Shakespeare recipe (perf stat), ~8% of its step. With the thresholds raised, the heap keeps
what the step used and the next step reuses it, as the caching allocators of jemalloc/tcmalloc
(which PyTorch's CPU performance guide suggests preloading) do.

Only glibc on Linux: elsewhere (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value (HEAP_MAX_SIZE / 2 on 64-bit)
_TRIM_THRESHOLD = 1 << 30  # freed memory at the top of the heap kept up to 1 GiB
_TOP_PAD = 64 << 20  # the heap grows 64 MiB at a time: fewer brk calls

_done = False


def keep_freed_memory() -> bool:
    """Apply the settings above once per process; True where they took effect."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
        (_M_TOP_PAD, _TOP_PAD)))
    return _done
