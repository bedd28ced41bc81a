"""The persistent sending queue: one file per accepted request, so a restart or kill -9 loses nothing.

Layout, in the exporter's own directory under the ``file_storage`` extension::

    .lock                                        flock: one process per queue directory
    00000000000000000042-traces-37.otlp         seq, signal, item count; body = header + protobuf
    00000000000000000043-logs-5.otlp.tmp        a write that never finished (cleaned on open)

A put writes a temp file, fsyncs it, renames it into place and fsyncs the directory
before returning, so an acknowledged request survives a power cut. Puts that arrive
together commit as a group (:mod:`sidecar.group_commit`): each writer writes its temp file,
one of them (the leader) fsyncs the group's files, renames them and fsyncs the directory once
for all, and every writer returns after that shared commit — so durability costs one
directory commit per batch of concurrent requests, not one per request, and still comes
before the acknowledgement. A consumer's
``done`` deletes the file only after the request was exported or dropped for good.
The names carry the signal and item count, so the gauges and the drop counter work
without reading bodies; bodies are read back lazily, so a large backlog costs disk,
not memory. A file whose header or checksum does not match is skipped, logged and
counted (dropped, reason ``corrupt``).
"""

from __future__ import annotations

import collections
import errno
import fcntl
import logging
import os
import re
import struct
import threading
from pathlib import Path
from typing import Callable

from google.protobuf.message import DecodeError

from sidecar.component import Refused
from sidecar.envelope import Envelope
from sidecar.gil_io import crc32
from sidecar.group_commit import GroupCommit, Member
from sidecar.private_files import make_private_dir, open_private
from sidecar.signals import Signal
from sidecar.telemetry import ComponentTelemetry

log = logging.getLogger(__name__)

_MAGIC = b"OTQ1"
_HEADER = struct.Struct(">4sII")  # magic, payload length, crc32 of payload
_NAME = re.compile(r"^(\d{20})-(traces|logs|metrics)-(\d+)\.otlp$")
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


class Stored(Envelope):
    """An envelope read back from a queue file; ``key`` names the file to delete once it is done."""

    __slots__ = ("key",)

    def __init__(self, signal: Signal, message, encoded: bytes, items: int, key: str):
        super().__init__(signal, message, encoded=encoded, items=items)
        self.key = key


class StorageLocked(RuntimeError):
    """Another process already owns this queue directory."""


