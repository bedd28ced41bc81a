"""A log record checksummed and written without handing the GIL over (sidecar/gil_io.py).

The CRC is zlib's, fed in pieces zlib checksums holding the GIL; the write is the C extension's
(sidecar/_gil_io.c) or the os.writev loop, and both put the same bytes in the file and raise the same
errors, including a write cut short by a full disk.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import zlib

import pytest

from sidecar import gil_io

try:
    from sidecar import _gil_io as _c
except ImportError:  # not built: the twin alone is tested
    _c = None

#: a record the C half writes with the GIL released
ABOVE_GIL_HELD = 3 * (_c.GIL_HELD_BYTES if _c is not None else 1 << 20)
WRITERS = [pytest.param(gil_io._write_all, id="python")] + \
    ([pytest.param(_c.write_all, id="c")] if _c is not None else [])


@pytest.mark.parametrize("size", [0, 1, gil_io.PIECE - 1, gil_io.PIECE, gil_io.PIECE + 1,
                                  3 * gil_io.PIECE, 3 * gil_io.PIECE + 17, 200_000])
def test_the_crc_is_zlibs_for_bytes_bytearrays_and_views(size):
    data = os.urandom(size)
    assert gil_io.crc32(data) == zlib.crc32(data)
    assert gil_io.crc32(bytearray(data)) == zlib.crc32(data)
    assert gil_io.crc32(memoryview(data)[0:]) == zlib.crc32(data)


def test_zlib_never_gets_a_piece_big_enough_to_release_the_gil(monkeypatch):
    """CPython's zlib.crc32 releases the GIL above 5 KiB: no call may reach that size."""
    sizes = []
    real = zlib.crc32

    def recording(data, value=0):
        sizes.append(len(data))
        return real(data, value)

    monkeypatch.setattr(gil_io.zlib, "crc32", recording)
    data = os.urandom(150_000)  # a trace request's size in the benchmarks
    assert gil_io.crc32(data) == real(data)
    assert sum(sizes) == len(data)
    assert max(sizes) <= 5 * 1024


@pytest.mark.parametrize("write_all", WRITERS)
@pytest.mark.parametrize("size", [0, 1, 4096, 200_000, ABOVE_GIL_HELD])
def test_header_and_payload_are_written_whole_and_in_order(tmp_path, write_all, size):
    header, payload = b"HEAD" + size.to_bytes(8, "big"), os.urandom(size)
    fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        write_all(fd, header, payload)
        write_all(fd, b"next", memoryview(b"record"))
    finally:
        os.close(fd)
    assert (tmp_path / "log").read_bytes() == header + payload + b"nextrecord"


@pytest.mark.parametrize("write_all", WRITERS)
def test_a_bad_descriptor_raises_oserror_with_its_errno(tmp_path, write_all):
    fd = os.open(tmp_path / "log", os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as e:
            write_all(fd, b"header", b"payload")
        assert e.value.errno == errno.EBADF
    finally:
        os.close(fd)


_CUT_SHORT = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))  # the file cannot grow past 10 000 bytes: a full disk
if sys.argv[2] == "c":
    from sidecar._gil_io import write_all
else:
    from sidecar.gil_io import _write_all as write_all
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
try:
    write_all(fd, b"h" * 100, b"p" * 20_000)
except OSError as e:
    print(e.errno)
"""


@pytest.mark.parametrize("impl", ["python"] + (["c"] if _c is not None else []))
def test_a_write_cut_short_by_a_full_disk_raises_after_writing_what_fitted(tmp_path, impl):
    """The log cuts such a record back (tests/sidecar/tail_sampling/test_durable.py): both halves must raise."""
    out = subprocess.run([sys.executable, "-c", _CUT_SHORT, str(tmp_path / "log"), impl], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert out.strip() == str(errno.EFBIG)
    assert (tmp_path / "log").read_bytes() == b"h" * 100 + b"p" * 9_900


def test_the_facade_writes_with_the_c_half_unless_sidecar_pure_python():
    expect_python = os.environ.get("SIDECAR_PURE_PYTHON") == "1" or _c is None
    assert gil_io.IMPLEMENTATION == ("python" if expect_python else "c")
    assert gil_io.write_all is (gil_io._write_all if expect_python else _c.write_all)
