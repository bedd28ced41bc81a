"""The ``tail_sampling`` processor: one decision per trace, for its spans and its logs.

One instance serves a traces pipeline and a logs pipeline (its next stage is a
router by signal), so a trace's log records wait with its spans and share their
fate. Per span the hot path reads the trace id, encodes the span once (C) into the
buffer and folds what the configured policies need into its trace (status, start
and end, tracestate randomness, attribute checks that first look for the key in
the encoding); the received request is then free to go. Only kept traces (a tenth,
typically) are parsed again: their bytes are spliced into a new
Export*ServiceRequest under their original resource and scope and parsed once.
On the way every kept span gets ``sampling.policy`` = the name of the policy that
kept its trace and ``ot=th:...`` in its tracestate, appended as encoded fields
(protobuf merges a repeated field and lets the last scalar win).

Decisions happen in :meth:`tick`, called by a ticker thread in production and
directly by tests with an injected clock.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from typing import Callable

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import ResourceLogs, ScopeLogs
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from prometheus_client import Counter, Gauge

from sidecar.component import Component, Consumer, Refused
from sidecar.processors.tail_sampling import policies as _policies
from sidecar.processors.tail_sampling.buffer import ITEM_OVERHEAD, Trace, TraceBuffer
from sidecar.processors.tail_sampling.config import TailSamplingConfig
from sidecar.processors.tail_sampling.decisions import LRU, with_threshold
from sidecar.registry import CreateSettings
from sidecar.signals import Request, Signal, count_items, encoded

from sidecar.accel import wire as _wire  # the optional C scanner; None: the pure-Python path

log = logging.getLogger(__name__)

#: The span attribute naming the policy that kept the span's trace.
POLICY_ATTRIBUTE = "sampling.policy"
_POLICY_BYTES = POLICY_ATTRIBUTE.encode()

SAMPLED, NOT_SAMPLED, DROPPED, TOO_EARLY = "sampled", "not_sampled", "dropped", "dropped_too_early"


# --- building requests from encoded parts -------------------------------------------------------------
# Export*ServiceRequest, Resource{Spans,Logs} and Scope{Spans,Logs} share one layout: field 1 is the
# resource/scope (or, in the request, the resource entries), field 2 the repeated children. A "head" is an
# encoded Resource{Spans,Logs} or Scope{Spans,Logs} without its children; appending length-delimited
# field-2 entries to it gives the whole message.

_VARINTS = [bytes([n]) if n < 0x80 else bytes([(n & 0x7F) | 0x80, n >> 7]) for n in range(1 << 14)]


def _varint(n: int) -> bytes:
    if n < 16384:
        return _VARINTS[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    n = len(payload)
    return tag + (_VARINTS[n] if n < 16384 else _varint(n)) + payload


_TAG1, _TAG2 = b"\x0a", b"\x12"


def _span_heads(rs) -> tuple[bytes, Callable]:
    return ResourceSpans(resource=rs.resource, schema_url=rs.schema_url).SerializeToString(), _scope_span_head


def _scope_span_head(ss) -> bytes:
    return ScopeSpans(scope=ss.scope, schema_url=ss.schema_url).SerializeToString()


def _log_heads(rl) -> tuple[bytes, Callable]:
    return ResourceLogs(resource=rl.resource, schema_url=rl.schema_url).SerializeToString(), _scope_log_head


def _scope_log_head(sl) -> bytes:
    return ScopeLogs(scope=sl.scope, schema_url=sl.schema_url).SerializeToString()


class _Output:
    """Collects encoded items under their resource and scope heads; :meth:`request` parses them once."""

    __slots__ = ("signal", "n", "_resources")

    def __init__(self, signal: Signal):
        self.signal = signal
        self.n = 0
        self._resources: dict[bytes, dict[bytes, list[bytes]]] = {}

    def add(self, resource_head: bytes, scope_head: bytes, items: list[bytes]) -> None:
        """Add encoded items (spans or log records) as they are."""
        scopes = self._resources.get(resource_head)
        if scopes is None:
            scopes = self._resources[resource_head] = {}
        entries = scopes.get(scope_head)
        if entries is None:
            entries = scopes[scope_head] = []
        varints = _VARINTS
        entries.extend([_TAG2 + varints[len(b)] + b if len(b) < 16384 else _field(_TAG2, b) for b in items])
        self.n += len(items)

    def request(self) -> Request:
        parts = []
        for resource_head, scopes in self._resources.items():
            body = resource_head + b"".join(
                [_field(_TAG2, scope_head + b"".join(entries)) for scope_head, entries in scopes.items()])
            parts.append(_field(_TAG1, body))
        return self.signal.request_type.FromString(b"".join(parts))


class _KeptSpans:
    """Encodes kept spans with their trace's policy name and sampling threshold appended (memoised per output)."""

    __slots__ = ("_suffixes",)

    def __init__(self):
        self._suffixes: dict[tuple[str, int, str], bytes | None] = {}

    def encode(self, blobs: list[bytes], tracestate: str, threshold: int, policy: str) -> list[bytes]:
        key = (tracestate, threshold, policy)
        suffix = self._suffixes.get(key, b"")
        if suffix == b"":
            suffix = self._suffixes[key] = _suffix(tracestate, threshold, policy)
        if suffix is None:
            return [_marked_slowly(b, tracestate, threshold, policy) for b in blobs]
        return [b + suffix if _POLICY_BYTES not in b else _marked_slowly(b, tracestate, threshold, policy)
                for b in blobs]


