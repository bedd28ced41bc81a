"""The links of every exporter's chain: queue -> retry -> timeout -> ``push``.

- :class:`QueueSender` is what ``consume`` reaches: the sending queue (memory or
  persistent), its worker threads, the optional merging of waiting requests
  (``sending_queue.batch``) and the accounting of every outcome (exported, dropped with a
  reason, kept on disk at shutdown).
- :class:`RetryingSender` retries retryable failures with backoff within
  ``retry_on_failure.max_elapsed_time``; shutdown cuts a wait short.
- :class:`TimeoutSender` bounds one attempt with the exporter's ``timeout`` and calls
  the concrete exporter's ``push(envelope, timeout)``.

Model: otelcol's ``exporter/exporterhelper/internal/base_exporter.go``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, NamedTuple

from sidecar.component import Kind, PermanentError, Refused, RetryableError
from sidecar.envelope import Envelope
from sidecar.queue import SendingQueue
from sidecar.queue.memory import MemoryQueue
from sidecar.queue.retry import Outcome, Result, RetryConfig, RetrySender
from sidecar.signals import Signal
from sidecar.telemetry import ComponentTelemetry

log = logging.getLogger("sidecar.exporters")


class Delivery(NamedTuple):
    """What ``push`` may return instead of a bare rejected count."""

    #: items the backend refused in a partial success (counted dropped, ``rejected_by_backend``)
    rejected: int = 0
    #: items the exporter left out by design, e.g. spans syslog's ``include_spans`` did not select
    #: (counted dropped, ``filtered``, intended)
    filtered: int = 0


class TimeoutSender:
    """The last link: one ``push`` bounded by the exporter's ``timeout``."""

    def __init__(self, push: Callable[[Envelope, float], int], timeout: float):
        self._push = push
        self.timeout = timeout

    def send(self, envelope: Envelope) -> int:
        return self._push(envelope, self.timeout)


class _InternalError(PermanentError):
    """push raised something it should have classified: a bug, counted as ``internal_error``."""

    def __init__(self, message: str):
        super().__init__(message, reason="internal_error")


def reason_of(result: Result) -> str:
    """The drop/refuse reason label of a failed send."""
    return "internal_error" if isinstance(result.error, _InternalError) else result.outcome.value


class RetryingSender:
    """Runs the next sender until it succeeds, fails for good, runs out of time or shutdown aborts it."""

    def __init__(self, nxt: TimeoutSender, cfg: RetryConfig, exporter_id: str, telemetry: ComponentTelemetry,
                 rate_limited_log):
        self._next = nxt
        self._id = exporter_id
        self._tel = telemetry
        self._log = rate_limited_log
        self._retry = RetrySender(cfg, wait=self._wait)
        self.deadline = float("inf")
        self.stopping = threading.Event()  # shutdown began
        self.abort = threading.Event()  # the shutdown deadline passed

    def send(self, envelope: Envelope) -> Result:
        signal, n = envelope.signal, envelope.items

        def on_retry(err: RetryableError, delay: float) -> None:
            self._tel.retried(signal, n)
            self._log.log(logging.WARNING, ("retry", signal), "%s: exporting %s failed, retrying in %.2fs: %s",
                          self._id, signal.value, delay, err)

        try:
            result = self._retry.send(lambda: self._next.send(envelope), on_retry)
        except Exception as e:  # a bug in push: never kill the worker, never retry it forever
            log.exception("%s: unexpected error exporting %s", self._id, signal.value)
            result = Result(Outcome.PERMANENT, error=_InternalError(repr(e)), attempts=1)
        if result.outcome in (Outcome.PERMANENT, Outcome.EXHAUSTED):
            self._log.log(logging.ERROR, (result.outcome, signal), "%s: %d %s not exported (%s after %d attempts): %s",
                          self._id, n, signal.item_name, reason_of(result), result.attempts, result.error)
        return result

    def _wait(self, delay: float) -> bool:
        """Sleep between attempts; shutdown cuts short a wait that would end after its deadline."""
        end = time.monotonic() + delay
        if not self.stopping.is_set() and not self.stopping.wait(delay):
            return True
        if end > self.deadline:
            return False
        return not self.abort.wait(max(0.0, end - time.monotonic()))


