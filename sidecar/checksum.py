"""CRC-32 of a log record or a queued request, computed without handing the GIL over.

``zlib.crc32`` releases the GIL for data over 5 KiB. In the sidecar, other threads are waiting for
the GIL, so every release wakes one of them and the caller then waits to get it back: two context
switches around a few dozen microseconds of work, 1% of the shipped default's CPU (docs/benchmarks.md,
thirteenth round). Fed in pieces below that size, zlib keeps the GIL and gives the same value.
"""

from __future__ import annotations

import zlib

#: the largest piece ``zlib.crc32`` checksums with the GIL held (CPython releases it above 5 * 1024 bytes)
PIECE = 5 * 1024


def crc32(data: bytes | bytearray | memoryview) -> int:
    """``zlib.crc32(data)``, in pieces the GIL stays held for."""
    if len(data) <= PIECE:
        return zlib.crc32(data)
    view = memoryview(data)
    crc = 0
    for start in range(0, len(view), PIECE):
        crc = zlib.crc32(view[start:start + PIECE], crc)
    return crc
