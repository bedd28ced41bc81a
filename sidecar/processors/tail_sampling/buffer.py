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
Memory is bounded by ``num_traces`` and a byte budget: when either is full, the oldest traces are
taken out (``evicted``) and the processor decides them early, on what has arrived.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from contextlib import nullcontext

from contract.accelerators import choose
from sidecar.processors.tail_sampling import _trace_py
from sidecar.processors.tail_sampling._trace_py import ITEM_OVERHEAD, TRACE_OVERHEAD
from sidecar.processors.tail_sampling.decisions import randomness

#: A trace's fields, the sort of a request's runs into the buffer and the decision loop: the C extension when
#: built (and not switched off), else the pure-Python twin.
_fields = choose("sidecar.processors.tail_sampling._trace", _trace_py)
sort_spans = _fields.sort_spans
sort_logs = _fields.sort_logs
decide = _fields.decide
_NOTHING = nullcontext()


class Trace(_fields.TraceBase):
    """One buffered trace. The processor's hot loop fills it directly.

    Its fields (``_trace.c``, or the twin ``_trace_py.TraceBase``), in the order the loop fills them:

    - ``trace_id``, ``first_seen`` (when it was created: its ``decision_wait`` starts), ``root_deadline``
      (set once the local root ended: ``decision_wait_after_root_received`` later; None before);
    - ``spans_key`` and ``spans``: the first group of spans, its key (resource head, scope head, tracestate)
      and its span bytes (a tuple; a list once a later run joins it); ``more_spans``: further groups in
      arrival order, [(key, [span bytes, ...]), ...], or None; ``logs_key``, ``logs``, ``more_logs`` the same
      for log records (keys: resource head, scope head);
    - ``n_spans``, ``n_logs``, ``nbytes`` (what it holds, from ``TRACE_OVERHEAD`` up);
    - what the policies read: ``status_mask`` (bit 1 << code for each span status code seen: 0 unset, 1 ok,
      2 error), ``start`` and ``end`` (earliest non-zero span start, latest end, ns), ``matched`` (bits of
      the attribute checks some span passed, see policies.attribute_checks), ``rv`` (from the first
      tracestate that has one, else None);
    - ``segment``: the write-ahead log segment it pins (the durable buffer's; -1: none).

    Most traces arrive as one run of spans and one of log records, so the first group of each is
    held in two slots, as a tuple, and only further runs make lists. The C type is made without a
    Python ``__init__`` and the garbage collector never walks it (a trace can be in no reference cycle):
    a buffered trace lives seconds, and the collector's passes over survivors cost in proportion to them.
    """

    __slots__ = ()

    def add_spans(self, key: tuple, spans: tuple | list, nbytes: int) -> int:
        """Append a run of encoded spans (``nbytes`` in all) under ``key``; consecutive runs under one key
        share a group. Returns the memory added: the encoded size plus the per-item overhead."""
        if self.spans is None:
            self.spans_key, self.spans = key, tuple(spans)
        else:
            more = self.more_spans
            if more is None:
                if self.spans_key is key:
                    group = self.spans
                    if type(group) is tuple:  # a second run: a list from now on
                        group = self.spans = list(group)
                    group.extend(spans)
                else:
                    self.more_spans = [(key, list(spans))]
            elif more[-1][0] is key:
                more[-1][1].extend(spans)
            else:
                more.append((key, list(spans)))
        self.n_spans += len(spans)
        size = nbytes + len(spans) * ITEM_OVERHEAD
        self.nbytes += size
        return size

    def add_logs(self, key: tuple, records: tuple | list, nbytes: int) -> int:
        """:meth:`add_spans` for a run of encoded log records."""
        if self.logs is None:
            self.logs_key, self.logs = key, tuple(records)
        else:
            more = self.more_logs
            if more is None:
                if self.logs_key is key:
                    group = self.logs
                    if type(group) is tuple:  # a second run: a list from now on
                        group = self.logs = list(group)
                    group.extend(records)
                else:
                    self.more_logs = [(key, list(records))]
            elif more[-1][0] is key:
                more[-1][1].extend(records)
            else:
                more.append((key, list(records)))
        self.n_logs += len(records)
        size = nbytes + len(records) * ITEM_OVERHEAD
        self.nbytes += size
        return size

    @property
    def span_groups(self) -> list[tuple]:
        """[((resource head, scope head, tracestate), [span bytes, ...]), ...] in arrival order."""
        if self.spans is None:
            return []
        first = [(self.spans_key, self.spans)]
        return first + self.more_spans if self.more_spans else first

    @property
    def log_groups(self) -> list[tuple]:
        """[((resource head, scope head), [log record bytes, ...]), ...] in arrival order."""
        if self.logs is None:
            return []
        first = [(self.logs_key, self.logs)]
        return first + self.more_logs if self.more_logs else first

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
    #: the log segment of the request being sorted (the durable buffer's; -1: no log)
    segment = -1

    def __init__(self, *, decision_wait: float, root_wait: float, num_traces: int, max_bytes: int):
        self.decision_wait = decision_wait
        self.root_wait = root_wait
        self.num_traces = num_traces
        self.max_bytes = max_bytes
        self.traces: OrderedDict[bytes, Trace] = OrderedDict()
        #: traces whose root arrived, by ``root_deadline`` (set once, in arrival order)
        self.roots: deque[Trace] = deque()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.traces)

    def sorting(self):
        """The context of one request's sort, entered under the processor's lock (the durable buffer pins
        the traces the sort created when it ends): nothing here."""
        return _NOTHING

    def repin(self, traces: list[Trace]) -> None:
        """The sort brought ``traces`` data of an older log segment than the one they pin (the durable
        buffer moves their pins to it): nothing here."""

    def create(self, trace_id: bytes, now: float, evicted: list[Trace]) -> Trace:
        """A new trace, pinning this sort's segment; the oldest is taken out (appended to ``evicted``) when
        ``num_traces`` are held. The C sort makes the same trace itself while there is room."""
        traces = self.traces
        while len(traces) >= self.num_traces:
            evicted.append(self._pop_oldest())
        t = self.trace_type(trace_id, now)
        t.segment = self.segment
        traces[trace_id] = t
        self.note_created(1)
        return t

    def note_created(self, n: int) -> None:
        """``n`` traces were made for this sort: by :meth:`create`, or by the C sort itself while the buffer has
        room (it tells the buffer before anything else of the buffer runs)."""
        self.nbytes += n * TRACE_OVERHEAD

    def root_arrived(self, trace: Trace, now: float) -> None:
        """The local root span ended: decide after the grace period, unless already scheduled."""
        if trace.root_deadline is None:
            trace.root_deadline = now + self.root_wait
            self.roots.append(trace)

    def add_bytes(self, n: int) -> None:
        self.nbytes += n

    def over_budget(self, evicted: list[Trace]) -> None:
        """Take out the oldest traces (appended to ``evicted``) until the byte budget holds."""
        while self.nbytes > self.max_bytes and self.traces:
            evicted.append(self._pop_oldest())

    def _pop_oldest(self) -> Trace:
        _, t = self.traces.popitem(last=False)
        self.nbytes -= t.nbytes
        return t

    def due(self, now: float) -> list[Trace]:
        """Remove and return the traces whose decision time has come (root grace over, or decision_wait)."""
        out = []
        roots = self.roots
        traces = self.traces
        nbytes = 0
        while roots and roots[0].root_deadline <= now:
            t = roots.popleft()
            tid = t.trace_id
            if traces.get(tid) is t:
                del traces[tid]
                nbytes += t.nbytes
                out.append(t)
        cutoff = now - self.decision_wait
        if traces:
            old = []
            for t in traces.values():  # oldest first: stop at the first one still waiting
                if t.first_seen > cutoff:
                    break
                old.append(t)
            for t in old:
                del traces[t.trace_id]
                nbytes += t.nbytes
            out += old
        self.nbytes -= nbytes
        return out

    def drain(self) -> list[Trace]:
        """Remove and return every buffered trace (shutdown)."""
        out = list(self.traces.values())
        self.traces.clear()
        self.roots.clear()
        self.nbytes = 0
        return out
