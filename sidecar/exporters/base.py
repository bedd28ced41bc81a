"""The exporter base: config every exporter shares and the chain queue -> retry -> timeout -> push.

The contract for a concrete exporter (otlp, otlphttp, file, debug, syslog, ...) is one method::

    def push(self, envelope: Envelope, timeout: float) -> int:
        # send ``envelope`` within ``timeout`` seconds; return how many items the backend rejected

It raises :class:`RetryableError` or :class:`PermanentError` (classified once, there) and
may override ``_open`` / ``_close`` to create and release its client. ``envelope.encoded``
is the OTLP protobuf as received (or as merged by ``sending_queue.batch``: the concatenation
of the queued encodings); ``envelope.message`` is the parsed request; ``envelope.parts``
lists the requests of a merged envelope for exporters that write one record per request.

Everything else is the chain in :mod:`sidecar.exporters.senders`: ``consume`` puts the
envelope into the exporter's own sending queue and returns (the acknowledgement; for a
persistent queue it is on disk by then); ``sending_queue.num_consumers`` workers take it,
the retry sender retries retryable failures with backoff, the timeout sender bounds each
attempt. Each exporter has its own queue and workers, so one backend that is down never
stalls another. Shutdown stops accepting, lets the workers drain until the queue is empty
or the deadline passes, then counts what a memory queue still holds as dropped
(``shutdown``); a persistent queue keeps it, and anything in flight, on disk.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from typing import Callable, Literal

from pydantic import Field, field_validator

from sidecar.component import Component, Kind
from sidecar.config import ConfigModel, Duration
from sidecar.envelope import Envelope
from sidecar.exporters.senders import Delivery, QueueSender, RetryingSender, TimeoutSender
from sidecar.queue.retry import RetryConfig
from sidecar.registry import CreateSettings
from sidecar.signals import Signal


log = logging.getLogger(__name__)

Compression = Literal["gzip", "none"]


class QueueBatchConfig(ConfigModel):
    """``sending_queue.batch``: merge requests already waiting in the queue into one export.

    Batching after the queue (as otelcol's exporterhelper does) costs no copy — the OTLP
    exporters send the merged request as the concatenation of each request's encoding —
    adds no latency (it takes only what is waiting) and, with a persistent queue, leaves
    no acknowledged data in memory the way a ``batch`` processor in front would.
    """

    #: stop taking requests once this many items (spans, log records, data points) are gathered
    max_size: int = Field(8192, ge=1)


class QueueConfig(ConfigModel):
    """``sending_queue``: otelcol's keys."""

    enabled: bool = True
    #: worker threads pushing from this queue; each waits on network I/O, not the CPU
    num_consumers: int = Field(4, ge=1, le=256)
    #: capacity in requests; a full queue refuses (queue_full) so the sender retries
    queue_size: int = Field(1000, ge=1)
    #: capacity of an in-memory queue in bytes of encoded requests, besides ``queue_size`` (a request that
    #: would pass it is refused, queue_full, unless the queue is empty); a persistent queue is bounded by disk
    max_bytes: int = Field(64 * 1024 * 1024, ge=1)
    #: id of a ``file_storage`` extension: the queue lives on disk and survives restarts
    storage: str | None = None
    #: merge waiting requests into one export (off unless configured)
    batch: QueueBatchConfig | None = None


class ExporterConfig(ConfigModel):
    """What every queued exporter accepts besides its own settings."""

    #: limit of one push attempt (the retry sender spends ``max_elapsed_time`` over all attempts)
    timeout: Duration = 5.0
    sending_queue: QueueConfig = Field(default_factory=QueueConfig)
    retry_on_failure: RetryConfig = Field(default_factory=RetryConfig)

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be > 0")
        return v

    def extension_refs(self) -> dict[str, str]:
        """Extensions this exporter needs at start (checked by config validation)."""
        storage = self.sending_queue.storage
        return {"sending_queue.storage": storage} if storage else {}


class RateLimitedLog:
    """Logs a recurring problem at most once per ``interval`` per key, saying how many were suppressed.

    A backend that rejects every request must not turn the sidecar's own log into a flood.
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._last: dict[object, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def log(self, level: int, key: object, msg: str, *args: object, exc_info: bool = False) -> None:
        now = self._clock()
        with self._lock:
            last, suppressed = self._last.get(key, (float("-inf"), 0))
            if now - last < self._interval:
                self._last[key] = (last, suppressed + 1)
                return
            self._last[key] = (now, 0)
        if suppressed:
            msg += " (%d similar messages suppressed)"
            args += (suppressed,)
        self._logger.log(level, msg, *args, exc_info=exc_info)


_REJECTED_FIELD = {Signal.TRACES: "rejected_spans", Signal.LOGS: "rejected_log_records",
                   Signal.METRICS: "rejected_data_points"}


def partial_success(signal: Signal, response) -> tuple[int, str]:
    """(items rejected, the backend's message) from an Export*ServiceResponse."""
    if not response.HasField("partial_success"):
        return 0, ""
    ps = response.partial_success
    return getattr(ps, _REJECTED_FIELD[signal]), ps.error_message


class BaseExporter(Component, ABC):
    """The chain queue -> retry -> timeout -> :meth:`push`; subclasses implement ``push`` (and open/close)."""

    def __init__(self, settings: CreateSettings, *, timeout: float, queue: QueueConfig, retry: RetryConfig):
        self.id = str(settings.id)
        self.telemetry = settings.telemetry
        self.log = RateLimitedLog(logging.getLogger(f"sidecar.exporter.{self.id}"))
        self._retrying = RetryingSender(TimeoutSender(self.push, timeout), retry, self.id, self.telemetry, self.log)
        self._sender = QueueSender(self.id, queue, self._retrying, self.telemetry)
        self._started = False
        self._closed = False

    # --- what subclasses provide ----------------------------------------------------------------

    @abstractmethod
    def push(self, envelope: Envelope, timeout: float) -> int | Delivery:
        """Send one request within ``timeout`` seconds; return the number of items the backend rejected
        (or a :class:`~sidecar.exporters.senders.Delivery` that also names items left out by design)."""

    def _open(self) -> None:
        """Create the client (channel, connection pool, files). Called by start, before the workers run."""

    def _close(self) -> None:
        """Release the client. Called once at the end of shutdown."""

    # --- the stage interface --------------------------------------------------------------------

    @property
    def _abort(self) -> threading.Event:
        """Set once the shutdown deadline passed: a push may fail fast instead of waiting."""
        return self._retrying.abort

    def start(self, host) -> None:
        self._sender.open_queue(host)
        self._open()
        self._started, self._closed = True, False
        self._sender.start_workers()

    def consume(self, envelope: Envelope) -> None:
        self._sender.consume(envelope)

    def shutdown(self, deadline: float) -> None:
        """Stop taking data, drain the queue into the backend until ``deadline``, release the client."""
        self._sender.shutdown(deadline)
        if self._started and not self._closed:
            self._closed = True
            self._close()

    @property
    def left_on_disk(self) -> dict[Signal, int]:
        """Items per signal the last shutdown left in the persistent queue for the next start."""
        return self._sender.left_on_disk

    def log_partial_success(self, signal: Signal, rejected: int, message: str) -> None:
        self.log.log(logging.WARNING, ("partial", signal), "%s: backend rejected %d %s: %s",
                     self.id, rejected, signal.item_name, message or "(no message)")
