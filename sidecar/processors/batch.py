"""The ``batch`` processor: gather requests into batches of ``send_batch_size`` items.

Per signal, accepted requests wait in a bounded pending list. A batch is sent on the
caller's thread once ``send_batch_size`` items are pending, or by a timer thread
``timeout`` after its oldest item arrived. Merging appends whole ``resource_*`` entries
(no per-span work); only requests larger than ``send_batch_max_size`` are split, at
span / log record / data point granularity.

Nothing accepted is lost silently: when the next stage refuses a batch, it goes back
to the front of the pending list and is retried; while pending is full, new data is
refused with ``Refused("batch_full")``; what is still pending at the shutdown deadline
is counted dropped with reason ``shutdown``.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

from prometheus_client import Gauge
from pydantic import Field, ValidationInfo, field_validator

from sidecar.component import Component, Consumer, Kind, Refused
from sidecar.config import ConfigModel, Duration
from sidecar.registry import ALL_SIGNALS, CreateSettings, Factory
from sidecar.signals import Request, Signal, count_items, known_encoding, new_request, received_encoding, resource_list

log = logging.getLogger(__name__)


class BatchConfig(ConfigModel):
    #: Items (spans, log records, data points) that trigger sending a batch.
    send_batch_size: int = Field(8192, ge=1)
    #: Longest an item waits before its batch is sent anyway.
    timeout: Duration = 0.2
    #: Upper bound on a batch's items; 0 means unlimited. Larger requests are split.
    send_batch_max_size: int = Field(0, ge=0)
    #: Items held per signal while the next stage refuses; beyond it new data is refused.
    #: Default: 10 x max(send_batch_size, send_batch_max_size).
    max_pending_items: int | None = Field(None, ge=1)

    @field_validator("timeout")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be > 0")
        return v

    @field_validator("send_batch_max_size")
    @classmethod
    def _max_size(cls, v: int, info: ValidationInfo) -> int:
        size = info.data.get("send_batch_size")
        if v and size is not None and v < size:
            raise ValueError(f"must be 0 (unlimited) or >= send_batch_size ({size}), got {v}")
        return v

    @field_validator("max_pending_items")
    @classmethod
    def _pending(cls, v: int | None, info: ValidationInfo) -> int | None:
        size = info.data.get("send_batch_size")
        if v is not None and size is not None and v < size:
            raise ValueError(f"must be >= send_batch_size ({size}), got {v}")
        return v


# --- splitting oversized requests ---------------------------------------------------------------

_SCOPE_FIELD = {Signal.TRACES: "scope_spans", Signal.LOGS: "scope_logs", Signal.METRICS: "scope_metrics"}
_ITEM_FIELD = {Signal.TRACES: "spans", Signal.LOGS: "log_records"}


def _leaves(signal: Signal, request: Request):
    """(path, source containers, repeated items) for every list of items in the request."""
    scope_field = _SCOPE_FIELD[signal]
    for r, res in enumerate(resource_list(signal, request)):
        for s, scope in enumerate(getattr(res, scope_field)):
            if signal is Signal.METRICS:
                for m, metric in enumerate(scope.metrics):
                    kind = metric.WhichOneof("data")
                    if kind is not None:
                        yield (r, s, m), (res, scope, metric), getattr(metric, kind).data_points
            else:
                yield (r, s), (res, scope), getattr(scope, _ITEM_FIELD[signal])


def _copy_metric_header(src, dst) -> None:
    """Everything of a metric except its data points (name, unit, temporality, monotonicity...)."""
    dst.name, dst.description, dst.unit = src.name, src.description, src.unit
    dst.metadata.extend(src.metadata)
    kind = src.WhichOneof("data")
    src_data, dst_data = getattr(src, kind), getattr(dst, kind)
    dst_data.SetInParent()
    for f in src_data.DESCRIPTOR.fields:
        if f.name != "data_points":
            setattr(dst_data, f.name, getattr(src_data, f.name))


def _open(signal: Signal, out: Request, opened: dict, path: tuple, chain: tuple):
    """The item list in ``out`` matching ``path``, creating resource/scope/metric copies on first use."""
    dst_res = opened.get(path[:1])
    if dst_res is None:
        dst_res = opened[path[:1]] = resource_list(signal, out).add()
        dst_res.resource.CopyFrom(chain[0].resource)
        dst_res.schema_url = chain[0].schema_url
    dst_scope = opened.get(path[:2])
    if dst_scope is None:
        dst_scope = opened[path[:2]] = getattr(dst_res, _SCOPE_FIELD[signal]).add()
        dst_scope.scope.CopyFrom(chain[1].scope)
        dst_scope.schema_url = chain[1].schema_url
    if signal is not Signal.METRICS:
        return getattr(dst_scope, _ITEM_FIELD[signal])
    dst_metric = opened.get(path)
    if dst_metric is None:
        dst_metric = opened[path] = dst_scope.metrics.add()
        _copy_metric_header(chain[2], dst_metric)
    return getattr(dst_metric, dst_metric.WhichOneof("data")).data_points


def split_request(signal: Signal, request: Request, max_items: int) -> list[tuple[Request, int]]:
    """Cut ``request`` into requests of at most ``max_items`` items, keeping each item's resource and scope."""
    pieces: list[tuple[Request, int]] = []
    out, n, opened = new_request(signal), 0, {}
    for path, chain, items in _leaves(signal, request):
        start, total = 0, len(items)
        while start < total:
            if n == max_items:
                pieces.append((out, n))
                out, n, opened = new_request(signal), 0, {}
            take = min(total - start, max_items - n)
            _open(signal, out, opened, path, chain).extend(items[start:start + take])
            start += take
            n += take
    if n:
        pieces.append((out, n))
    return pieces


