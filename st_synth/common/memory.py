"""The process's memory: its peak resident size, and handing freed memory back between stages.

glibc's malloc keeps freed blocks of the heap for reuse instead of returning them to the system. Training a
model on the CPU frees and allocates activations of many sizes at every step, so the heap ends training far
larger than what is alive at once (SmolLM2-135M: 5.2 GB resident where 1.5 GB is alive,
``benchmarks/results/cpu-memory.md``), and the next stage starts on top of it. :func:`release_memory`
collects garbage and asks glibc to return the free pages (``malloc_trim``), so each stage's peak is its own;
elsewhere (macOS, musl) it only collects garbage.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from functools import lru_cache

__all__ = ["current_rss_mb", "peak_rss_mb", "release_memory"]


def peak_rss_mb() -> int:
    """The largest resident size this process has had so far (Linux reports KiB, macOS bytes)."""
    import resource  # Unix only: imported where it is used

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024))


def current_rss_mb() -> int | None:
    """The resident size now (Linux's /proc/self/statm), or None where the system does not say."""
    import resource

    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * resource.getpagesize() / 2**20)


@lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_memory() -> bool:
    """Collect garbage, then return the C heap's free pages to the system; True when glibc trimmed."""
    gc.collect()
    trim = _malloc_trim()
    return trim is not None and bool(trim(0))
