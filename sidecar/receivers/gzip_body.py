"""Bounded gzip decompression for request bodies: linear time, bounded output, bounded members.

RFC 1952 allows a body of many gzip members. Decompressing member after member by
slicing ``unused_data`` copies the rest of the body each time: a 5 MB body of 23-byte
members cost 25 s of CPU. Here each member is fed from a moving offset in chunks,
so the work is linear in the body, and a body of more than ``max_members`` members
is refused (no OTLP client sends more than one).
"""

from __future__ import annotations

import zlib

_CHUNK = 64 * 1024


class GzipError(ValueError):
    """The body is not acceptable gzip; ``too_large`` says whether it was only too big."""

    def __init__(self, message: str, *, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


def gunzip(body: bytes, limit: int, max_members: int = 64) -> bytes:
    """The decompressed body, or :class:`GzipError` once it would exceed ``limit`` bytes or is invalid."""
    view = memoryview(body)
    out: list[bytes] = []
    size = 0
    pos = 0
    members = 0
    try:
        while pos < len(view):
            members += 1
            if members > max_members:
                raise GzipError(f"more than {max_members} gzip members")
            d = zlib.decompressobj(wbits=31)
            while not d.eof:
                if pos >= len(view):
                    raise GzipError("truncated")
                chunk = view[pos:pos + _CHUNK]
                part = d.decompress(chunk, limit + 1 - size)
                size += len(part)
                if size > limit:
                    raise GzipError(f"decompressed body exceeds {limit} bytes", too_large=True)
                out.append(part)
                while d.unconsumed_tail and not d.eof:  # output was capped: drain what this chunk holds
                    part = d.decompress(d.unconsumed_tail, limit + 1 - size)
                    size += len(part)
                    if size > limit:
                        raise GzipError(f"decompressed body exceeds {limit} bytes", too_large=True)
                    out.append(part)
                pos += len(chunk) - len(d.unused_data) - len(d.unconsumed_tail)
    except zlib.error as e:
        raise GzipError(str(e)) from None
    if members == 0:
        raise GzipError("empty body")
    return b"".join(out)
