"""The exporter helper chain every exporter shares: queue -> retry -> timeout -> push.

``consume`` puts the request into the exporter's own sending queue and returns; that
return is the acknowledgement (for a persistent queue the request is on disk by
then). ``sending_queue.num_consumers`` worker threads take requests from the queue
and push them through the retry sender with a per-attempt timeout. Each exporter
has its own queue and workers, so one backend that is down never stalls another.

A subclass implements ``push(signal, request, timeout)``: it raises
:class:`RetryableError` or :class:`PermanentError` (classified once, there) and
returns how many items the backend rejected in a partial success.

Shutdown stops accepting, lets the workers drain until the queue is empty or the
deadline passes (a retry wait that would end after the deadline is cut short), then
counts what a memory queue still holds as dropped (``shutdown``); a persistent queue
keeps it, and anything in flight, on disk for the next start.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from typing import Callable, Literal

from pydantic import Field, field_validator

from sidecar.component import Component, Kind, PermanentError, Refused, RetryableError
from sidecar.config import ConfigModel, Duration
from sidecar.queue import QueueItem, SendingQueue
from sidecar.queue.memory import MemoryQueue
from sidecar.queue.retry import Outcome, Result, RetryConfig, RetrySender
from sidecar.registry import CreateSettings
from sidecar.signals import Request, Signal, count_items, resource_list

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

    def log(self, level: int, key: object, msg: str, *args: object) -> None:
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
        self._logger.log(level, msg, *args)


_REJECTED_FIELD = {Signal.TRACES: "rejected_spans", Signal.LOGS: "rejected_log_records",
                   Signal.METRICS: "rejected_data_points"}


def partial_success(signal: Signal, response) -> tuple[int, str]:
    """(items rejected, the backend's message) from an Export*ServiceResponse."""
    if not response.HasField("partial_success"):
        return 0, ""
    ps = response.partial_success
    return getattr(ps, _REJECTED_FIELD[signal]), ps.error_message


class BaseExporter(Component, ABC):
    """Queue, workers, retry and counting; subclasses only ``push`` (and open/close their client)."""

    def __init__(self, settings: CreateSettings, *, timeout: float, queue: QueueConfig, retry: RetryConfig):
        self.id = str(settings.id)
        self.telemetry = settings.telemetry
        self.log = RateLimitedLog(logging.getLogger(f"sidecar.exporter.{self.id}"))
        self._timeout = timeout
        self._queue_cfg = queue
        self._retry = RetrySender(retry, wait=self._wait)
        self._queue: SendingQueue | None = None
        self._batch_max = queue.batch.max_size if queue.batch is not None else 0
        if queue.enabled and queue.storage is None:
            self._queue = MemoryQueue(queue.queue_size)
        self._workers: list[threading.Thread] = []
        self._deadline = float("inf")
        self._stopping = threading.Event()  # shutdown began
        self._abort = threading.Event()  # the shutdown deadline passed

    # --- what subclasses provide ----------------------------------------------------------------

    @abstractmethod
    def push(self, signal: Signal, request: Request, timeout: float) -> int:
        """Send one request within ``timeout`` seconds; return the number of items the backend rejected."""

    #: True for exporters whose wire format is OTLP protobuf: queued encodings go to
    #: :meth:`push_encoded` as they are, instead of being parsed into messages for :meth:`push`
    sends_encoded = False

    def push_encoded(self, signal: Signal, body: bytes, timeout: float) -> int:
        """Send an already encoded request (one, or several concatenated) within ``timeout``.

        The OTLP exporters send the bytes themselves; any other exporter gets the message.
        """
        return self.push(signal, signal.request_type.FromString(body), timeout)

    def push_many(self, signal: Signal, requests: list[Request], timeout: float) -> int:
        """Send several requests as one export. The default merges them into one message;
        exporters that can concatenate encodings (the OTLP ones) override this to skip the copy."""
        merged = signal.request_type()
        target = resource_list(signal, merged)
        for request in requests:
            target.extend(resource_list(signal, request))
        return self.push(signal, merged, timeout)

    def _open(self) -> None:
        """Create the client (channel, connection pool, files). Called by start, before the workers run."""

    def _close(self) -> None:
        """Release the client. Called once at the end of shutdown."""

    # --- the stage interface --------------------------------------------------------------------

    def start(self, host) -> None:
        qc = self._queue_cfg
        if qc.enabled and qc.storage is not None:
            self._queue = self._open_persistent_queue(host, qc)
        self._open()
        if self._queue is not None:
            q = self._queue
            self.telemetry.queue_gauges(qc.queue_size, q.size, q.item_count)
            for i in range(qc.num_consumers):
                t = threading.Thread(target=self._work, name=f"exporter-{self.id}-{i}", daemon=True)
                t.start()
                self._workers.append(t)

    def _open_persistent_queue(self, host, qc: QueueConfig) -> SendingQueue:
        from sidecar.extensions.file_storage import FileStorage
        from sidecar.queue.persistent import PersistentQueue

        where = f"exporters.{self.id}.sending_queue.storage"
        try:
            ext = host.extension(qc.storage)
        except LookupError:
            raise ValueError(f"{where}: {qc.storage!r} is not an enabled extension "
                             "(define it under extensions and list it in service.extensions)") from None
        if not isinstance(ext, FileStorage):
            raise ValueError(f"{where}: {qc.storage!r} is not a file_storage extension")
        return PersistentQueue(ext.directory_for(Kind.EXPORTER, self.id), qc.queue_size, fsync=ext.fsync,
                               telemetry=self.telemetry)

    def consume(self, signal: Signal, request: Request) -> None:
        n = count_items(signal, request)
        self.telemetry.received(signal, n)
        q = self._queue
        if q is None:
            if self._queue_cfg.enabled:  # a persistent queue opens in start()
                self.telemetry.refused(signal, n, "not_started")
                raise Refused("not_started", message=f"exporter {self.id} has not started")
            return self._consume_now(signal, request, n)
        try:
            q.put(signal, request, n)
        except Refused as e:
            self.telemetry.refused(signal, n, e.reason)
            raise
        self.telemetry.accepted(signal, n)

    def _consume_now(self, signal: Signal, request: Request, n: int) -> None:
        """No queue: push in the caller's thread and answer with the outcome."""
        if self._stopping.is_set():
            self.telemetry.refused(signal, n, "shutting_down")
            raise Refused("shutting_down")
        result = self._send(signal, [request], n)
        if result.outcome is Outcome.EXPORTED:
            self.telemetry.accepted(signal, n)
            self._count_exported(signal, n, result.value)
            return
        reason = _reason(result)
        self.telemetry.refused(signal, n, reason)
        raise Refused(reason, retryable=result.outcome is not Outcome.PERMANENT, message=str(result.error))

    def shutdown(self, deadline: float) -> None:
        self._deadline = deadline
        self._stopping.set()
        q = self._queue
        if q is not None:
            q.close()
        for t in self._workers:
            t.join(max(0.0, deadline - time.monotonic()))
        self._abort.set()
        if q is not None:
            for item in q.abort():
                self.telemetry.dropped(item.signal, item.items, "shutdown")
        busy = sum(t.is_alive() for t in self._workers)
        if busy:
            log.warning("%s: %d requests still in flight at the shutdown deadline", self.id, busy)
        self._close()

    # --- workers --------------------------------------------------------------------------------

    def _work(self) -> None:
        q = self._queue
        max_items = self._batch_max
        while (item := q.get()) is not None:
            if item.items >= max_items:  # batching off, or already big enough
                self._deliver(q, [item])
                continue
            gathered, n = [item], item.items
            while n < max_items and (more := q.try_get()) is not None:
                gathered.append(more)
                n += more.items
            if all(i.signal is item.signal for i in gathered):
                self._deliver(q, gathered)
                continue
            for signal in Signal:
                group = [i for i in gathered if i.signal is signal]
                if group:
                    self._deliver(q, group)

    def _deliver(self, q: SendingQueue, items: list[QueueItem]) -> None:
        """Export one or more same-signal queue items as one request, then forget them."""
        signal = items[0].signal
        n = sum(i.items for i in items)
        if self.sends_encoded:  # the encodings the queue holds (or makes), as they are
            body = items[0].wire if len(items) == 1 else b"".join([i.wire for i in items])
            result = self._send_encoded(signal, body, n)
        else:
            result = self._send(signal, [i.request for i in items], n)
        outcome = result.outcome
        if outcome is Outcome.EXPORTED:
            self._count_exported(signal, n, result.value)
        elif outcome is Outcome.ABORTED:
            if not q.persistent:
                self.telemetry.dropped(signal, n, "shutdown")
            return  # a persistent queue keeps them for the next start
        else:
            self.telemetry.dropped(signal, n, _reason(result))
        for item in items:
            q.done(item)

    def _send_encoded(self, signal: Signal, body: bytes, n: int) -> Result:
        return self._retrying(signal, n, lambda: self.push_encoded(signal, body, self._timeout))

    def _send(self, signal: Signal, requests: list[Request], n: int) -> Result:
        if len(requests) == 1:
            request = requests[0]

            def attempt():
                return self.push(signal, request, self._timeout)
        else:
            def attempt():
                return self.push_many(signal, requests, self._timeout)
        return self._retrying(signal, n, attempt)

    def _retrying(self, signal: Signal, n: int, attempt) -> Result:
        """One export through the retry sender, with its outcome logged and classified."""

        def on_retry(err: RetryableError, delay: float) -> None:
            self.telemetry.retried(signal, n)
            self.log.log(logging.WARNING, ("retry", signal), "%s: exporting %s failed, retrying in %.2fs: %s",
                         self.id, signal.value, delay, err)

        try:
            result = self._retry.send(attempt, on_retry)
        except Exception as e:  # a bug in push: never kill the worker, never retry it forever
            log.exception("%s: unexpected error exporting %s", self.id, signal.value)
            result = Result(Outcome.PERMANENT, error=_InternalError(repr(e)), attempts=1)
        if result.outcome in (Outcome.PERMANENT, Outcome.EXHAUSTED):
            self.log.log(logging.ERROR, (result.outcome, signal), "%s: %d %s not exported (%s after %d attempts): %s",
                         self.id, n, signal.item_name, _reason(result), result.attempts, result.error)
        return result

    def _count_exported(self, signal: Signal, n: int, rejected: object) -> None:
        rejected = int(rejected or 0)
        self.telemetry.exported(signal, n - rejected)
        if rejected:
            self.telemetry.dropped(signal, rejected, "rejected_by_backend")

    def _wait(self, delay: float) -> bool:
        """Sleep between attempts; shutdown cuts short a wait that would end after its deadline."""
        end = time.monotonic() + delay
        if not self._stopping.is_set() and not self._stopping.wait(delay):
            return True
        if end > self._deadline:
            return False
        return not self._abort.wait(max(0.0, end - time.monotonic()))

    def log_partial_success(self, signal: Signal, rejected: int, message: str) -> None:
        self.log.log(logging.WARNING, ("partial", signal), "%s: backend rejected %d %s: %s",
                     self.id, rejected, signal.item_name, message or "(no message)")


class _InternalError(PermanentError):
    """push raised something it should have classified: a bug, counted as ``internal_error``."""

    def __init__(self, message: str):
        super().__init__(message, reason="internal_error")


def _reason(result: Result) -> str:
    """The drop/refuse reason label of a failed send."""
    return "internal_error" if isinstance(result.error, _InternalError) else result.outcome.value
