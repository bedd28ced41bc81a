"""``file``: OTLP/JSON lines, one request per line, in traces.jsonl / logs.jsonl / metrics.jsonl.

The embedded default backend and the audit trail: each line round-trips with
``sidecar.otlp_json.from_json``. Files rotate by size (``traces.jsonl.1`` is the newest
backup). It runs behind the same queue and retry as network exporters; a write
error such as a full disk is retryable, and the partial line it may leave is cut off.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import BinaryIO

from pydantic import Field

from sidecar import otlp_json
from sidecar.component import Kind, RetryableError
from sidecar.config import ConfigModel, Duration
from sidecar.exporters.base import BaseExporter, ExporterConfig
from sidecar.private_files import make_private_dir, open_private
from sidecar.registry import CreateSettings, Factory
from sidecar.envelope import Envelope
from sidecar.signals import Signal
from sidecar.ticker import Ticker


class RotationConfig(ConfigModel):
    max_megabytes: float = Field(100, gt=0)
    #: rotated files kept (traces.jsonl.1 ... .N); 0 keeps none
    max_backups: int = Field(5, ge=0)


class FileExporterConfig(ExporterConfig):
    directory: str
    rotation: RotationConfig = Field(default_factory=RotationConfig)
    #: 0 flushes after every request, so "exported" means handed to the OS; a longer interval
    #: batches writes, and lines still buffered when a write fails are lost
    flush_interval: Duration = 0.0


class _JsonLinesFile:
    """One signal's file: append, flush, rotate, and undo a failed write. Thread-safe."""

    def __init__(self, path: Path, max_bytes: int, max_backups: int):
        self.path = path
        self._max_bytes = max_bytes
        self._max_backups = max_backups
        self._lock = threading.Lock()
        self._f: BinaryIO | None = None
        self._size = 0  # bytes written, flushed or not
        self._good = 0  # bytes known to be in the file (flushed)

    def write(self, line: bytes, flush: bool) -> None:
        with self._lock:
            try:
                if self._f is None:
                    self._open()
                if self._size and self._size + len(line) > self._max_bytes:
                    self._rotate()
                self._f.write(line)
                self._size += len(line)
                if flush:
                    self._flush()
            except OSError as e:
                self._undo()
                raise RetryableError(f"writing {self.path}: {e.strerror or e}", reason="write_failed") from e

    def flush(self) -> None:
        with self._lock:
            if self._f is not None:
                try:
                    self._flush()
                except OSError:
                    self._undo()

    def close(self) -> None:
        with self._lock:
            if self._f is not None:
                try:
                    self._f.close()
                except OSError:
                    pass
                self._f = None

    def _open(self) -> None:
        self._f = open_private(self.path, "ab")
        self._size = self._good = self._f.tell()

    def _flush(self) -> None:
        self._f.flush()
        self._good = self._size

    def _undo(self) -> None:
        """Drop whatever did not reach the file whole, so no line is ever half written."""
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
        try:
            os.truncate(self.path, self._good)
        except OSError:
            pass

    def _rotate(self) -> None:
        self._flush()
        self._f.close()
        self._f = None
        base = str(self.path)
        if self._max_backups == 0:
            os.unlink(base)
        else:
            for i in range(self._max_backups - 1, 0, -1):
                if os.path.exists(f"{base}.{i}"):
                    os.replace(f"{base}.{i}", f"{base}.{i + 1}")
            os.replace(base, f"{base}.1")
        self._open()


class FileExporter(BaseExporter):
    def __init__(self, settings: CreateSettings, cfg: FileExporterConfig):
        super().__init__(settings, timeout=cfg.timeout, queue=cfg.sending_queue, retry=cfg.retry_on_failure)
        self.directory = Path(cfg.directory)
        max_bytes = int(cfg.rotation.max_megabytes * 1024 * 1024)
        self._files = {s: _JsonLinesFile(self.directory / f"{s.value}.jsonl", max_bytes, cfg.rotation.max_backups)
                       for s in Signal}
        self._flush_interval = cfg.flush_interval
        self._flush_each = cfg.flush_interval == 0
        self._flusher = Ticker(self._flush_all, self._flush_interval or 1.0, name=f"exporter-{self.id}-flush")

    def _open(self) -> None:
        try:
            make_private_dir(self.directory, tighten=False)
        except OSError as e:
            raise ValueError(f"exporters.{self.id}.directory: cannot create {self.directory}: {e.strerror}") from None
        if not os.access(self.directory, os.W_OK):
            raise ValueError(f"exporters.{self.id}.directory: {self.directory} is not writable")
        if not self._flush_each:
            self._flusher.start()

    def _flush_all(self) -> None:
        for f in self._files.values():
            f.flush()

    def _close(self) -> None:
        self._flusher.stop(time.monotonic() + 2)
        for f in self._files.values():
            f.flush()
            f.close()

    def push(self, envelope: Envelope, timeout: float) -> int:
        """One JSON line per request; a merged envelope is one write of its parts' lines (no merged copy)."""
        signal = envelope.signal
        parts = envelope.parts or (envelope,)
        lines = b"".join([otlp_json.to_json(signal, e.message).encode() + b"\n" for e in parts])
        self._files[signal].write(lines, self._flush_each)
        return 0


FACTORY = Factory(type="file", kind=Kind.EXPORTER, config_model=FileExporterConfig,
                  create=lambda settings, cfg, _next: FileExporter(settings, cfg))
