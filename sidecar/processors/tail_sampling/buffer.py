"""Undecided traces: spans and log records held by reference, grouped under their resource and scope.

A :class:`Trace` keeps the original protobuf sub-messages (no copies) in groups of
``(resource_x, scope_x, [items])`` so kept data can be re-emitted under its resource
and scope. The :class:`TraceBuffer` orders traces by first arrival, which is also
their ``decision_wait`` deadline order, and roots by arrival, which is their
early-decision order; so finding due traces costs only the traces that are due.
Memory is bounded by ``num_traces`` and a byte budget; eviction takes the oldest.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from sidecar.processors.tail_sampling.decisions import randomness

STATUS_ERROR = 2


class Trace:
    """One buffered trace. The processor's hot loop appends to the groups directly."""

    __slots__ = ("trace_id", "first_seen", "root_deadline", "span_groups", "log_groups", "last_ss", "last_spans",
                 "last_sl", "last_logs", "n_spans", "n_logs", "nbytes", "_stats", "_randomness")

    def __init__(self, trace_id: bytes, now: float):
        self.trace_id = trace_id
        self.first_seen = now
        self.root_deadline: float | None = None
        #: [(ResourceSpans, ScopeSpans, [Span, ...]), ...] referencing the received requests
        self.span_groups: list[tuple] = []
        #: [(ResourceLogs, ScopeLogs, [LogRecord, ...]), ...]
        self.log_groups: list[tuple] = []
        self.last_ss = None
        self.last_spans: list | None = None
        self.last_sl = None
        self.last_logs: list | None = None
        self.n_spans = 0
        self.n_logs = 0
        self.nbytes = 0.0
        self._stats: tuple[frozenset, int, int] | None = None
        self._randomness: int | None = None

    # --- what policies ask, computed once per trace at decision time ----------------------------

    def _compute_stats(self) -> tuple[frozenset, int, int]:
        codes = set()
        start = 0
        end = 0
        for _, _, spans in self.span_groups:
            for span in spans:
                codes.add(span.status.code)
                s = span.start_time_unix_nano
                e = span.end_time_unix_nano
                if s and (not start or s < start):
                    start = s
                if e > end:
                    end = e
        self._stats = (frozenset(codes), start, end)
        return self._stats

    @property
    def status_codes(self) -> frozenset:
        """Status codes (0 unset, 1 ok, 2 error) present on any span."""
        return (self._stats or self._compute_stats())[0]

    @property
    def duration_ns(self) -> int:
        """Earliest span start to latest span end, as the OpenTelemetry Collector measures it."""
        _, start, end = self._stats or self._compute_stats()
        return max(0, end - start) if start else 0

    def randomness(self) -> int:
        """R for consistent sampling: ``rv`` from the first tracestate that has one, else the trace id."""
        r = self._randomness
        if r is None:
            r = None
            for _, _, spans in self.span_groups:
                for span in spans:
                    ts = span.trace_state
                    if ts and "rv:" in ts:
                        r = randomness(self.trace_id, ts)
                        break
                if r is not None:
                    break
            if r is None:
                r = randomness(self.trace_id)
            self._randomness = r
        return r


class TraceBuffer:
    """Traces in first-arrival order plus a queue of early (root-triggered) deadlines."""

    def __init__(self, *, decision_wait: float, root_wait: float, num_traces: int, max_bytes: int):
        self.decision_wait = decision_wait
        self.root_wait = root_wait
        self.num_traces = num_traces
        self.max_bytes = max_bytes
        self.traces: OrderedDict[bytes, Trace] = OrderedDict()
        self._roots: deque[tuple[float, Trace]] = deque()
        self.nbytes = 0.0

    def __len__(self) -> int:
        return len(self.traces)

    def create(self, trace_id: bytes, now: float, evicted: list[Trace]) -> Trace:
        """A new trace; the oldest is evicted (appended to ``evicted``) when ``num_traces`` are held."""
        traces = self.traces
        while len(traces) >= self.num_traces:
            evicted.append(self._pop_oldest())
        t = Trace(trace_id, now)
        traces[trace_id] = t
        return t

    def root_arrived(self, trace: Trace, now: float) -> None:
        """The local root span ended: decide after the grace period, unless already scheduled."""
        if trace.root_deadline is None:
            trace.root_deadline = now + self.root_wait
            self._roots.append((trace.root_deadline, trace))

    def add_bytes(self, n: float) -> None:
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
        if not traces:
            self.nbytes = 0.0  # no float drift across a long run
        return out

    def drain(self) -> list[Trace]:
        """Remove and return every buffered trace (shutdown)."""
        out = list(self.traces.values())
        self.traces.clear()
        self._roots.clear()
        self.nbytes = 0.0
        return out
