"""Keep freed host memory in the process instead of handing it back to the kernel.

A frame's tensors (EfficientNet-Lite0's 96 x 112 x 112 activations are 4.8 MB each) are
allocated and freed on every frame. glibc serves blocks that large with fresh ``mmap``
pages (or trims them off the heap top when freed), so every frame pays thousands of page
faults: on one core, ~2 400 faults and ~9 ms of system time per cfm-tiny frame, about a
fifth of its inference time (docs/benchmarks.md). Raising glibc's mmap and trim
thresholds keeps those blocks on the heap for reuse: ~100 faults, ~2 ms.

The cost is resident memory: the process keeps its peak heap (a few hundred MB for
inference) instead of returning it between frames. Set ``EDGE_RUNTIME_KEEP_HEAP=0`` to
leave glibc's defaults alone. On other C libraries (macOS, Windows, musl) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV_SWITCH = "EDGE_RUNTIME_KEEP_HEAP"
M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's upper limit for this setting on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 1 << 30  # trim the heap top only once 1 GiB is free there

_state: dict[str, bool] = {}


def retain_freed_memory() -> bool:
    """Set glibc's mmap / trim thresholds once per process; True if they are in effect.

    False when switched off by ``EDGE_RUNTIME_KEEP_HEAP=0``, or when the C library is not
    glibc (no ``mallopt``), or when glibc refuses the values.
    """
    if "done" in _state:
        return _state["done"]
    ok = False
    if os.environ.get(ENV_SWITCH, "1") != "0" and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            mallopt = None
        if mallopt is not None:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    _state["done"] = ok
    return ok


__all__ = ["ENV_SWITCH", "retain_freed_memory"]
