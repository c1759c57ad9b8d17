"""Keeps large transient buffers from pinning memory after a big upload.

glibc raises its mmap threshold to the size of the largest block freed (up to 32 MiB), so
after the first 8 MiB multipart buffer is freed, later ones come from malloc arenas, which
keep the memory (one arena per thread) long after the upload ended: measured here as
~100 MiB above idle during a 1 GiB upload. A fixed 4 MiB threshold sends blocks of 4 MiB
and more straight to mmap, so they go back to the OS when freed; smaller ones (1 MiB
messages) reuse arena memory, of which each arena keeps at most 8 MiB free at its top
(the trim threshold) so hot buffers are reused instead of faulted in again. Together:
~80-90 MiB above idle during a 1 GiB upload (see bench/storage.py). The settings are
process-wide; they only affect how memory is obtained, never correctness, and are skipped
where glibc is not the allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["LARGE_BLOCK_BYTES", "return_large_buffers_to_os"]

LARGE_BLOCK_BYTES = 4 * 1024 * 1024
# Free memory at the top of a heap that malloc keeps instead of returning it at once:
# room for a few 1 MiB messages. 32 MiB was no faster here and put a 1 GiB upload at
# ~115 MiB above idle; 8 MiB keeps it near 80.
KEPT_FREE_BYTES = 8 * 1024 * 1024
_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_log = logging.getLogger(__name__)


def return_large_buffers_to_os(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Fixes glibc's mmap threshold at `threshold` bytes and its trim threshold at
    `KEPT_FREE_BYTES`; False if not glibc or either was refused."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    # Fixing the mmap threshold also pins the trim threshold at glibc's 128 KiB default, so
    # every freed 1 MiB message was handed back to the kernel and the next one faulted its
    # pages in afresh: measured as a third of the upload path's CPU. Keeping a bounded
    # amount free lets those buffers be reused while they are hot.
    applied = bool(mallopt(_M_TRIM_THRESHOLD, KEPT_FREE_BYTES)) and applied
    _log.debug(
        "malloc mmap threshold %d, trim threshold %d bytes: %s", threshold, KEPT_FREE_BYTES, applied
    )
    return applied
