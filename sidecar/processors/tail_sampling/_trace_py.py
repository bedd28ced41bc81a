"""The pure-Python twin of ``_trace.c``: tail sampling's per-trace work (see buffer.Trace).

A buffered trace's fields and their defaults (``TraceBase``), the sort of a request's runs into the buffer
(``sort_spans``, ``sort_logs``) and the decision loop (``decide``). Used when the extension is not built or
``SIDECAR_PURE_PYTHON=1``; the C half gives the same fields, buffers and decisions
(tests/sidecar/tail_sampling/test_trace_fields.py, test_trace_parity.py), makes a trace without a Python
``__init__`` and keeps it out of the garbage collector's sight.
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


#: Bytes a buffered item costs beyond its encoding (the bytes object header and its list slot).
ITEM_OVERHEAD = 48


def sort_spans(runs: list, buf, now: float, sampled: dict, not_sampled: dict, needs: tuple[bool, bool, bool],
               checks: tuple | None, late_kept: list, passthrough: list, older: list,
               evicted: list) -> tuple[int, int, int]:
    """Sort a traces request's runs (``wire.span_runs``) into ``buf``, a TraceBuffer, under the processor's lock.

    ``sampled`` and ``not_sampled``: the decision caches' maps (a late span of a decided trace follows its
    decision); ``needs``: whether the policies read status, times, randomness; ``checks``: None, or (all
    check bits, the hits of a run with no checked key, resource_matches(values) -> bits, matched(hits,
    resource bits) -> bits). Appends to ``late_kept`` (resource head, scope head, spans, tracestate,
    decision), ``passthrough`` (resource head, scope head, spans: no trace id), ``older`` (traces this
    request brought data of an older log segment than the one they pin) and ``evicted`` (taken out of a
    full buffer). Returns (bytes added, late kept spans, late dropped spans).
    """
    need_status, need_times, need_rv = needs
    if checks is not None:
        all_checks, no_hits, resource_matches, matched = checks
    traces, create, roots, segment = buf.traces, buf.create, buf.roots, buf.segment
    root_deadline = now + buf.root_wait
    added = n_late_kept = late_dropped = 0
    for rhead, scopes, res_values in runs:
        res_matched = resource_matches(res_values) if checks is not None else 0
        for shead, span_runs in scopes:
            plain_key = (rhead, shead, "")
            keys: dict[str, tuple] = {}
            for tid, ts, blobs, nbytes, status_mask, start, end, root, hits in span_runs:
                if ts:
                    key = keys.get(ts)
                    if key is None:
                        key = keys[ts] = (rhead, shead, ts)
                else:
                    key = plain_key
                t = traces.get(tid)
                if t is None:
                    decision = sampled.get(tid)
                    if decision is not None:
                        sampled.move_to_end(tid)
                        late_kept.append((rhead, shead, blobs, ts, decision))
                        n_late_kept += len(blobs)
                        continue
                    if tid in not_sampled:
                        late_dropped += len(blobs)
                        continue
                    if not tid:
                        passthrough.append((rhead, shead, blobs))
                        continue
                    t = create(tid, now, evicted)
                    # a new trace: its first group (Trace.add_spans, inlined)
                    k = len(blobs)
                    t.spans_key, t.spans, t.n_spans = key, blobs, k
                    size = nbytes + k * ITEM_OVERHEAD
                    t.nbytes += size
                    added += size
                else:
                    added += t.add_spans(key, blobs, nbytes)
                    if t.segment > segment:
                        older.append(t)
                if need_rv and ts and t.rv is None and "rv:" in ts:
                    t.note_tracestate(ts)
                if need_status:
                    t.status_mask |= status_mask
                if need_times:
                    if start and (not t.start or start < t.start):
                        t.start = start
                    if end > t.end:
                        t.end = end
                if checks is not None and t.matched != all_checks:
                    if hits == no_hits:  # no span of the run has any checked key: the resource decides
                        t.matched |= res_matched
                    else:
                        t.matched |= matched(hits, res_matched)
                if root and t.root_deadline is None:  # the local root ended (TraceBuffer.root_arrived, inlined)
                    t.root_deadline = root_deadline
                    roots.append(t)
    return added, n_late_kept, late_dropped


def sort_logs(runs: list, buf, now: float, sampled: dict, not_sampled: dict, traceless_fraction: float, rng,
              immediate: list, older: list, evicted: list) -> tuple[int, int, int, int, int]:
    """Sort a logs request's runs (``wire.log_runs``) into ``buf`` (see :func:`sort_spans`).

    Records without a trace id are kept with probability ``traceless_fraction`` (``rng()``); they, records at
    or above the always-keep severity and late records of kept traces go to ``immediate`` (resource head,
    scope head, records). Returns (bytes added, immediate records, late kept, late dropped, traceless
    dropped).
    """
    traces, create, segment = buf.traces, buf.create, buf.segment
    added = n_immediate = late_kept = late_dropped = traceless_dropped = 0
    for rhead, scopes, _ in runs:
        for shead, log_runs in scopes:
            key = (rhead, shead)
            for tid, blobs, nbytes, keep in log_runs:
                if not tid:
                    if traceless_fraction < 1.0:
                        kept = [b for b in blobs if rng() < traceless_fraction]
                        traceless_dropped += len(blobs) - len(kept)
                        blobs = kept
                    if blobs:
                        immediate.append((rhead, shead, blobs))
                        n_immediate += len(blobs)
                    continue
                if keep:
                    immediate.append((rhead, shead, blobs))
                    n_immediate += len(blobs)
                    continue
                t = traces.get(tid)
                if t is None:
                    if tid in sampled:
                        sampled.move_to_end(tid)
                        late_kept += len(blobs)
                        immediate.append((rhead, shead, blobs))
                        n_immediate += len(blobs)
                        continue
                    if tid in not_sampled:
                        late_dropped += len(blobs)
                        continue
                    t = create(tid, now, evicted)
                elif t.segment > segment:  # its first records too may come from an older segment than its spans
                    older.append(t)
                if t.logs is None:  # the trace's first log records (Trace.add_logs, inlined)
                    k = len(blobs)
                    t.logs_key, t.logs, t.n_logs = key, blobs, k
                    size = nbytes + k * ITEM_OVERHEAD
                    t.nbytes += size
                    added += size
                else:
                    added += t.add_logs(key, blobs, nbytes)
    return added, n_immediate, late_kept, late_dropped, traceless_dropped


def decide(traces: list, drops: list[tuple], keeps: list[tuple], now: float,
           labels: tuple) -> tuple[list, list, list]:
    """Decide ``traces``: drop policies veto, then the first keep policy that keeps decides.

    ``drops`` and ``keeps``: each policy's plan (kind, name, evaluate, a, b; policies.Policy.plan: this twin calls
    ``evaluate`` whatever the kind, C runs the simple kinds itself); ``labels``: the decisions (dropped, sampled,
    not sampled) and the policy name of a trace no policy keeps. Returns (decisions: (trace, decision, policy,
    threshold), kept: (trace id, (policy, threshold)), dropped: (trace id, True)) for the decision caches.
    """
    dropped_label, sampled_label, not_sampled_label, no_policy = labels
    out = []
    kept, dropped = [], []
    for t in traces:
        for plan in drops:
            if plan[2](t, now) is not None:
                out.append((t, dropped_label, plan[1], 0))
                dropped.append((t.trace_id, True))
                break
        else:
            for plan in keeps:
                threshold = plan[2](t, now)
                if threshold is not None:
                    name = plan[1]
                    out.append((t, sampled_label, name, threshold))
                    kept.append((t.trace_id, (name, threshold)))
                    break
            else:
                out.append((t, not_sampled_label, no_policy, 0))
                dropped.append((t.trace_id, True))
    return out, kept, dropped
