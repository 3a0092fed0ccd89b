"""Handing freed memory back to the OS (glibc's malloc_trim): after each block of a compression, after a load."""

from __future__ import annotations

import ctypes
import gc

_LIBC = None


def trim_heap(collect: bool = True) -> None:
    """Hand freed memory back to the OS (glibc only; elsewhere a no-op).

    Each compressed block frees hundreds of MB of activations, H's and solver buffers, and a load frees each layer's
    unpacked copy; glibc keeps much of that in its arenas, so without this the resident size creeps up (SmolLM2 with
    --onload, 32 windows: 1.94 GiB at the last block without the trim, 1.45 GiB with it).
    """
    global _LIBC
    if collect:
        gc.collect()
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 (raises AttributeError on a libc without it)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)