def merge_requests(signal: Signal, chunks: list[tuple]) -> tuple[Request, bytes | None]:
    """One request holding every chunk's resource entries, and its encoding when that came for free.

    A chunk is (request or None, items, received encoding or None): a chunk whose encoding is
    known keeps only that (a fifth of the memory of the message). The merge concatenates the
    chunks' encodings (the encoding of the merged request: its top-level fields are repeated)
    and parses once — cheaper than copying messages. A single chunk is sent as it is.
    """
    if len(chunks) == 1:
        request, _, raw = chunks[0]
        return (request if request is not None else signal.request_type.FromString(raw)), raw
    joined = b"".join([raw if raw is not None else request.SerializeToString() for request, _, raw in chunks])
    return signal.request_type.FromString(joined), joined


# --- the processor ------------------------------------------------------------------------------


class _Pending:
    """One signal's accepted-but-unsent data."""

    __slots__ = ("chunks", "items", "since", "retry_at", "send_lock")

    def __init__(self):
        self.chunks: collections.deque[tuple] = collections.deque()  # (request, items, received encoding)
        self.items = 0
        self.since = 0.0  # clock time the oldest pending item arrived
        self.retry_at = 0.0  # after a refusal, no send before this clock time
        self.send_lock = threading.Lock()  # one sender per signal keeps batches in order