def _suffix(tracestate: str, threshold: int, policy: str) -> bytes | None:
    """Encoded fields that, appended to a span, set its new tracestate and add the policy attribute.

    None when the new tracestate is empty but the old one is not: an empty string is not encoded,
    so appending cannot clear a field.
    """
    new_ts = with_threshold(tracestate, threshold)
    if not new_ts and tracestate:
        return None
    attr = KeyValue(key=POLICY_ATTRIBUTE, value=AnyValue(string_value=policy))
    return Span(trace_state=new_ts, attributes=[attr]).SerializeToString()


def _marked_slowly(blob: bytes, tracestate: str, threshold: int, policy: str) -> bytes:
    """The general case: parse, replace the attribute if the span already has one, re-encode."""
    span = Span.FromString(blob)
    span.trace_state = with_threshold(tracestate, threshold)
    for kv in span.attributes:
        if kv.key == POLICY_ATTRIBUTE:
            kv.value.string_value = policy
            break
    else:
        span.attributes.add(key=POLICY_ATTRIBUTE).value.string_value = policy
    return span.SerializeToString()


def _matched(checks: list, hits: tuple, res_matched: int) -> int:
    """Bits of the attribute checks a run of spans passes, from the C scanner's ``hits`` (see _wire.span_runs):
    a span with the key is judged by its value, one without it by its resource."""
    matched = 0
    for (_, _, bit, matches), h in zip(checks, hits):
        if h is None:
            matched |= res_matched & bit
            continue
        if h[0]:
            matched |= res_matched & bit
        for encoded in h[1:]:
            if matches(AnyValue.FromString(encoded)):
                matched |= bit
                break
    return matched


