"""Undecided traces: spans and log records held as their serialized bytes, grouped under resource and scope.

Each span or log record is kept as its own wire encoding (one ``SerializeToString()``
in C), so memory is about the wire size and the received request is freed as soon as
it has been read. What the policies need is extracted in the same pass and folded
into a few integers per trace (status bits, earliest start, latest end, matched
attribute checks, randomness); only kept traces are ever parsed again.

A :class:`Trace` keeps ``(group key, [bytes, ...])`` runs, where the key names the
encoded resource and scope heads (and, for spans, the original tracestate) the items
are re-emitted under. The :class:`TraceBuffer` orders traces by first arrival, which is
also their ``decision_wait`` deadline order, and roots by arrival, which is their
early-decision order; so finding due traces costs only the traces that are due.
Memory is bounded by ``num_traces`` and a byte budget; eviction takes the oldest.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from sidecar.processors.tail_sampling.decisions import randomness

#: Bytes a buffered item costs beyond its encoding (the bytes object header and its list slot).
ITEM_OVERHEAD = 48
#: Bytes a buffered trace costs before any item (the Trace, its id, map entry, groups, deadline entry;
#: measured with tracemalloc).
TRACE_OVERHEAD = 960


class Trace:
    """One buffered trace. The processor's hot loop fills it directly."""

    __slots__ = ("trace_id", "first_seen", "root_deadline", "span_groups", "log_groups", "last_span_key",
                 "last_spans", "last_log_key", "last_logs", "n_spans", "n_logs", "nbytes", "status_mask", "start",
                 "end", "matched", "rv")

    def __init__(self, trace_id: bytes, now: float):
        self.trace_id = trace_id
        self.first_seen = now
        self.root_deadline: float | None = None
        #: [((resource head, scope head, tracestate), [span bytes, ...]), ...]
        self.span_groups: list[tuple] = []
        #: [((resource head, scope head), [log record bytes, ...]), ...]
        self.log_groups: list[tuple] = []
        self.last_span_key = None
        self.last_spans: list | None = None
        self.last_log_key = None
        self.last_logs: list | None = None
        self.n_spans = 0
        self.n_logs = 0
        self.nbytes = TRACE_OVERHEAD
        #: bit (1 << code) for each span status code seen (0 unset, 1 ok, 2 error)
        self.status_mask = 0
        #: earliest non-zero span start and latest span end, in ns
        self.start = 0
        self.end = 0
        #: bits of the attribute checks some span matched (see policies.attribute_checks)
        self.matched = 0
        #: ``rv`` from the first tracestate that has one
        self.rv: int | None = None

    def add_spans(self, key: tuple, spans: list, nbytes: int) -> int:
        """Append a run of encoded spans (``nbytes`` in all) under ``key``; consecutive runs under one key
        share a group. Returns the memory added: the encoded size plus the per-item overhead."""
        if self.last_span_key is key:
            self.last_spans.extend(spans)
        else:
            self.last_span_key = key
            self.last_spans = spans
            self.span_groups.append((key, spans))
        self.n_spans += len(spans)
        size = nbytes + len(spans) * ITEM_OVERHEAD
        self.nbytes += size
        return size

    def add_logs(self, key: tuple, records: list, nbytes: int) -> int:
        """:meth:`add_spans` for a run of encoded log records."""
        if self.last_log_key is key:
            self.last_logs.extend(records)
        else:
            self.last_log_key = key
            self.last_logs = records
            self.log_groups.append((key, records))
        self.n_logs += len(records)
        size = nbytes + len(records) * ITEM_OVERHEAD
        self.nbytes += size
        return size

    @property
    def duration_ns(self) -> int:
        """Earliest span start to latest span end, as the OpenTelemetry Collector measures it."""
        return max(0, self.end - self.start) if self.start else 0

    def randomness(self) -> int:
        """R for consistent sampling: ``rv`` from the first tracestate that has one, else the trace id."""
        rv = self.rv
        return rv if rv is not None else randomness(self.trace_id)

    def note_tracestate(self, tracestate: str) -> None:
        """Remember R from the first tracestate carrying ``rv`` (called only when it contains ``rv:``)."""
        if self.rv is None:
            self.rv = randomness(self.trace_id, tracestate)


class TraceBuffer:
    """Traces in first-arrival order plus a queue of early (root-triggered) deadlines."""

    #: the class of new traces (the durable buffer's traces also name the log segment they pin)
    trace_type = Trace

    def __init__(self, *, decision_wait: float, root_wait: float, num_traces: int, max_bytes: int):
        self.decision_wait = decision_wait
        self.root_wait = root_wait
        self.num_traces = num_traces
        self.max_bytes = max_bytes
        self.traces: OrderedDict[bytes, Trace] = OrderedDict()
        self._roots: deque[tuple[float, Trace]] = deque()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.traces)

    def create(self, trace_id: bytes, now: float, evicted: list[Trace]) -> Trace:
        """A new trace; the oldest is evicted (appended to ``evicted``) when ``num_traces`` are held."""
        traces = self.traces
        while len(traces) >= self.num_traces:
            evicted.append(self._pop_oldest())
        t = self.trace_type(trace_id, now)
        traces[trace_id] = t
        self.nbytes += TRACE_OVERHEAD
        return t

    def root_arrived(self, trace: Trace, now: float) -> None:
        """The local root span ended: decide after the grace period, unless already scheduled."""
        if trace.root_deadline is None:
            trace.root_deadline = now + self.root_wait
            self._roots.append((trace.root_deadline, trace))

    def add_bytes(self, n: int) -> None:
        self.nbytes += n

    def over_budget(self, evicted: list[Trace]) -> None:
        """Evict oldest traces until the byte budget holds."""
        while self.nbytes > self.max_bytes and self.traces:
            evicted.append(self._pop_oldest())

    def _pop_oldest(self) -> Trace:
        _, t = self.traces.popitem(last=False)
        self.nbytes -= t.nbytes
        return t

    def _remove(self, t: Trace) -> None:
        del self.traces[t.trace_id]
        self.nbytes -= t.nbytes

    def due(self, now: float) -> list[Trace]:
        """Remove and return the traces whose decision time has come (root grace over, or decision_wait)."""
        out = []
        roots = self._roots
        traces = self.traces
        while roots and roots[0][0] <= now:
            _, t = roots.popleft()
            if traces.get(t.trace_id) is t:
                self._remove(t)
                out.append(t)
        cutoff = now - self.decision_wait
        while traces:
            t = next(iter(traces.values()))
            if t.first_seen > cutoff:
                break
            self._remove(t)
            out.append(t)
        return out

    def drain(self) -> list[Trace]:
        """Remove and return every buffered trace (shutdown)."""
        out = list(self.traces.values())
        self.traces.clear()
        self._roots.clear()
        self.nbytes = 0
        return out
