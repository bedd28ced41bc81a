"""Durable until decided: tail sampling's buffer survives ``kill -9``, OOM kills and node restarts.

With ``tail_sampling.storage`` naming a ``file_storage`` extension, every traces and logs
request is appended to a write-ahead log (:mod:`.wal`) and synced before the receiver
acknowledges it, so the acknowledgement means "on disk": before ``consume`` returns, or, for
a request a fan-out shares with other pipelines (the shipped default's audit branch), before
the fan-out returns (:class:`sidecar.envelope.Commitments`), so the sync overlaps the other
branches' work. The log is group-committed: one ``fdatasync`` covers every record written
before it began, and the request is sorted into the in-memory buffer before it waits.

What keeps a segment of the log is a pin on it (see :mod:`.wal`):

- a request being consumed pins the segment it was written to;
- a buffered trace pins the oldest segment holding its data (a pin keeps every newer
  segment too): the segment of the request that created it, or of an older request sorted
  later (concurrent requests carrying one trace are sorted in any order; the pin moves back).
  The traces a request's sort created are pinned together when the sort ends, while the
  request's own pin still holds the segment;
- once decided (on time, or early because the buffer was full), a kept trace's pin moves
  to the output request that carries it, which holds it until the next stage accepted it
  (the redaction processor, then an exporter's persistent queue, which is durable itself)
  or refused it for good; a trace that is not kept releases its pin at once.

At start, the segments a previous run left are replayed into the buffer as newly arrived
data (the decision wait starts again), counted in ``sidecar_tail_sampling_recovered_items``.
Replay can deliver a kept trace a second time (at least once); it never loses one.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from prometheus_client import Counter, Gauge

from sidecar.component import Kind, Refused
from sidecar.envelope import Envelope
from sidecar.processors.tail_sampling.buffer import Trace, TraceBuffer
from sidecar.processors.tail_sampling.config import TailSamplingConfig
from sidecar.processors.tail_sampling.wal import WriteAheadLog
from sidecar.registry import CreateSettings
from sidecar.signals import Signal

log = logging.getLogger(__name__)

#: the metric families of the durable buffer (registered with or without storage)
TELEMETRY = frozenset({"sidecar_tail_sampling_recovered_items", "sidecar_tail_sampling_stored_bytes",
                       "sidecar_tail_sampling_log_syncs"})


def _committed(wal: WriteAheadLog, index: int, ticket: int) -> None:
    """Wait until the record with ``ticket`` is on disk (the sync in progress or the next one), then drop the pin its
    request held on segment ``index``; a failed sync refuses the request (:meth:`WriteAheadLog.commit`)."""
    try:
        wal.commit(ticket)
    finally:
        wal.unpin(index)


class PinnedEnvelope(Envelope):
    """Decided output that pins a log segment until the next stage took it."""

    __slots__ = ("segment",)


class PinningTraceBuffer(TraceBuffer):
    """The trace buffer, pinning each new trace's segment (and an older one when older data joins it).

    A request's sort runs inside ``with buffer.sorting():`` under the processor's lock, so the
    segment and the count of traces created belong to that one sort: a new trace costs two
    attribute writes, and its pin is taken with the others when the sort ends. A trace taken
    out because the buffer is full keeps its pin: the processor decides it, as any other.
    """

    def __init__(self, durable: "DurableBuffer", **kwargs):
        super().__init__(**kwargs)
        self._durable = durable
        self.segment = -1  # the segment of the request being sorted
        self._created = 0  # traces created in this sort and still buffered, not pinned yet
        self._borrowed = False  # the sort pinned a segment itself (no request pinned one for it)

    def sorting(self) -> "PinningTraceBuffer":
        return self

    def __enter__(self) -> None:
        self.segment, self._borrowed = self._durable.segment_here()
        self._created = 0

    def __exit__(self, *exc) -> None:
        self._durable.pin_created(self.segment, self._created, self._borrowed)

    def note_created(self, n: int) -> None:
        super().note_created(n)
        self._created += n

    def repin(self, traces: list[Trace]) -> None:
        """Move the pins of ``traces`` back to this sort's older segment (pinned before the newer ones go);
        a trace may be listed once per run the request held of it."""
        traces = list({id(t): t for t in traces}.values())
        self._durable.pin(self.segment, len(traces))
        self._durable.release(traces)
        for t in traces:
            t.segment = self.segment

    def _pop_oldest(self) -> Trace:
        # the newest traces are this sort's, not pinned yet: when only they are left, the oldest is one of
        # them; it is pinned now, as every trace the processor decides holds a pin until then
        fresh = len(self.traces) <= self._created
        t = super()._pop_oldest()
        if fresh:
            self._created -= 1
            self._durable.pin(t.segment, 1)
        return t


class DurableBuffer:
    """The processor's side of the log: writes, pins, replay. See the module docstring."""

    def __init__(self, settings: CreateSettings, cfg: TailSamplingConfig):
        self._id = str(settings.id)
        self._tel = settings.telemetry
        self._storage = cfg.storage
        self._cfg = cfg.wal
        self._wal: WriteAheadLog | None = None
        self._here = threading.local()  # .segment: the segment of the request this thread is sorting
        family = settings.telemetry.root.family
        recovered = family(Counter, "sidecar_tail_sampling_recovered_items",
                           "Spans and log records read back from tail sampling's log at start (undecided when the "
                           "previous run stopped) and buffered again.", ("component", "signal"))
        self._recovered = {s: recovered.labels(self._id, s.value) for s in (Signal.TRACES, Signal.LOGS)}
        family(Gauge, "sidecar_tail_sampling_stored_bytes",
               "Bytes of tail sampling's log on disk (undecided data, and decided data not yet handed on).",
               ("component",)).labels(self._id).set_function(lambda: self._wal.stored_bytes if self._wal else 0)
        self._syncs = family(Counter, "sidecar_tail_sampling_log_syncs",
                             "fdatasync calls that committed tail sampling's log (each covers every request "
                             "written before it began: group commit).", ("component",)).labels(self._id)

    @property
    def enabled(self) -> bool:
        return self._storage is not None

    def trace_buffer(self, **kwargs) -> TraceBuffer:
        """The processor's trace buffer: a pinning one when the log is on."""
        return PinningTraceBuffer(self, **kwargs) if self.enabled else TraceBuffer(**kwargs)

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self, host, sort: Callable[[Envelope], None]) -> None:
        """Open the log in the storage extension's directory and replay what a previous run left into ``sort``."""
        if not self.enabled or self._wal is not None:
            return
        from sidecar.extensions.file_storage import FileStorage

        where = f"processors.{self._id}.storage"
        try:
            ext = host.extension(self._storage)
        except LookupError:
            raise ValueError(f"{where}: {self._storage!r} is not an enabled extension "
                             "(define it under extensions and list it in service.extensions)") from None
        if not isinstance(ext, FileStorage):
            raise ValueError(f"{where}: {self._storage!r} is not a file_storage extension")
        wal = WriteAheadLog(ext.directory_for(Kind.PROCESSOR, self._id), max_bytes=self._cfg.max_bytes,
                            segment_bytes=self._cfg.segment_bytes, fsync=ext.fsync, on_sync=self._syncs.inc)
        left = wal.open()
        self._wal = wal
        for index in left:
            self._replay(wal, index, sort)

    def _replay(self, wal: WriteAheadLog, index: int, sort: Callable[[Envelope], None]) -> None:
        here = self._here
        here.segment = index
        counts = {Signal.TRACES: 0, Signal.LOGS: 0}
        kept_pinned = False
        try:
            for signal, items, payload in wal.records(index):
                try:
                    sort(Envelope(signal, encoded=payload, items=items))
                except Refused as e:
                    # the next stage refuses now: keep the segment for the next start rather than lose it
                    log.warning("%s: replaying %d %s from the log: %s; the segment stays for the next start",
                                self._id, items, signal.item_name, e)
                    kept_pinned = True
                    continue
                except Exception:  # a record that passed its checksum but does not sort: never block the start
                    log.exception("%s: cannot replay %d %s from log segment %d; dropping them", self._id, items,
                                  signal.item_name, index)
                    self._tel.dropped(signal, items, "unreadable")
                    continue
                counts[signal] += items
        finally:
            here.segment = None
        for signal, n in counts.items():
            if n:
                self._recovered[signal].inc(n)
        if any(counts.values()):
            log.info("%s: recovered %d spans and %d log records from the log segment %d", self._id,
                     counts[Signal.TRACES], counts[Signal.LOGS], index)
        if not kept_pinned:
            wal.unpin(index)  # the replay pin; the re-buffered traces pin what they still need

    def close(self) -> None:
        """Close the log; what is still pinned (undecided or not handed on) stays for the next start."""
        wal, self._wal = self._wal, None
        if wal is not None:
            wal.close()

    def abandon(self) -> None:
        """Let go of the log and delete nothing, as ``kill -9`` would (tests and the benchmark)."""
        wal, self._wal = self._wal, None
        if wal is not None:
            wal.abandon()

    # --- the hot path ---------------------------------------------------------------------------

    def consume(self, envelope: Envelope, sort: Callable[[Envelope], None]) -> None:
        """Log ``envelope`` and sort it into the buffer; return once it is on disk, or leave the wait for the sync
        to the request's commitments (a fan-out runs it before the request is acknowledged: in the meantime
        another request's sync may cover it)."""
        wal = self._wal
        if wal is None or envelope.signal not in (Signal.TRACES, Signal.LOGS):
            sort(envelope)  # not started (tests that never start), or a signal that is refused anyway
            return
        index, ticket = wal.write(envelope.signal, envelope.items, envelope.encoded)  # pinned while in flight
        here = self._here
        here.segment = index
        try:
            sort(envelope)
        except BaseException:
            wal.unpin(index)
            raise
        finally:
            here.segment = None
        commitments = envelope.commitments
        if commitments is None or not commitments.defer(lambda: _committed(wal, index, ticket)):
            _committed(wal, index, ticket)

    def segment_here(self) -> tuple[int, bool]:
        """The segment of the request this thread is sorting, which that request pins; else (a sort outside
        :meth:`consume`) the oldest live one, pinned here: (index, whether pinned here). -1: no log."""
        wal = self._wal
        if wal is None:
            return -1, False
        index = getattr(self._here, "segment", None)
        return (index, False) if index is not None else (wal.pin(), True)

    def pin_created(self, index: int, created: int, borrowed: bool) -> None:
        """A sort ended: pin segment ``index`` once for each trace it created (the request's own pin kept the
        segment until now), and drop the pin :meth:`segment_here` took for a sort outside a request."""
        wal = self._wal
        if wal is None or index < 0:
            return
        if created:
            wal.pin(index, created)
        if borrowed:
            wal.unpin(index)

    def pin(self, index: int, n: int) -> None:
        """Pin segment ``index`` ``n`` more times (traces that hold it from now on)."""
        wal = self._wal
        if wal is not None and index >= 0 and n:
            wal.pin(index, n)

    def release(self, traces) -> None:
        """Drop the pins of traces (or outputs) that were dropped, or whose output now pins for them."""
        wal = self._wal
        if wal is None:
            return
        counts: dict[int, int] = {}
        for t in traces:
            seg = getattr(t, "segment", -1)
            if seg >= 0:
                t.segment = -1
                counts[seg] = counts.get(seg, 0) + 1
        if counts:
            wal.unpin_many(counts)

    def envelope(self, signal: Signal, encoded: bytes, items: int, traces: list[Trace] | None) -> Envelope:
        """Decided output (its encoding) pinning the oldest segment its data came from: that of the oldest of
        ``traces``, or, for output made while sorting a request, that request's segment."""
        env = PinnedEnvelope(signal, encoded=encoded, items=items)
        env.segment = -1
        wal = self._wal
        if wal is not None:
            if traces:
                segs = [t.segment for t in traces if getattr(t, "segment", -1) >= 0]
                if segs:
                    env.segment = wal.pin(min(segs))
            else:
                env.segment = wal.pin(getattr(self._here, "segment", None))
        return env

    def merge(self, envelopes: list[Envelope]) -> Envelope:
        """Decided outputs waiting together, as one (the outbox coalesces them): it pins the oldest of their
        segments, which keeps every newer one, and their own pins go (deleting nothing)."""
        merged = self.envelope(envelopes[0].signal, b"".join([e.encoded for e in envelopes]),
                               sum(e.items for e in envelopes), envelopes)
        self.release(envelopes)
        return merged

    def releasing(self, next_consumer):
        """The next stage, as the output sees it: an accepted (or for good refused) output drops its pin."""
        return _Releasing(next_consumer, self) if self.enabled else next_consumer

    def delivered(self, env: Envelope) -> None:
        """The next stage took ``env``, or it was given up (refused for good, dropped past ``output.max_items``:
        counted as lost either way): its pin goes."""
        seg = getattr(env, "segment", -1)
        wal = self._wal
        if seg >= 0 and wal is not None:
            env.segment = -1
            wal.unpin(seg)

    @property
    def stored_bytes(self) -> int:
        return self._wal.stored_bytes if self._wal else 0

    @property
    def segments(self) -> int:
        return self._wal.segments if self._wal else 0


class _Releasing:
    __slots__ = ("_next", "_durable")

    def __init__(self, next_consumer, durable: DurableBuffer):
        self._next = next_consumer
        self._durable = durable

    def consume(self, envelope: Envelope) -> None:
        try:
            self._next.consume(envelope)
        except Refused as e:
            if not e.retryable:
                self._durable.delivered(envelope)  # dropped for good by the outbox, counted there
            raise
        except Exception:
            self._durable.delivered(envelope)
            raise
        self._durable.delivered(envelope)