class TailSamplingProcessor(Component):
    """Holds traces (spans and logs) until decided; forwards kept ones, drops the rest and counts them."""

    mutates_data = False  # reads the received requests; only the copies it emits are annotated

    #: Items of decided output waiting for the next stage beyond which new data is refused (back-pressure).
    READY_SOFT_LIMIT = 50_000
    #: Beyond this the oldest waiting output is dropped and counted ("downstream_refused").
    READY_HARD_LIMIT = 200_000

    def __init__(self, settings: CreateSettings, cfg: TailSamplingConfig, next_consumer: Consumer, *,
                 clock: Callable[[], float] = time.monotonic, rng: Callable[[], float] = random.random):
        self._settings = settings
        self._tel = settings.telemetry
        self._cfg = cfg
        self._next = next_consumer
        self._clock = clock
        self._rng = rng
        self._lock = threading.Lock()  # buffer, caches, policies, ready list
        self._emit_lock = threading.Lock()  # one delivery to the next stage at a time, in order
        self._buffer = TraceBuffer(decision_wait=cfg.decision_wait, root_wait=cfg.decision_wait_after_root_received,
                                   num_traces=cfg.num_traces, max_bytes=cfg.max_buffered_bytes)
        self._sampled: LRU[bytes, tuple[str, int]] = LRU(cfg.decision_cache.sampled_cache_size)
        self._not_sampled: LRU[bytes, bool] = LRU(cfg.decision_cache.non_sampled_cache_size)
        built = [_policies.build(p) for p in cfg.policies]
        self._drop_policies = [p for p in built if isinstance(p, _policies.Drop)]
        self._keep_policies = [p for p in built if not isinstance(p, _policies.Drop)]
        self.policies = {p.name: p for p in built}
        # decided once: what each arriving span must yield for these policies
        needs = _policies.needs_of(built)
        self._need_status = _policies.STATUS in needs
        self._need_times = _policies.TIMES in needs
        self._need_rv = _policies.RANDOMNESS in needs
        self._checks = _policies.attribute_checks(built)
        self._all_checks = (1 << len(self._checks)) - 1
        self._check_keys = tuple(c.key_bytes for c in self._checks)
        if _wire is not None and len(self._check_keys) <= _wire.MAX_KEYS:
            self._consume_traces = self._consume_traces_wire
            self._consume_logs = self._consume_logs_wire
            self._span_runs, self._log_runs = _wire.span_runs, _wire.log_runs
        sev = cfg.logs.always_keep_severity_at_least
        self._always_keep_severity = sev if sev > 0 else 1 << 30
        self._traceless_fraction = cfg.logs.without_trace_sampling_percentage / 100.0
        self._ready: deque[tuple[Signal, Request, int]] = deque()
        self._ready_items = 0
        self._in_flight: tuple | None = None

        cid = str(settings.id)
        family = settings.telemetry.root.family
        self._traces_family = family(Counter, "sidecar_tail_sampling_traces",
                                     "Traces decided, by decision and the deciding policy.",
                                     ("component", "decision", "policy"))
        self._trace_counters: dict[tuple[str, str], object] = {}
        self._component = cid
        late = family(Counter, "sidecar_tail_sampling_late_items",
                      "Spans and log records that arrived after their trace was decided and followed the cached "
                      "decision.", ("component", "signal", "decision"))
        self._late = {(s, d): late.labels(cid, s.value, d) for s in (Signal.TRACES, Signal.LOGS)
                      for d in (SAMPLED, NOT_SAMPLED)}
        family(Gauge, "sidecar_tail_sampling_buffered_traces", "Traces waiting for a decision.",
               ("component",)).labels(cid).set_function(lambda: len(self._buffer))
        family(Gauge, "sidecar_tail_sampling_buffered_bytes",
               "Memory held by the data waiting for a decision (its encoded size plus per-item overhead).",
               ("component",)).labels(cid).set_function(lambda: self._buffer.nbytes)

        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        root_wait = cfg.decision_wait_after_root_received
        self.tick_interval = max(0.005, min(0.1, root_wait / 2 if root_wait else 0.1))

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self, host) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"tail_sampling[{self._component}]", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.tick_interval):
            try:
                self.tick()
            except Exception:  # never let the ticker die: undecided data would pile up silently
                log.exception("tail_sampling tick failed")

    def shutdown(self, deadline: float) -> None:
        """Decide every pending trace now and hand everything to the next stage before ``deadline``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            self._thread = None
        now = self._clock()
        with self._lock:
            decided = self._decide_all(self._buffer.drain(), now)
        self._emit_decided(decided)
        while True:
            self._flush()
            with self._lock:
                if not self._ready:
                    return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        with self._lock:
            for signal, _, n in self._ready:
                self._tel.dropped(signal, n, "shutdown")
            self._ready.clear()
            self._ready_items = 0

    # --- consuming --------------------------------------------------------------------------------

    def consume(self, signal: Signal, request: Request) -> None:
        if signal is Signal.TRACES:
            self._consume_traces(request)
        elif signal is Signal.LOGS:
            self._consume_logs(request)
        else:
            raise Refused("unsupported_signal", retryable=False, message=f"tail_sampling does not take {signal.value}")

    def _admit(self, signal: Signal, request: Request) -> int:
        """Count the request in; refuse it while decided output is backed up downstream."""
        n = count_items(signal, request)
        self._tel.received(signal, n)
        if self._ready_items > self.READY_SOFT_LIMIT:
            self._flush()
            if self._ready_items > self.READY_SOFT_LIMIT:
                self._tel.refused(signal, n, "downstream_backpressure")
                raise Refused("downstream_backpressure", message="tail_sampling output is backed up")
        return n

    def _consume_traces(self, request: Request) -> None:
        n = self._admit(Signal.TRACES, request)
        if not n:
            return
        now = self._clock()
        late_kept: list[tuple] = []  # (resource head, scope head, span, (policy, threshold))
        passthrough: list[tuple] = []  # (resource head, scope head, span)
        late_dropped = 0
        evicted: list[Trace] = []
        buf = self._buffer
        sampled, not_sampled = self._sampled, self._not_sampled
        need_status, need_times, need_rv = self._need_status, self._need_times, self._need_rv
        checks, all_checks = self._checks, self._all_checks
        find = bytes.find  # cheaper than ``in``, which first tries the needle as an int
        added = 0
        with self._lock:
            traces = buf.traces
            for rs in request.resource_spans:
                rhead, scope_head = _span_heads(rs)
                res_matched = self._resource_matches(rs.resource.attributes) if checks else 0
                for ss in rs.scope_spans:
                    shead = scope_head(ss)
                    plain_key = (rhead, shead, "")
                    keys: dict[str, tuple] = {}
                    for span in ss.spans:
                        tid = span.trace_id
                        t = traces.get(tid)
                        if t is None:
                            decision = sampled.get(tid)
                            if decision is not None:
                                late_kept.append((rhead, shead, span, decision))
                                continue
                            if tid in not_sampled:
                                late_dropped += 1
                                continue
                            if not tid:
                                passthrough.append((rhead, shead, span))
                                continue
                            t = buf.create(tid, now, evicted)
                        ts = span.trace_state
                        if ts:
                            key = keys.get(ts)
                            if key is None:
                                key = keys[ts] = (rhead, shead, ts)
                            if need_rv and t.rv is None and "rv:" in ts:
                                t.note_tracestate(ts)
                        else:
                            key = plain_key
                        blob = span.SerializeToString()
                        if t.last_span_key is key:
                            t.last_spans.append(blob)
                        else:
                            t.last_span_key = key
                            t.last_spans = [blob]
                            t.span_groups.append((key, t.last_spans))
                        size = len(blob) + ITEM_OVERHEAD
                        t.nbytes += size
                        added += size
                        t.n_spans += 1
                        if need_status:
                            t.status_mask |= 1 << span.status.code
                        if need_times:
                            start = span.start_time_unix_nano
                            if start and (not t.start or start < t.start):
                                t.start = start
                            end = span.end_time_unix_nano
                            if end > t.end:
                                t.end = end
                        if checks and t.matched != all_checks:
                            matched = 0
                            for key_bytes, key_str, bit, matches in checks:
                                if find(blob, key_bytes) >= 0:  # else the span lacks the key: the resource decides
                                    value = _policies.find_value(span.attributes, key_str)
                                    if value is not None:
                                        if matches(value):
                                            matched |= bit
                                        continue
                                matched |= res_matched & bit
                            t.matched |= matched
                        if not span.parent_span_id or span.flags & 0x300 == 0x300:
                            buf.root_arrived(t, now)
            buf.add_bytes(added)
            buf.over_budget(evicted)
        self._finish_traces(
            n, late_dropped, evicted, len(late_kept),
            [(rh, sh, [sp.SerializeToString()], sp.trace_state, decision) for rh, sh, sp, decision in late_kept],
            [(rh, sh, [sp.SerializeToString()]) for rh, sh, sp in passthrough])

    def _consume_traces_wire(self, request: Request) -> None:
        """:meth:`_consume_traces` on the C scanner's runs (consecutive spans of one trace and tracestate):
        one serialization per request, the span bytes sliced from it, and Python work per run, not per span."""
        n = self._admit(Signal.TRACES, request)
        if not n:
            return
        runs = self._span_runs(encoded(request), self._check_keys)
        now = self._clock()
        late_kept: list[tuple] = []  # (resource head, scope head, [span bytes], tracestate, (policy, threshold))
        passthrough: list[tuple] = []  # (resource head, scope head, [span bytes])
        n_late_kept = late_dropped = added = 0
        evicted: list[Trace] = []
        buf = self._buffer
        sampled, not_sampled = self._sampled, self._not_sampled
        need_status, need_times, need_rv = self._need_status, self._need_times, self._need_rv
        checks, all_checks = self._checks, self._all_checks
        with self._lock:
            traces = buf.traces
            for rs, (rhead, scopes) in zip(request.resource_spans, runs):
                res_matched = self._resource_matches(rs.resource.attributes) if checks else 0
                for shead, span_runs in scopes:
                    plain_key = (rhead, shead, "")
                    keys: dict[str, tuple] = {}
                    for tid, ts, blobs, nbytes, status_mask, start, end, root, hits in span_runs:
                        t = traces.get(tid)
                        if t is None:
                            decision = sampled.get(tid)
                            if decision is not None:
                                late_kept.append((rhead, shead, blobs, ts, decision))
                                n_late_kept += len(blobs)
                                continue
                            if tid in not_sampled:
                                late_dropped += len(blobs)
                                continue
                            if not tid:
                                passthrough.append((rhead, shead, blobs))
                                continue
                            t = buf.create(tid, now, evicted)
                        if ts:
                            key = keys.get(ts)
                            if key is None:
                                key = keys[ts] = (rhead, shead, ts)
                            if need_rv and t.rv is None and "rv:" in ts:
                                t.note_tracestate(ts)
                        else:
                            key = plain_key
                        if t.last_span_key is key:
                            t.last_spans.extend(blobs)
                        else:
                            t.last_span_key = key
                            t.last_spans = blobs
                            t.span_groups.append((key, blobs))
                        k = len(blobs)
                        size = nbytes + k * ITEM_OVERHEAD
                        t.nbytes += size
                        added += size
                        t.n_spans += k
                        if need_status:
                            t.status_mask |= status_mask
                        if need_times:
                            if start and (not t.start or start < t.start):
                                t.start = start
                            if end > t.end:
                                t.end = end
                        if checks and t.matched != all_checks:
                            t.matched |= _matched(checks, hits, res_matched)
                        if root:
                            buf.root_arrived(t, now)
            buf.add_bytes(added)
            buf.over_budget(evicted)
        self._finish_traces(n, late_dropped, evicted, n_late_kept, late_kept, passthrough)

    def _consume_logs_wire(self, request: Request) -> None:
        """:meth:`_consume_logs` on the C scanner's runs (consecutive records of one trace, same severity side)."""
        n = self._admit(Signal.LOGS, request)
        if not n:
            return
        runs = self._log_runs(encoded(request), self._always_keep_severity)
        now = self._clock()
        immediate: list[tuple] = []  # (resource head, scope head, [record bytes])
        n_immediate = late_kept = late_dropped = traceless_dropped = added = 0
        evicted: list[Trace] = []
        buf = self._buffer
        sampled, not_sampled = self._sampled, self._not_sampled
        fraction = self._traceless_fraction
        rng = self._rng
        with self._lock:
            traces = buf.traces
            for rhead, scopes in runs:
                for shead, log_runs in scopes:
                    key = (rhead, shead)
                    for tid, blobs, nbytes, keep in log_runs:
                        if not tid:
                            if fraction < 1.0:
                                kept = [b for b in blobs if rng() < fraction]
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
                            if sampled.get(tid) is not None:
                                late_kept += len(blobs)
                                immediate.append((rhead, shead, blobs))
                                n_immediate += len(blobs)
                                continue
                            if tid in not_sampled:
                                late_dropped += len(blobs)
                                continue
                            t = buf.create(tid, now, evicted)
                        if t.last_log_key is key:
                            t.last_logs.extend(blobs)
                        else:
                            t.last_log_key = key
                            t.last_logs = blobs
                            t.log_groups.append((key, blobs))
                        k = len(blobs)
                        size = nbytes + k * ITEM_OVERHEAD
                        t.nbytes += size
                        added += size
                        t.n_logs += k
            buf.add_bytes(added)
            buf.over_budget(evicted)
            direct = n_immediate == n and not self._ready
        self._finish_logs(request, n, direct, late_kept, late_dropped, traceless_dropped, evicted, immediate)

    def _resource_matches(self, attributes) -> int:
        """Bits of the attribute checks the resource's own value passes (spans without the key inherit it)."""
        bits = 0
        for _, key, bit, matches in self._checks:
            value = _policies.find_value(attributes, key)
            if value is not None and matches(value):
                bits |= bit
        return bits

    def _consume_logs(self, request: Request) -> None:
        n = self._admit(Signal.LOGS, request)
        if not n:
            return
        now = self._clock()
        immediate: list[tuple] = []  # (resource head, scope head, record)
        late_kept = late_dropped = traceless_dropped = added = 0
        evicted: list[Trace] = []
        buf = self._buffer
        sampled, not_sampled = self._sampled, self._not_sampled
        keep_severity = self._always_keep_severity
        fraction = self._traceless_fraction
        rng = self._rng
        with self._lock:
            traces = buf.traces
            for rl in request.resource_logs:
                rhead, scope_head = _log_heads(rl)
                for sl in rl.scope_logs:
                    key = (rhead, scope_head(sl))
                    for rec in sl.log_records:
                        tid = rec.trace_id
                        if not tid:
                            if fraction < 1.0 and rng() >= fraction:
                                traceless_dropped += 1
                            else:
                                immediate.append((key, rec))
                            continue
                        if rec.severity_number >= keep_severity:
                            immediate.append((key, rec))
                            continue
                        t = traces.get(tid)
                        if t is None:
                            if sampled.get(tid) is not None:
                                late_kept += 1
                                immediate.append((key, rec))
                                continue
                            if tid in not_sampled:
                                late_dropped += 1
                                continue
                            t = buf.create(tid, now, evicted)
                        blob = rec.SerializeToString()
                        if t.last_log_key is key:
                            t.last_logs.append(blob)
                        else:
                            t.last_log_key = key
                            t.last_logs = [blob]
                            t.log_groups.append((key, t.last_logs))
                        size = len(blob) + ITEM_OVERHEAD
                        t.nbytes += size
                        added += size
                        t.n_logs += 1
            buf.add_bytes(added)
            buf.over_budget(evicted)
            direct = len(immediate) == n and not self._ready
        self._finish_logs(request, n, direct, late_kept, late_dropped, traceless_dropped, evicted,
                          [(rhead, shead, [rec.SerializeToString()]) for (rhead, shead), rec in immediate])

    def _finish_traces(self, n: int, late_dropped: int, evicted: list, n_late_kept: int,
                       late_kept: list[tuple], passthrough: list[tuple]) -> None:
        """After a traces request is sorted: count it, and forward late spans of kept traces
        ((resource head, scope head, encoded spans, tracestate, (policy, threshold))) and spans
        without a trace id ((resource head, scope head, encoded spans))."""
        self._tel.accepted(Signal.TRACES, n)
        if late_dropped:
            self._tel.dropped(Signal.TRACES, late_dropped, "sampled_out")
            self._late[(Signal.TRACES, NOT_SAMPLED)].inc(late_dropped)
        if evicted:
            self._count_evicted(evicted)
        if late_kept or passthrough:
            out = _Output(Signal.TRACES)
            kept = _KeptSpans()
            for rhead, shead, blobs, ts, (policy, threshold) in late_kept:
                out.add(rhead, shead, kept.encode(blobs, ts, threshold, policy))
            for rhead, shead, blobs in passthrough:
                out.add(rhead, shead, blobs)
            if n_late_kept:
                self._late[(Signal.TRACES, SAMPLED)].inc(n_late_kept)
            self._enqueue(out)
            self._flush()

    def _finish_logs(self, request: Request, n: int, direct: bool, late_kept: int, late_dropped: int,
                     traceless_dropped: int, evicted: list, immediate: list[tuple]) -> None:
        """After a logs request is sorted: count it, and forward what is not held back.

        ``immediate`` holds (resource head, scope head, encoded records) forwarded now; when that
        is the whole request (``direct``) the request itself goes on, so a refusal reaches the sender.
        """
        if late_kept:
            self._late[(Signal.LOGS, SAMPLED)].inc(late_kept)
        if direct:
            try:
                self._next.consume(Signal.LOGS, request)
            except Refused as e:
                self._tel.refused(Signal.LOGS, n, e.reason)
                raise
            self._tel.accepted(Signal.LOGS, n)
            return
        self._tel.accepted(Signal.LOGS, n)
        if late_dropped:
            self._tel.dropped(Signal.LOGS, late_dropped, "sampled_out")
            self._late[(Signal.LOGS, NOT_SAMPLED)].inc(late_dropped)
        if traceless_dropped:
            self._tel.dropped(Signal.LOGS, traceless_dropped, "sampled_out")
        if evicted:
            self._count_evicted(evicted)
        if immediate:
            out = _Output(Signal.LOGS)
            for rhead, shead, blobs in immediate:
                out.add(rhead, shead, blobs)
            self._enqueue(out)
            self._flush()

    # --- deciding ---------------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """Decide the traces whose time has come and forward the kept ones. Called by the ticker or tests."""
        if now is None:
            now = self._clock()
        with self._lock:
            due = self._buffer.due(now)
            decided = self._decide_all(due, now) if due else []
        if decided:
            self._emit_decided(decided)
        if self._ready:
            self._flush()

    def _decide(self, trace: Trace, now: float) -> tuple[str, str, int]:
        for p in self._drop_policies:
            if p.evaluate(trace, now) is not None:
                return DROPPED, p.name, 0
        for p in self._keep_policies:
            threshold = p.evaluate(trace, now)
            if threshold is not None:
                return SAMPLED, p.name, threshold
        return NOT_SAMPLED, "none", 0

    def _decide_all(self, traces: list[Trace], now: float) -> list[tuple[Trace, str, str, int]]:
        """Decisions for ``traces``, remembered in the decision cache. Call with the lock held."""
        out = []
        for t in traces:
            decision, policy, threshold = self._decide(t, now)
            if decision is SAMPLED:
                self._sampled.put(t.trace_id, (policy, threshold))
            else:
                self._not_sampled.put(t.trace_id, True)
            out.append((t, decision, policy, threshold))
        return out

    def _emit_decided(self, decided: list[tuple[Trace, str, str, int]]) -> None:
        spans_out = _Output(Signal.TRACES)
        logs_out = _Output(Signal.LOGS)
        kept = _KeptSpans()
        traces_by: dict[tuple[str, str], int] = {}
        dropped: dict[str, list[int]] = {}  # reason -> [spans, log records]
        for t, decision, policy, threshold in decided:
            key = (decision, policy)
            traces_by[key] = traces_by.get(key, 0) + 1
            if decision is SAMPLED:
                for (rhead, shead, tracestate), blobs in t.span_groups:
                    spans_out.add(rhead, shead, kept.encode(blobs, tracestate, threshold, policy))
                for (rhead, shead), blobs in t.log_groups:
                    logs_out.add(rhead, shead, blobs)
            else:
                reason = "sampled_out" if decision is NOT_SAMPLED else "policy_drop"
                counts = dropped.get(reason)
                if counts is None:
                    counts = dropped[reason] = [0, 0]
                counts[0] += t.n_spans
                counts[1] += t.n_logs
        for (decision, policy), n in traces_by.items():
            self._count_traces(decision, policy, n)
        for reason, (n_spans, n_logs) in dropped.items():
            self._tel.dropped(Signal.TRACES, n_spans, reason)
            self._tel.dropped(Signal.LOGS, n_logs, reason)
        if spans_out.n:
            self._enqueue(spans_out)
        if logs_out.n:
            self._enqueue(logs_out)

    def _count_traces(self, decision: str, policy: str, n: int) -> None:
        key = (decision, policy)
        child = self._trace_counters.get(key)
        if child is None:
            child = self._trace_counters[key] = self._traces_family.labels(self._component, decision, policy)
        child.inc(n)

    def _count_evicted(self, evicted: list[Trace]) -> None:
        spans = sum(t.n_spans for t in evicted)
        logs = sum(t.n_logs for t in evicted)
        self._tel.dropped(Signal.TRACES, spans, TOO_EARLY)
        self._tel.dropped(Signal.LOGS, logs, TOO_EARLY)
        self._count_traces(TOO_EARLY, "none", len(evicted))

    # --- delivering -------------------------------------------------------------------------------

    def _enqueue(self, out: _Output) -> None:
        request = out.request()
        with self._lock:
            self._ready.append((out.signal, request, out.n))
            self._ready_items += out.n
            while self._ready_items > self.READY_HARD_LIMIT and len(self._ready) > 1:
                item = self._ready.popleft()
                if item is self._in_flight:  # being delivered right now; drop the next one instead
                    victim = self._ready.popleft()
                    self._ready.appendleft(item)
                    item = victim
                self._ready_items -= item[2]
                self._tel.dropped(item[0], item[2], "downstream_refused")

    def _flush(self) -> None:
        """Deliver waiting output in order; stop at the first retryable refusal and try again next tick."""
        with self._emit_lock:
            while True:
                with self._lock:
                    if not self._ready:
                        return
                    item = self._in_flight = self._ready[0]
                signal, request, n = item
                try:
                    self._next.consume(signal, request)
                except Refused as e:
                    if e.retryable:
                        with self._lock:
                            self._in_flight = None
                        return
                    self._tel.dropped(signal, n, "downstream_refused")
                except Exception:
                    log.exception("next stage failed on tail_sampling output; dropping %d %s", n, signal.item_name)
                    self._tel.dropped(signal, n, "downstream_error")
                with self._lock:
                    self._in_flight = None
                    if self._ready and self._ready[0] is item:
                        self._ready.popleft()
                        self._ready_items -= n

    # --- introspection (tests, the demo) --------------------------------------------------------

    @property
    def buffered_traces(self) -> int:
        return len(self._buffer)

    @property
    def buffered_bytes(self) -> float:
        return self._buffer.nbytes

    @property
    def pending_output_items(self) -> int:
        return self._ready_items
