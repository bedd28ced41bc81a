"""The ``batch`` processor: gather requests into batches of ``send_batch_size`` items.

Per signal, accepted requests wait in a bounded pending list. A batch is sent on the
caller's thread once ``send_batch_size`` items are pending, or by a timer thread
``timeout`` after its oldest item arrived. Merging appends whole ``resource_*`` entries
(no per-span work); only requests larger than ``send_batch_max_size`` are split, at
span / log record / data point granularity.

Nothing accepted is lost silently: when the next stage refuses a batch, it waits in an
:class:`~sidecar.outbox.Outbox` (in order, retried after the refusal's retry-after); while
pending plus waiting data is over ``max_pending_items``, new data is refused with
``Refused("batch_full")``; what is still held at the shutdown deadline is counted dropped
with reason ``shutdown``. Batches of received requests are the concatenation of their
encodings: no parse, no copy.
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
from sidecar.envelope import Envelope
from sidecar.outbox import Outbox
from sidecar.registry import ALL_SIGNALS, CreateSettings, Factory
from sidecar.signals import Request, Signal, new_request, resource_list
from sidecar.ticker import Ticker

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


# --- the processor ------------------------------------------------------------------------------


class _Pending:
    """One signal's accepted data not yet cut into a batch."""

    __slots__ = ("chunks", "items", "since")

    def __init__(self):
        self.chunks: collections.deque[Envelope] = collections.deque()
        self.items = 0
        self.since = 0.0  # clock time the oldest pending item arrived


class BatchProcessor(Component):
    def __init__(self, settings: CreateSettings, config: BatchConfig, next_consumer: Consumer, *,
                 clock: Callable[[], float] = time.monotonic):
        self.id = str(settings.id)
        self._clock = clock
        self.send_batch_size = config.send_batch_size
        self.send_batch_max_size = config.send_batch_max_size
        self.timeout = config.timeout
        self.max_pending_items = config.max_pending_items or 10 * max(config.send_batch_size,
                                                                      config.send_batch_max_size)
        self._lock = threading.Lock()
        self._pending = {s: _Pending() for s in Signal}
        # cut batches wait here, in order, while the next stage refuses
        self._out = {s: Outbox(next_consumer, settings.telemetry, max_items=2 * self.max_pending_items,
                               min_retry_delay=self.timeout, clock=clock, name=self.id) for s in Signal}
        self._closed = False
        self._ticker = Ticker(self.tick, self._until_due, name=f"{self.id}-timer")
        gauge = settings.telemetry.root.family(Gauge, "sidecar_batch_pending_items",
                                               "Items accepted by a batch processor and not yet sent.",
                                               ("component", "signal"))
        for signal in Signal:
            gauge.labels(self.id, signal.value).set_function(lambda s=signal: self.pending_items(s))

    def pending_items(self, signal: Signal) -> int:
        """Accepted and not yet taken by the next stage: pending plus cut batches waiting."""
        return self._pending[signal].items + self._out[signal].items

    # --- taking data ------------------------------------------------------------------------

    def consume(self, envelope: Envelope) -> None:
        signal, n = envelope.signal, envelope.items
        if n == 0:
            return
        if self.send_batch_max_size and n > self.send_batch_max_size:
            chunks = [Envelope(signal, piece, items=k)
                      for piece, k in split_request(signal, envelope.message, self.send_batch_max_size)]
        else:
            chunks = (envelope,)
        now = self._clock()
        p = self._pending[signal]
        with self._lock:
            held = p.items + self._out[signal].items
            if self._closed:
                raise Refused("shutting_down", retry_after=1.0, message=f"processor {self.id} is shutting down")
            if held and held + n > self.max_pending_items:
                raise Refused("batch_full", retry_after=max(self.timeout, 1.0),
                              message=f"processor {self.id}: {held} {signal.item_name} pending, "
                                      f"limit {self.max_pending_items}; the next stage is not keeping up")
            was_empty = not p.items
            if was_empty:
                p.since = now
            p.chunks.extend(chunks)
            p.items += n
            ready = p.items >= self.send_batch_size
        if was_empty:
            self._ticker.wake()
        if ready:
            self._send(signal, force=False, blocking=False)

    # --- sending ----------------------------------------------------------------------------

    def _take(self, p: _Pending, force: bool) -> Envelope | None:
        """Cut the next batch under the lock: at least send_batch_size items unless ``force``."""
        if not p.chunks or (not force and p.items < self.send_batch_size):
            return None
        batch: list[Envelope] = []
        n = 0
        limit = self.send_batch_max_size
        while p.chunks:
            k = p.chunks[0].items
            if batch and (n >= self.send_batch_size or (limit and n + k > limit)):
                break
            batch.append(p.chunks.popleft())
            n += k
        p.items -= n
        return Envelope.merge(batch)

    def _send(self, signal: Signal, *, force: bool, blocking: bool) -> bool:
        """Send ready batches on this thread, in order. False when the next stage refused (the data waits)."""
        p, out = self._pending[signal], self._out[signal]
        while True:
            if not out.flush(blocking=blocking):
                return False
            with self._lock:
                batch = self._take(p, force)
                if batch is None:
                    return True
                out.put(batch)

    def _due(self, signal: Signal) -> float | None:
        """When this signal's data must go next: a refused batch's retry time, else the oldest item's timeout."""
        p, out = self._pending[signal], self._out[signal]
        if len(out):
            return out.retry_at
        return p.since + self.timeout if p.items else None

    def tick(self) -> None:
        """Send every signal's data that is due (the timer's work; tests call it with a fake clock)."""
        now = self._clock()
        for signal in Signal:
            due = self._due(signal)
            if due is not None and now >= due:
                self._send(signal, force=True, blocking=True)

    def _until_due(self) -> float | None:
        dues = [d for d in map(self._due, Signal) if d is not None]
        return max(0.0, min(dues) - self._clock()) if dues else None

    # --- lifecycle --------------------------------------------------------------------------

    def start(self, host) -> None:
        self._ticker.start()

    def shutdown(self, deadline: float) -> None:
        """Refuse new data, send everything pending, retry refusals until ``deadline``; count the rest dropped."""
        with self._lock:
            self._closed = True
        self._ticker.stop(deadline)
        for signal, p in self._pending.items():
            out = self._out[signal]
            with self._lock:
                while (batch := self._take(p, force=True)) is not None:
                    out.put(batch)
            out.drain(deadline)


FACTORY = Factory(
    type="batch",
    kind=Kind.PROCESSOR,
    config_model=BatchConfig,
    create=lambda settings, cfg, next_consumer: BatchProcessor(settings, cfg, next_consumer),
    signals=ALL_SIGNALS,
    telemetry=frozenset({"sidecar_batch_pending_items"}),
)
