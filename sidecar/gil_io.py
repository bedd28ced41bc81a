"""A log record checksummed and written without handing the GIL over.

In the sidecar other threads are waiting for the GIL, so every call that releases it wakes one of
them, and the caller then waits to get it back: two context switches around a few dozen
microseconds of work (docs/benchmarks.md, thirteenth round, counted them with
``benchmarks/gil_census.py``). Tail sampling's log checksums and writes every request it receives,
the persistent queue every batch.

- :func:`crc32`: ``zlib.crc32``, which releases the GIL above 5 KiB, fed in pieces of that size (the
  same value). Pure Python: the same on every path.
- :func:`write_all`: header then payload written to a file descriptor entirely. The C extension
  (``sidecar/_gil_io.c``) writes a record below 1 MiB with the GIL held (a copy into the page cache,
  done under the log's lock: ``os.writev`` released the GIL there and let the other receivers run into
  that lock); the pure-Python twin is the ``os.writev`` loop. Same bytes, same errors
  (``SIDECAR_PURE_PYTHON=1`` selects the twin, as for every accelerator).
"""

from __future__ import annotations

import os
import zlib

from contract.accelerators import choose

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


def _write_all(fd: int, header: bytes, payload: bytes) -> None:
    """``header`` then ``payload``, written entirely (``os.writev`` until done; it releases the GIL)."""
    parts = [memoryview(header), memoryview(payload)] if payload else [memoryview(header)]
    while parts:
        written = os.writev(fd, parts)
        while parts and written >= len(parts[0]):
            written -= len(parts[0])
            parts.pop(0)
        if parts and written:
            parts[0] = parts[0][written:]


_c = choose("sidecar._gil_io", None)
#: write ``header`` then ``payload`` to ``fd`` entirely; OSError on failure (part of it may be written)
write_all = _c.write_all if _c is not None else _write_all
#: "c" or "python", for logs and tests
IMPLEMENTATION = "c" if _c is not None else "python"