class PersistentQueue:
    persistent = True

    def __init__(self, directory: str | os.PathLike, capacity: int, *, fsync: bool = True,
                 telemetry: ComponentTelemetry | None = None):
        self.capacity = capacity
        self.directory = Path(directory)
        self._fsync = fsync
        self._telemetry = telemetry
        self._cond = threading.Condition()
        self._entries: collections.deque[tuple[str, Signal, int]] = collections.deque()
        self._writing = 0
        self._count = 0
        self._closed = False
        self._aborted = False
        self._out: dict[str, tuple[Signal, int]] = {}  # files handed to a consumer, not settled yet
        self.kept_by_signal: dict[Signal, int] = {}

        make_private_dir(self.directory)
        self._lock_fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._aborted = True  # nothing left for __del__ to close
            raise StorageLocked(f"queue directory {self.directory} is in use by another process") from None
        self._dir_fd = os.open(self.directory, os.O_RDONLY)
        self._next_seq = self._load()
        #: puts arriving together share one commit; its .commits and .committed: puts per fsync'd group
        self.group_commit: GroupCommit[tuple[Path, Path], None] = GroupCommit(self._commit_group)

    def _load(self) -> int:
        """Index what a previous run left, in order; remove half-written temp files."""
        last = -1
        names = []
        for entry in os.scandir(self.directory):
            if entry.name.endswith(".tmp"):
                log.info("%s: removing unfinished write %s", self.directory, entry.name)
                _unlink(entry.path)
                continue
            m = _NAME.match(entry.name)
            if m:
                names.append((int(m.group(1)), entry.name, Signal(m.group(2)), int(m.group(3))))
        for seq, name, signal, items in sorted(names):
            self._entries.append((name, signal, items))
            self._count += items
            last = seq
        if names:
            log.info("%s: resuming %d requests (%d items) left by a previous run",
                     self.directory, len(names), self._count)
        return last + 1

    # --- producer -------------------------------------------------------------------------------

    def put(self, envelope: Envelope) -> None:
        signal, items = envelope.signal, envelope.items
        with self._cond:
            if self._closed:
                raise Refused("shutting_down")
            if len(self._entries) + self._writing >= self.capacity:
                raise Refused("queue_full", message=f"persistent sending queue is full ({self.capacity} requests)")
            seq = self._next_seq
            self._next_seq += 1
            self._writing += 1
        name = f"{seq:020d}-{signal.value}-{items}.otlp"
        try:
            self._write(name, envelope.encoded)
        except OSError as e:
            with self._cond:
                self._writing -= 1
            if e.errno in _DISK_FULL:
                raise Refused("disk_full", message=f"cannot persist request: {e.strerror} ({self.directory})") from e
            raise Refused("storage_error", message=f"cannot persist request: {e}") from e
        with self._cond:
            self._writing -= 1
            self._entries.append((name, signal, items))
            self._count += items
            self._cond.notify()

    def _write(self, name: str, payload: bytes) -> None:
        """Write one request's file; returns once it is durable (committed with its group)."""
        final = self.directory / name
        tmp = self.directory / (name + ".tmp")
        try:
            with open_private(tmp, "wb") as f:
                f.write(_HEADER.pack(_MAGIC, len(payload), crc32(payload)))
                f.write(payload)
            if not self._fsync:
                os.replace(tmp, final)
                return
        except BaseException:
            _unlink(tmp)
            raise
        try:
            self.group_commit.join((tmp, final))
        except OSError as err:  # every writer of the group raises its own copy
            raise OSError(err.errno, err.strerror) from err

    def _commit_group(self, members: list[Member[tuple[Path, Path], None]]) -> None:
        """fsync each file's data, rename each into place, fsync the directory once; on failure remove all."""
        files = [m.item for m in members]
        try:
            for tmp, _ in files:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            for tmp, final in files:
                os.replace(tmp, final)
            os.fsync(self._dir_fd)
        except BaseException:
            for tmp, final in files:
                _unlink(tmp)
                _unlink(final)
            raise


    # --- consumers ------------------------------------------------------------------------------

    def get(self) -> Envelope | None:
        return self._take(block=True)

    def try_get(self) -> Envelope | None:
        return self._take(block=False)

    def _take(self, block: bool) -> Envelope | None:
        while True:
            with self._cond:
                while block and not self._entries and not self._closed and not self._aborted:
                    self._cond.wait()
                if self._aborted or not self._entries:
                    return None
                name, signal, items = self._entries.popleft()
                self._count -= items
                self._out[name] = (signal, items)
            read = self._read(name, signal, items)
            if read is not None:
                request, payload = read
                return Stored(signal, request, payload, items, name)
            with self._cond:
                self._out.pop(name, None)

    def _read(self, name: str, signal: Signal, items: int) -> tuple[object, bytes] | None:
        """The request in a queue file and its encoding; None (counted, logged) when the file is damaged."""
        path = self.directory / name
        problem = None
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None  # already delivered by a run that died before forgetting it in memory
        except OSError as e:
            problem = f"cannot read: {e.strerror}"
        else:
            problem = _check(data)
            if problem is None:
                payload = data[_HEADER.size:]
                try:
                    return signal.request_type.FromString(payload), payload
                except DecodeError as e:
                    problem = f"not a valid {signal.value} request: {e}"
        log.warning("%s: skipping corrupt queue file %s (%s); %d %s lost",
                    self.directory, name, problem, items, signal.item_name)
        if self._telemetry is not None:
            self._telemetry.dropped(signal, items, "corrupt")
        _unlink(path)
        return None

    def settle(self, items: list[Envelope], account: Callable[[], None]) -> bool:
        """Run ``account`` and forget ``items`` if :meth:`abort` has not already counted them as kept on disk."""
        with self._cond:
            out = self._out
            if not all(getattr(e, "key", None) in out for e in items):
                return False
            for e in items:
                del out[e.key]
            account()
            return True

    def done(self, envelope: Envelope) -> None:
        key = getattr(envelope, "key", None)
        if key is not None:
            with self._cond:
                self._out.pop(key, None)  # consumers that never settle (tests, tools) leave nothing behind
            _unlink(self.directory / key)

    # --- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def abort(self) -> list[Envelope]:
        """Stop handing out items; whatever is left stays on disk for the next start."""
        with self._cond:
            if self._aborted:
                return []
            self._closed = self._aborted = True
            self._cond.notify_all()
            left = len(self._entries)
            kept: dict[Signal, int] = {}
            for signal, items in [(s, n) for _, s, n in self._entries] + list(self._out.values()):
                kept[signal] = kept.get(signal, 0) + items
            self._out.clear()
            #: per signal, the items this run leaves on disk: waiting, and handed out but not settled
            self.kept_by_signal = kept
        if left:  # the exporter's shutdown reports the items, those handed to workers included
            log.debug("%s: %d waiting requests stay on disk for the next start", self.directory, left)
        os.close(self._dir_fd)
        os.close(self._lock_fd)  # releases the flock
        return []

    @property
    def closed(self) -> bool:
        return self._closed

    def size(self) -> int:
        return len(self._entries)

    def item_count(self) -> int:
        return self._count

    def __del__(self) -> None:
        # a last resort for a queue dropped without abort() (a simulated crash): it is freed by the cycle
        # collector (it and its GroupCommit refer to each other), and must not keep its lock after that
        if not getattr(self, "_aborted", True):
            for attr in ("_dir_fd", "_lock_fd"):
                fd = getattr(self, attr, None)
                if fd is not None:
                    try:
                        os.close(fd)
                    except OSError:
                        pass


def _check(data: bytes) -> str | None:
    if len(data) < _HEADER.size:
        return "truncated header"
    magic, length, crc = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        return "bad magic"
    if len(data) - _HEADER.size != length:
        return f"truncated body ({len(data) - _HEADER.size} of {length} bytes)"
    if crc32(memoryview(data)[_HEADER.size:]) != crc:
        return "checksum mismatch"
    return None


def _unlink(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