class QueueSender:
    """The first link: the sending queue, its workers, batching of waiting requests, and the accounting."""

    def __init__(self, exporter_id: str, cfg, nxt: RetryingSender, telemetry: ComponentTelemetry):
        self._id = exporter_id
        self._cfg = cfg  # QueueConfig
        self._next = nxt
        self._tel = telemetry
        self._batch_max = cfg.batch.max_size if cfg.batch is not None else 0
        self.queue: SendingQueue | None = None
        if cfg.enabled and cfg.storage is None:
            self.queue = MemoryQueue(cfg.queue_size, cfg.max_bytes)
        self._workers: list[threading.Thread] = []
        #: per signal, items this exporter lost at its last shutdown and items it left on disk for the next start
        self.lost_at_shutdown: dict[Signal, int] = {}
        self.left_on_disk: dict[Signal, int] = {}

    # --- lifecycle ------------------------------------------------------------------------------

    def open_queue(self, host) -> None:
        """Open a persistent queue (it needs the host's ``file_storage`` extension)."""
        qc = self._cfg
        if qc.enabled and qc.storage is not None and (self.queue is None or self.queue.closed):
            self.queue = self._open_persistent_queue(host, qc)
        elif self.queue is not None and self.queue.closed:  # started again after a shutdown
            self.queue = MemoryQueue(qc.queue_size, qc.max_bytes)
        self._next.stopping.clear()
        self._next.abort.clear()
        self._next.deadline = float("inf")

    def start_workers(self) -> None:
        q = self.queue
        if q is None:
            return
        self._tel.queue_gauges(self._cfg.queue_size, q.size, q.item_count)
        self._workers = [threading.Thread(target=self._work, args=(q,), name=f"exporter-{self._id}-{i}", daemon=True)
                         for i in range(self._cfg.num_consumers)]
        for t in self._workers:
            t.start()

    def _open_persistent_queue(self, host, qc) -> SendingQueue:
        from sidecar.extensions.file_storage import FileStorage
        from sidecar.queue.persistent import PersistentQueue

        where = f"exporters.{self._id}.sending_queue.storage"
        try:
            ext = host.extension(qc.storage)
        except LookupError:
            raise ValueError(f"{where}: {qc.storage!r} is not an enabled extension "
                             "(define it under extensions and list it in service.extensions)") from None
        if not isinstance(ext, FileStorage):
            raise ValueError(f"{where}: {qc.storage!r} is not a file_storage extension")
        return PersistentQueue(ext.directory_for(Kind.EXPORTER, self._id), qc.queue_size, fsync=ext.fsync,
                               telemetry=self._tel)

    def shutdown(self, deadline: float) -> None:
        """Drain until ``deadline``; then account for everything not delivered, before returning.

        A memory queue's waiting requests and the requests workers are still pushing are lost
        (dropped, ``shutdown``); a persistent queue keeps both on disk for the next start.
        """
        nxt = self._next
        nxt.deadline = deadline
        nxt.stopping.set()
        q = self.queue
        if q is not None:
            q.close()
        for t in self._workers:
            t.join(max(0.0, deadline - time.monotonic()))
        nxt.abort.set()
        lost: dict[Signal, int] = {}
        kept: dict[Signal, int] = {}
        if q is not None:
            # the queue hands back what it loses, waiting or still being pushed (whose outcome comes too
            # late to count: the worker's settle() will find it gone), under the lock settle() takes
            for env in q.abort():
                lost[env.signal] = lost.get(env.signal, 0) + env.items
            kept = dict(getattr(q, "kept_by_signal", None) or {})
        for signal, n in lost.items():
            self._tel.dropped(signal, n, "shutdown")
        self.lost_at_shutdown, self.left_on_disk = lost, kept
        busy = sum(t.is_alive() for t in self._workers)
        if busy:
            log.warning("%s: %d workers still pushing at the shutdown deadline; their requests are counted %s",
                        self._id, busy, "on disk" if q is not None and q.persistent else "lost")
        self._workers = []

    # --- taking data ----------------------------------------------------------------------------

    def consume(self, envelope: Envelope) -> None:
        q = self.queue
        if q is None:
            if self._cfg.enabled:  # a persistent queue opens in start()
                raise Refused("not_started", message=f"exporter {self._id} has not started")
            return self._send_now(envelope)
        q.put(envelope)

    def _send_now(self, envelope: Envelope) -> None:
        """No queue: push in the caller's thread and answer with the outcome."""
        if self._next.stopping.is_set():
            raise Refused("shutting_down")
        result = self._next.send(envelope)
        if result.outcome is Outcome.EXPORTED:
            self._count_exported(envelope, result.value)
            return
        raise Refused(reason_of(result), retryable=result.outcome is not Outcome.PERMANENT, message=str(result.error))

    # --- workers --------------------------------------------------------------------------------

    def _work(self, q: SendingQueue) -> None:
        max_items = self._batch_max
        while (env := q.get()) is not None:
            if env.items >= max_items:  # batching off, or already big enough
                self._deliver(q, [env])
                continue
            gathered, n = [env], env.items
            while n < max_items and (more := q.try_get()) is not None:
                gathered.append(more)
                n += more.items
            if all(e.signal is env.signal for e in gathered):
                self._deliver(q, gathered)
                continue
            for signal in Signal:
                group = [e for e in gathered if e.signal is signal]
                if group:
                    self._deliver(q, group)

    def _deliver(self, q: SendingQueue, envelopes: list[Envelope]) -> None:
        """Export one or more same-signal queued envelopes as one request, then forget them."""
        merged = Envelope.merge(envelopes)
        result = self._next.send(merged)
        outcome = result.outcome
        if outcome is Outcome.ABORTED and q.persistent:
            return  # a persistent queue keeps them for the next start (shutdown counts them as on disk)

        def account() -> None:
            if outcome is Outcome.EXPORTED:
                self._count_exported(merged, result.value)
            elif outcome is Outcome.ABORTED:
                self._tel.dropped(merged.signal, merged.items, "shutdown")
            else:
                self._tel.dropped(merged.signal, merged.items, reason_of(result))

        if not q.settle(envelopes, account):
            return  # the shutdown deadline passed first and counted them (lost, or kept on disk)
        for env in envelopes:
            q.done(env)

    def _count_exported(self, envelope: Envelope, answer: object) -> None:
        """``push`` returned the items the backend rejected, or a :class:`Delivery`."""
        if isinstance(answer, Delivery):
            rejected, filtered = answer.rejected, answer.filtered
        else:
            rejected, filtered = int(answer or 0), 0
        signal = envelope.signal
        self._tel.exported(signal, envelope.items - rejected - filtered)
        if rejected:
            self._tel.dropped(signal, rejected, "rejected_by_backend")
        if filtered:
            self._tel.dropped(signal, filtered, "filtered")
