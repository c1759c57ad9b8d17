"""The storage service's allocator setting applies on this (glibc) machine."""

from __future__ import annotations

import ctypes

from storage_service.memory import return_large_buffers_to_os


def test_large_buffers_go_back_to_the_os_on_glibc() -> None:
    assert return_large_buffers_to_os()
    # An 8 MiB block is now mmapped: freeing it must not fail or leak (smoke check).
    block = ctypes.create_string_buffer(8 * 1024 * 1024)
    del block
