"""Reused I/O buffers and scatter lists, and the sizes of one read or copy call.

Fresh memory is slow to touch on these VMs (page faults at ~1.4 GB/s), so the reader and the writer
copy through per-process buffers that stay mapped, and reuse the scatter lists (preadv iovecs) built
over them. The sizes are module attributes, read at each call, so tests can shrink them.
"""

from __future__ import annotations

import os
from collections.abc import Callable

COPY_CHUNK = 1 << 30  # the most one pread / copy_file_range / sendfile call moves
FALLBACK_CHUNK = 256 << 10  # pread/write copies and the smallest scratch buffer

try:
    IOV_MAX = max(3, min(1024, os.sysconf("SC_IOV_MAX")))
except (ValueError, OSError, AttributeError):
    IOV_MAX = 1024

_scratch: dict[tuple[int, str], bytearray] = {}
# Scatter lists by (buffers, geometry): chunks reuse the same buffers, so lists are reused too.
_iov_cache: dict[tuple[object, ...], list[memoryview]] = {}


def scratch(n: int, slot: str = "copy") -> memoryview:
    """A per-process, per-slot reusable buffer of at least n bytes. Users of one slot must not nest."""
    key = (os.getpid(), slot)
    buf = _scratch.get(key)
    if buf is None or len(buf) < n:
        if len(_scratch) > 8:
            _scratch.clear()  # buffers of a parent process after fork
        buf = _scratch[key] = bytearray(max(n, FALLBACK_CHUNK))
    return memoryview(buf)


def cached_iov(key: tuple[object, ...], build: Callable[[], list[memoryview]]) -> list[memoryview]:
    """The scatter list for `key`, built once while the buffers it views stay the same."""
    iov = _iov_cache.get(key)
    if iov is None:
        if len(_iov_cache) > 64:
            _iov_cache.clear()
        iov = _iov_cache[key] = build()
    return iov
