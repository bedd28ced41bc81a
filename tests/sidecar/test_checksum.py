"""The records' CRC-32 (sidecar/checksum.py): zlib's value, fed to zlib in pieces it checksums holding the GIL."""

from __future__ import annotations

import os
import zlib

import pytest

from sidecar import checksum


@pytest.mark.parametrize("size", [0, 1, checksum.PIECE - 1, checksum.PIECE, checksum.PIECE + 1,
                                  3 * checksum.PIECE, 3 * checksum.PIECE + 17, 200_000])
def test_the_value_is_zlibs_for_bytes_bytearrays_and_views(size):
    data = os.urandom(size)
    assert checksum.crc32(data) == zlib.crc32(data)
    assert checksum.crc32(bytearray(data)) == zlib.crc32(data)
    assert checksum.crc32(memoryview(data)[0:]) == zlib.crc32(data)


def test_zlib_never_gets_a_piece_big_enough_to_release_the_gil(monkeypatch):
    """CPython's zlib.crc32 releases the GIL above 5 KiB: no call may reach that size."""
    sizes = []
    real = zlib.crc32

    def recording(data, value=0):
        sizes.append(len(data))
        return real(data, value)

    monkeypatch.setattr(checksum.zlib, "crc32", recording)
    data = os.urandom(150_000)  # a trace request's size in the benchmarks
    assert checksum.crc32(data) == real(data)
    assert sum(sizes) == len(data)
    assert max(sizes) <= 5 * 1024
