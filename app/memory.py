"""Process memory: keep RSS flat when every upload has a different length.

Every clip length is a new tensor shape, and glibc serves the freed activations of one shape to
the next from heaps that fragment as sizes vary, and keeps the freed pages: measured with
``bench.soak``, RSS doubled after 500 random-length requests. The function from ``trimmer`` hands
free pages back to the kernel (glibc ``malloc_trim``); the inference worker calls it once it has
been idle a moment, and every few seconds under steady load. oneDNN's cache of compiled kernels,
one set per input shape, is capped (``default_primitive_cache``). ``bound_growth`` is the older,
stricter opt-in (``BOUND_MEMORY``), which costs throughput.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)

M_ARENA_MAX, M_MMAP_THRESHOLD = -8, -3  # glibc mallopt parameters


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


def trimmer() -> Callable[[], None] | None:
    """A function that returns free heap pages to the kernel, or None when not on glibc."""
    libc = _glibc()
    if libc is None:
        log.info("not glibc: free heap pages are left to the allocator")
        return None
    malloc_trim = libc.malloc_trim
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int

    def trim() -> None:
        malloc_trim(0)

    return trim


# oneDNN keeps compiled kernels for its last 1024 primitives (a conv layer at one input shape);
# ResNet18 needs about 21 per shape, so 256 keeps a dozen shapes (every batch size of a common
# clip length) and bounds what a stream of new lengths can hold.
PRIMITIVE_CACHE = "256"


def default_primitive_cache() -> None:
    """Cap oneDNN's primitive cache unless the user set it; before the first convolution."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", PRIMITIVE_CACHE)


def bound_growth() -> None:
    """Stricter bound, at some throughput cost (measured in the README): a small oneDNN primitive
    cache, a fixed 128 KiB glibc mmap threshold (big tensors go back to the kernel on free) and two
    arenas. Environment variables set by the user win."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_ARENA_MAX" in os.environ:
        return
    libc = _glibc()
    if libc is None:
        log.info("mallopt not available; allocator left as is")
        return
    libc.mallopt(M_ARENA_MAX, 2)
    libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