class BatchProcessor(Component):
    def __init__(self, settings: CreateSettings, config: BatchConfig, next_consumer: Consumer, *,
                 clock: Callable[[], float] = time.monotonic):
        self.id = str(settings.id)
        self._next = next_consumer
        self._telemetry = settings.telemetry
        self._clock = clock
        self.send_batch_size = config.send_batch_size
        self.send_batch_max_size = config.send_batch_max_size
        self.timeout = config.timeout
        self.max_pending_items = config.max_pending_items or 10 * max(config.send_batch_size,
                                                                      config.send_batch_max_size)
        self._lock = threading.Lock()
        self._pending = {s: _Pending() for s in Signal}
        self._closed = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        gauge = settings.telemetry.root.family(Gauge, "sidecar_batch_pending_items",
                                               "Items accepted by a batch processor and not yet sent.",
                                               ("component", "signal"))
        for signal, p in self._pending.items():
            gauge.labels(self.id, signal.value).set_function(lambda p=p: p.items)

    def pending_items(self, signal: Signal) -> int:
        return self._pending[signal].items

    # --- taking data ------------------------------------------------------------------------

    def consume(self, signal: Signal, request: Request) -> None:
        n = count_items(signal, request)
        self._telemetry.received(signal, n)
        if n == 0:
            return
        if self.send_batch_max_size and n > self.send_batch_max_size:
            chunks = [(piece, k, None) for piece, k in split_request(signal, request, self.send_batch_max_size)]
        else:
            raw = received_encoding(request)
            chunks = ((None if raw is not None else request, n, raw),)
        now = self._clock()
        p = self._pending[signal]
        was_empty = ready = False
        with self._lock:
            refusal = None
            if self._closed:
                refusal = Refused("shutting_down", retry_after=1.0, message=f"processor {self.id} is shutting down")
            elif p.items and p.items + n > self.max_pending_items:
                refusal = Refused("batch_full", retry_after=max(self.timeout, 1.0),
                                  message=f"processor {self.id}: {p.items} {signal.item_name} pending, "
                                          f"limit {self.max_pending_items}; the next stage is not keeping up")
            else:
                was_empty = not p.items
                if was_empty:
                    p.since = now
                p.chunks.extend(chunks)
                p.items += n
                ready = p.items >= self.send_batch_size and now >= p.retry_at
        if refusal is not None:
            self._telemetry.refused(signal, n, refusal.reason)
            raise refusal
        self._telemetry.accepted(signal, n)
        if was_empty:
            self._wake.set()
        if ready:
            self._send(signal, force=False, blocking=False)

    # --- sending ----------------------------------------------------------------------------

    def _take(self, p: _Pending, force: bool) -> tuple[list[tuple], int] | None:
        """Pop the next batch under the lock: at least send_batch_size items unless ``force``."""
        if not p.chunks or (not force and p.items < self.send_batch_size):
            return None
        batch: list[tuple] = []
        n = 0
        limit = self.send_batch_max_size
        while p.chunks:
            k = p.chunks[0][1]
            if batch and (n >= self.send_batch_size or (limit and n + k > limit)):
                break
            batch.append(p.chunks.popleft())
            n += k
        p.items -= n
        return batch, n

    def _send(self, signal: Signal, *, force: bool, blocking: bool) -> bool:
        """Send ready batches on this thread. False when the next stage refused (the data stays pending)."""
        p = self._pending[signal]
        while p.send_lock.acquire(blocking=blocking):
            try:
                while True:
                    with self._lock:
                        taken = self._take(p, force)
                    if taken is None:
                        break
                    if not self._deliver(signal, p, *taken):
                        return False
            finally:
                p.send_lock.release()
            # Data that arrived while we held the send lock: its callers did not wait for the lock.
            with self._lock:
                if p.items < self.send_batch_size or self._clock() < p.retry_at:
                    return True
        return True

    def _deliver(self, signal: Signal, p: _Pending, batch: list[tuple], n: int) -> bool:
        try:
            merged, raw = merge_requests(signal, batch)
            if raw is None:
                self._next.consume(signal, merged)
            else:
                with known_encoding(merged, raw):
                    self._next.consume(signal, merged)
        except Refused as e:
            if not e.retryable:
                log.warning("%s: next stage rejected %d %s for good: %s", self.id, n, signal.item_name, e)
                self._telemetry.dropped(signal, n, e.reason)
                return True
            now = self._clock()
            with self._lock:
                p.chunks.extendleft(reversed(batch))
                if not p.items:
                    p.since = now
                p.items += n
                p.retry_at = now + max(self.timeout, e.retry_after or 0.0)
            return False
        except Exception:
            log.exception("%s: next stage failed on %d %s; dropping them", self.id, n, signal.item_name)
            self._telemetry.dropped(signal, n, "internal")
        return True

    def tick(self) -> None:
        """Send every signal's pending data whose oldest item has waited ``timeout`` (the timer's work)."""
        now = self._clock()
        with self._lock:
            due = [s for s, p in self._pending.items()
                   if p.items and now >= max(p.since + self.timeout, p.retry_at)]
        for signal in due:
            self._send(signal, force=True, blocking=True)

    def _next_due(self) -> float | None:
        with self._lock:
            dues = [max(p.since + self.timeout, p.retry_at) for p in self._pending.values() if p.items]
        return min(dues) if dues else None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # pragma: no cover - the timer must survive anything
                log.exception("%s: batch timer failed", self.id)
            due = self._next_due()
            self._wake.wait(None if due is None else max(0.0, due - self._clock()))
            self._wake.clear()

    # --- lifecycle --------------------------------------------------------------------------

    def start(self, host) -> None:
        self._thread = threading.Thread(target=self._run, name=f"{self.id}-timer", daemon=True)
        self._thread.start()

    def shutdown(self, deadline: float) -> None:
        """Refuse new data, send everything pending, retry refusals until ``deadline``; count the rest dropped."""
        with self._lock:
            self._closed = True
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            self._thread = None
        for signal, p in self._pending.items():
            while not self._send(signal, force=True, blocking=True) and time.monotonic() < deadline:
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
            with self._lock:
                left = p.items
                p.chunks.clear()
                p.items = 0
            if left:
                log.warning("%s: dropping %d %s still refused at the shutdown deadline", self.id, left,
                            signal.item_name)
                self._telemetry.dropped(signal, left, "shutdown")


FACTORY = Factory(
    type="batch",
    kind=Kind.PROCESSOR,
    config_model=BatchConfig,
    create=lambda settings, cfg, next_consumer: BatchProcessor(settings, cfg, next_consumer),
    signals=ALL_SIGNALS,
)
