"""The pure-Python twin of ``_trace.c``: a buffered trace's fields and their defaults (see buffer.Trace).

Used when the extension is not built or ``SIDECAR_PURE_PYTHON=1``; the C type has the same fields and
defaults (tests/sidecar/tail_sampling/test_trace_fields.py), is made without a Python ``__init__`` and is not
tracked by the garbage collector.
"""

from __future__ import annotations

#: Bytes a buffered trace costs before any item (the Trace, its id, map entry, groups, deadline entry;
#: measured with tracemalloc). The C type starts ``nbytes`` at the same figure.
TRACE_OVERHEAD = 960


class TraceBase:
    __slots__ = ("trace_id", "first_seen", "root_deadline", "spans_key", "spans", "more_spans", "logs_key", "logs",
                 "more_logs", "n_spans", "n_logs", "nbytes", "status_mask", "start", "end", "matched", "rv",
                 "segment")

    def __init__(self, trace_id: bytes, now: float):
        self.trace_id = trace_id
        self.first_seen = now
        self.root_deadline = None
        self.spans_key = None
        self.spans = None
        self.more_spans = None
        self.logs_key = None
        self.logs = None
        self.more_logs = None
        self.n_spans = 0
        self.n_logs = 0
        self.nbytes = TRACE_OVERHEAD
        self.status_mask = 0
        self.start = 0
        self.end = 0
        self.matched = 0
        self.rv = None
        self.segment = -1
