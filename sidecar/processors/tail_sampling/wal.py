"""The write-ahead log under tail sampling's durable buffer: segment files of received requests.

Layout, in the processor's own directory under the ``file_storage`` extension (0700)::

    .lock                        flock: one process per log directory
    00000000000000000007.wal     a segment (0600): magic, then records
    00000000000000000008.wal     the segment being written

A record is ``>IIBI`` (payload length, crc32 of the payload, signal code, item count) and
the request's wire encoding. Appends from concurrent receivers are *group-committed*:
each writes its record under the lock (a copy into the page cache), and one of the
waiting writers runs a single ``fdatasync`` that covers every record written before it
started; the others wait for it (:mod:`sidecar.group_commit`, by ticket: a writer whose
record a sync already covered returns without one). So the cost of a sync is shared by
everyone who arrived while the previous one ran.

Segments are kept by *pins* (a count per segment). Whoever still needs the data of a
segment pins the lowest segment it needs; since data only ever depends on older data,
a pin keeps that segment and every newer one. The oldest segments are deleted as soon as
they hold no pin and a newer segment exists (or nothing is pinned at all). A torn last
record (a crash mid-write, never acknowledged) ends a segment's replay; a damaged record
elsewhere ends it too, and is logged.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import struct
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from sidecar.component import Refused
from sidecar.gil_io import crc32, write_all
from sidecar.group_commit import GroupCommit, Member
from sidecar.signals import Signal

log = logging.getLogger(__name__)

_MAGIC = b"TSWAL01\n"
_REC = struct.Struct(">IIBI")  # payload length, crc32 of payload, signal code, item count
_CODES = {Signal.TRACES: 0, Signal.LOGS: 1}
_SIGNALS = {v: k for k, v in _CODES.items()}
_NAME = re.compile(r"^(\d{20})\.wal$")
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
#: a segment older than this (seconds) is closed at the next append, so decided data is deleted soon
SEGMENT_AGE = 1.0


class LogLocked(RuntimeError):
    """Another process already owns this log directory."""


class Segment:
    __slots__ = ("index", "path", "fd", "size", "opened", "refs", "sealed", "fd_lock")

    def __init__(self, index: int, path: Path, fd: int | None, size: int, opened: float, sealed: bool):
        self.index, self.path, self.fd, self.size, self.opened = index, path, fd, size, opened
        self.refs = 0
        self.sealed = sealed
        self.fd_lock = threading.Lock()  # a sync and the close of this fd never overlap


class WriteAheadLog:
    """Segments of ``(signal, items, encoded request)`` records; see the module docstring."""

    def __init__(self, directory: str | os.PathLike, *, max_bytes: int, segment_bytes: int, fsync: bool = True,
                 clock: Callable[[], float] = time.monotonic, on_sync: Callable[[], object] = lambda: None):
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._fsync = fsync
        self._clock = clock
        self._on_sync = on_sync
        self._lock = threading.Lock()  # segments, current, counters
        self._segments: dict[int, Segment] = {}  # live segments by index, oldest first
        self._current: Segment | None = None
        self._next_index = 0
        self.stored_bytes = 0
        self._written = 0  # records written (tickets)
        self._synced = 0  # records known durable
        #: (synced, written) when an fdatasync failed: the tickets in between are never acknowledged
        self._lost: list[tuple[int, int]] = []
        # a sync covers every ticket up to what was written when it began; a failed one fails only its writer
        self._group_commit: GroupCommit[int, None] = GroupCommit(
            self._sync, covered=self._covered, on_commit=on_sync)
        self._lock_fd: int | None = None
        self._dir_fd: int | None = None

    # --- opening and recovery -------------------------------------------------------------------

    def open(self) -> list[int]:
        """Lock the directory and index what a previous run left; returns those segments' indexes, oldest first.

        Each returned segment holds one pin for its replay: :meth:`unpin` it once its records are
        re-buffered (the buffered traces pin what they still need).
        """
        d = self.directory
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        self._lock_fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise LogLocked(f"tail sampling log directory {d} is in use by another process") from None
        self._dir_fd = os.open(d, os.O_RDONLY | os.O_CLOEXEC)
        found = []
        for entry in os.scandir(d):
            m = _NAME.match(entry.name)
            if m:
                found.append((int(m.group(1)), entry))
        now = self._clock()
        for index, entry in sorted(found):
            seg = Segment(index, Path(entry.path), None, entry.stat().st_size, now, sealed=True)
            seg.refs = 1  # the replay pin
            self._segments[index] = seg
            self.stored_bytes += seg.size
        self._next_index = found[-1][0] + 1 if found else 0
        return [i for i, _ in sorted(found)]

    def records(self, index: int) -> Iterator[tuple[Signal, int, bytes]]:
        """The records of a segment left by a previous run: (signal, items, encoded request)."""
        seg = self._segments[index]
        data = seg.path.read_bytes()
        if not data.startswith(_MAGIC):
            log.warning("%s: not a tail sampling log segment (bad magic); skipped", seg.path)
            return
        pos, end = len(_MAGIC), len(data)
        while pos < end:
            if end - pos < _REC.size:
                log.warning("%s: torn record header at byte %d (a write cut by the crash, never acknowledged)",
                            seg.path, pos)
                return
            n, crc, code, items = _REC.unpack_from(data, pos)
            start = pos + _REC.size
            payload = data[start:start + n]
            if len(payload) < n or code not in _SIGNALS:
                log.warning("%s: torn record at byte %d (a write cut by the crash, never acknowledged)", seg.path, pos)
                return
            if crc32(payload) != crc:
                log.warning("%s: checksum mismatch at byte %d; the rest of this segment (%d bytes) is unreadable",
                            seg.path, pos, end - pos)
                return
            yield _SIGNALS[code], items, payload
            pos = start + n

    # --- appending ------------------------------------------------------------------------------

    def write(self, signal: Signal, items: int, payload: bytes) -> tuple[int, int]:
        """Write one record and pin its segment once (:meth:`unpin` it when done); returns (segment index,
        ticket for :meth:`commit`).

        Raises :class:`Refused` (retryable) while the log is at ``max_bytes`` or the disk is full.
        """
        n = _REC.size + len(payload)
        header = _REC.pack(len(payload), crc32(payload), _CODES[signal], items)
        with self._lock:
            if self._dir_fd is None:
                raise Refused("shutting_down", message="tail sampling log is closed")
            if n > self.max_bytes:
                raise Refused("request_too_large", retryable=False,
                              message=f"a {len(payload)}-byte request exceeds tail_sampling.wal.max_bytes")
            if self.stored_bytes + n > self.max_bytes:
                raise Refused("storage_full", message=f"tail sampling log holds {self.stored_bytes} bytes of "
                              f"undecided data (wal.max_bytes {self.max_bytes})")
            seg = self._current
            try:
                if seg is None or (seg.size > len(_MAGIC) and (seg.size + n > self.segment_bytes
                                                               or self._clock() - seg.opened > SEGMENT_AGE)):
                    seg = self._roll()
                try:
                    write_all(seg.fd, header, payload)
                except OSError:
                    self._cut(seg)
                    raise
            except OSError as e:
                raise _refusal(e, self.directory) from e
            seg.size += n
            seg.refs += 1
            self.stored_bytes += n
            self._written += 1
            return seg.index, self._written

    def _cut(self, seg: Segment) -> None:
        """After a failed write: cut the segment back to its last whole record, so the records appended
        after it stay readable; if even that fails, close the segment (synced) and start a new one."""
        try:
            os.ftruncate(seg.fd, seg.size)
            return
        except OSError:
            pass
        try:
            if self._fsync:
                with seg.fd_lock:
                    os.fdatasync(seg.fd)
        except OSError:
            pass
        seg.sealed = True
        self._current = None

    def commit(self, ticket: int) -> None:
        """Return once the record with ``ticket`` is on disk: join the sync in progress or run the next one.

        Raises :class:`Refused` (retryable) when the sync fails: the request was not acknowledged.
        """
        if not self._fsync:
            return
        self._group_commit.join(ticket)
        if self._lost and any(lo < ticket <= hi for lo, hi in self._lost):
            raise Refused("storage_error", message=f"cannot log request: an fdatasync in {self.directory} failed "
                          "before it was on disk; a later sync does not prove it is")

    def _sync(self, members: list[Member[int, None]]) -> None:
        """One fdatasync of the newest segment (older ones were synced when sealed): it covers every record
        written before it began, whoever waits for them."""
        with self._lock:
            target, seg = self._written, self._current
        try:
            if seg is not None:
                with seg.fd_lock:
                    if seg.fd is not None:  # else deleted meanwhile: nothing in it is needed any more
                        os.fdatasync(seg.fd)
        except OSError as e:
            # After a failed fdatasync the kernel may have dropped those pages and marked them clean: a later
            # sync can succeed without them. Every record this sync was to cover is refused (its writer
            # resends), and new records go to a fresh segment whose syncs mean what they say.
            with self._lock:  # up to what is written now: records written while it ran share its fate
                self._lost.append((self._synced, self._written))
                if len(self._lost) > _LOST_RANGES:  # failures are rare; merging only refuses more
                    (lo, _), (_, hi) = self._lost[0], self._lost[1]
                    self._lost[:2] = [(lo, hi)]
                if seg is not None and seg is self._current:
                    seg.sealed = True
                    self._current = None
            raise _refusal(e, self.directory) from e
        self._synced = max(self._synced, target)

    def _covered(self, ticket: int) -> bool:
        return ticket <= self._synced

    @property
    def syncs(self) -> int:
        """fdatasync calls that committed (group commits)."""
        return self._group_commit.commits - self._group_commit.failed

    def _roll(self) -> Segment:
        """Seal the current segment (synced, so commits need only sync the newest) and open the next."""
        old = self._current
        if old is not None:
            if self._fsync:
                with old.fd_lock:
                    os.fdatasync(old.fd)
            old.sealed = True
        index = self._next_index
        path = self.directory / f"{index:020d}.wal"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, _MAGIC, b"")
            if self._fsync:
                os.fsync(self._dir_fd)
        except OSError:
            os.close(fd)
            _unlink(path)
            raise
        self._next_index += 1
        seg = self._current = self._segments[index] = Segment(index, path, fd, len(_MAGIC), self._clock(), False)
        self.stored_bytes += seg.size
        return seg

    # --- pins -----------------------------------------------------------------------------------

    def pin(self, index: int | None = None, n: int = 1) -> int:
        """Pin segment ``index`` ``n`` times (default: the oldest live one, a safe lower bound); returns the
        index pinned."""
        with self._lock:
            seg = self._segments.get(index) if index is not None else None
            if seg is None:
                seg = next(iter(self._segments.values()), None) or self._roll()
            seg.refs += n
            return seg.index

    def unpin(self, index: int, n: int = 1) -> None:
        """Drop ``n`` pins of segment ``index``; delete the oldest segments nothing needs any more."""
        self.unpin_many({index: n})

    def unpin_many(self, counts: dict[int, int]) -> None:
        """Drop pins (segment index -> how many) under one lock; delete the oldest segments nothing needs."""
        doomed = []
        with self._lock:
            freed = False
            for index, n in counts.items():
                seg = self._segments.get(index)
                if seg is not None and n:
                    seg.refs -= n
                    freed = freed or seg.refs <= 0
            if not freed:
                return
            segs = self._segments
            while segs:
                oldest = next(iter(segs.values()))
                if oldest.refs > 0:
                    break
                if oldest is self._current:
                    if len(segs) > 1:
                        break
                    self._current = None  # nothing pinned anywhere: the newest can go too
                del segs[oldest.index]
                self.stored_bytes -= oldest.size
                doomed.append(oldest)
        for seg in doomed:
            _close(seg)
            _unlink(seg.path)

    @property
    def segments(self) -> int:
        return len(self._segments)

    # --- closing --------------------------------------------------------------------------------

    def close(self) -> None:
        """Close every file; segments still pinned stay on disk for the next start."""
        with self._lock:
            segs = list(self._segments.values())
            self._segments.clear()
            self._current = None
            lock_fd, dir_fd = self._lock_fd, self._dir_fd
            self._lock_fd = self._dir_fd = None
            self.stored_bytes = 0
        # a pin keeps its segment and every newer one (newer data may belong to the pinned traces)
        pinned = [s.index for s in segs if s.refs > 0]
        keep_from = min(pinned) if pinned else None
        left = 0
        for seg in segs:
            if self._fsync and seg.fd is not None and not seg.sealed:
                with seg.fd_lock:
                    os.fdatasync(seg.fd)
            _close(seg)
            if keep_from is not None and seg.index >= keep_from:
                left += 1
            else:
                _unlink(seg.path)
        if left:
            log.info("%s: %d segments of undecided data stay on disk for the next start", self.directory, left)
        for fd in (dir_fd, lock_fd):
            if fd is not None:
                os.close(fd)


    def abandon(self) -> None:
        """Let go of every file and delete nothing, as ``kill -9`` would (tests simulate crashes with it)."""
        with self._lock:
            segs = list(self._segments.values())
            self._segments.clear()
            self._current = None
            fds = [self._dir_fd, self._lock_fd]
            self._lock_fd = self._dir_fd = None
        for seg in segs:
            _close(seg)
        for fd in fds:
            if fd is not None:
                os.close(fd)


_LOST_RANGES = 16


def _refusal(e: OSError, directory: Path) -> Refused:
    if e.errno in _DISK_FULL:
        return Refused("disk_full", message=f"cannot log request: {e.strerror} ({directory})")
    return Refused("storage_error", message=f"cannot log request: {e}")


def _close(seg: Segment) -> None:
    with seg.fd_lock:
        if seg.fd is not None:
            os.close(seg.fd)
            seg.fd = None


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
