"""Process-wide settings that make CPU inference fast.

glibc serves blocks above 128 KiB-32 MiB with mmap and returns them to the kernel on free,
so every batch page-faults its activation buffers in afresh; on this project's 2-core VM
that made MobileNet-V2 bf16 2.6x slower (131 vs 341 img/s, benchmarks/extract_throughput.py
history in the README). Raising the mmap and trim thresholds keeps freed blocks for reuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_BYTES = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc malloc to reuse freed large blocks instead of unmapping them (once)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): nothing to tune
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
