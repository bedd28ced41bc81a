"""The ``tail_sampling`` processor: one decision per trace, for its spans and its logs.

One instance serves a traces pipeline and a logs pipeline (its next stage is a
router by signal), so a trace's log records wait with its spans and share their
fate. Per span the hot path reads the trace id, appends a reference to the
received span (no copy) and notes a local root; everything else is computed once
per trace when it is decided. Kept data is copied exactly once, into new
Export*ServiceRequest messages grouped under the original resource and scope; on
those copies every span gets ``sampling.policy`` = the name of the policy that
kept its trace, and ``ot=th:...`` in its tracestate.

Decisions happen in :meth:`tick`, called by a ticker thread in production and
directly by tests with an injected clock.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import weakref
from collections import deque
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from sidecar.component import Component, Consumer, Refused
from sidecar.processors.tail_sampling import policies as _policies
from sidecar.processors.tail_sampling.buffer import Trace, TraceBuffer
from sidecar.processors.tail_sampling.config import TailSamplingConfig
from sidecar.processors.tail_sampling.decisions import LRU, with_threshold
from sidecar.registry import CreateSettings
from sidecar.signals import Request, Signal, count_items, new_request

log = logging.getLogger(__name__)

#: The span attribute naming the policy that kept the span's trace.
POLICY_ATTRIBUTE = "sampling.policy"

SAMPLED, NOT_SAMPLED, DROPPED, TOO_EARLY = "sampled", "not_sampled", "dropped", "dropped_too_early"


class _Families:
    """Metric families shared by every tail_sampling instance on one registry."""

    def __init__(self, registry: CollectorRegistry):
        self.traces = Counter("sidecar_tail_sampling_traces", "Traces decided, by decision and the deciding policy.",
                              ("component", "decision", "policy"), registry=registry)
        self.late = Counter("sidecar_tail_sampling_late_items",
                            "Spans and log records that arrived after their trace was decided and followed the cached "
                            "decision.", ("component", "signal", "decision"), registry=registry)
        self.buffered_traces = Gauge("sidecar_tail_sampling_buffered_traces", "Traces waiting for a decision.",
                                     ("component",), registry=registry)
        self.buffered_bytes = Gauge("sidecar_tail_sampling_buffered_bytes",
                                    "Serialized size of the data waiting for a decision.", ("component",),
                                    registry=registry)


_families: "weakref.WeakKeyDictionary[CollectorRegistry, _Families]" = weakref.WeakKeyDictionary()
_families_lock = threading.Lock()


def _families_for(registry: CollectorRegistry) -> _Families:
    with _families_lock:
        f = _families.get(registry)
        if f is None:
            f = _families[registry] = _Families(registry)
        return f


class _Output:
    """Builds one request, copying each source resource and scope once."""

    __slots__ = ("signal", "request", "n", "_resources", "_scopes", "_tracestates")

    def __init__(self, signal: Signal):
        self.signal = signal
        self.request = new_request(signal)
        self.n = 0
        self._resources: dict[int, tuple] = {}
        self._scopes: dict[int, tuple] = {}
        self._tracestates: dict[tuple[str, int], str] = {}

    def _items(self, rx, sx):
        hit = self._scopes.get(id(sx))
        if hit is not None:
            return hit[1]
        rhit = self._resources.get(id(rx))
        if rhit is None:
            ro = (self.request.resource_spans if self.signal is Signal.TRACES else self.request.resource_logs).add()
            ro.resource.CopyFrom(rx.resource)
            ro.schema_url = rx.schema_url
            rhit = self._resources[id(rx)] = (rx, ro)  # holding rx keeps id() unique
        ro = rhit[1]
        if self.signal is Signal.TRACES:
            so = ro.scope_spans.add()
            items = so.spans
        else:
            so = ro.scope_logs.add()
            items = so.log_records
        so.scope.CopyFrom(sx.scope)
        so.schema_url = sx.schema_url
        self._scopes[id(sx)] = (sx, items)
        return items

    def add(self, rx, sx, items: list) -> None:
        self._items(rx, sx).extend(items)
        self.n += len(items)

    def add_kept_spans(self, rx, sx, spans: list, policy: str, threshold: int) -> None:
        """Copy ``spans`` in and mark the copies with the deciding policy and the sampling threshold."""
        out = self._items(rx, sx)
        start = len(out)
        out.extend(spans)
        memo = self._tracestates
        for i in range(start, len(out)):
            span = out[i]
            key = (span.trace_state, threshold)
            ts = memo.get(key)
            if ts is None:
                ts = memo[key] = with_threshold(key[0], threshold)
            span.trace_state = ts
            _set_string_attribute(span.attributes, POLICY_ATTRIBUTE, policy)
        self.n += len(spans)


def _set_string_attribute(kvs, key: str, value: str) -> None:
    for kv in kvs:
        if kv.key == key:
            kv.value.string_value = value
            return
    kv = kvs.add()
    kv.key = key
    kv.value.string_value = value


class TailSamplingProcessor(Component):
    """Holds traces (spans and logs) until decided; forwards kept ones, drops the rest and counts them."""

    mutates_data = False  # holds references; only the copies it emits are annotated

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
        sev = cfg.logs.always_keep_severity_at_least
        self._always_keep_severity = sev if sev > 0 else 1 << 30
        self._traceless_fraction = cfg.logs.without_trace_sampling_percentage / 100.0
        self._ready: deque[tuple[Signal, Request, int]] = deque()
        self._ready_items = 0
        self._in_flight: tuple | None = None

        cid = str(settings.id)
        fam = _families_for(settings.telemetry.registry)
        self._traces_family = fam.traces
        self._trace_counters: dict[tuple[str, str], object] = {}
        self._component = cid
        self._late = {(s, d): fam.late.labels(cid, s.value, d) for s in (Signal.TRACES, Signal.LOGS)
                      for d in (SAMPLED, NOT_SAMPLED)}
        fam.buffered_traces.labels(cid).set_function(lambda: len(self._buffer))
        fam.buffered_bytes.labels(cid).set_function(lambda: self._buffer.nbytes)

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
        per_item = request.ByteSize() / n
        now = self._clock()
        late_kept: list[tuple] = []
        passthrough: list[tuple] = []
        late_dropped = 0
        buffered = 0
        evicted: list[Trace] = []
        buf = self._buffer
        sampled, not_sampled = self._sampled, self._not_sampled
        with self._lock:
            traces = buf.traces
            for rs in request.resource_spans:
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        tid = span.trace_id
                        t = traces.get(tid)
                        if t is None:
                            decision = sampled.get(tid)
                            if decision is not None:
                                late_kept.append((rs, ss, span, decision))
                                continue
                            if tid in not_sampled:
                                late_dropped += 1
                                continue
                            if not tid:
                                passthrough.append((rs, ss, span))
                                continue
                            t = buf.create(tid, now, evicted)
                        if t.last_ss is ss:
                            t.last_spans.append(span)
                        else:
                            t.last_ss = ss
                            t.last_spans = [span]
                            t.span_groups.append((rs, ss, t.last_spans))
                        t.n_spans += 1
                        t.nbytes += per_item
                        buffered += 1
                        if not span.parent_span_id or span.flags & 0x300 == 0x300:
                            buf.root_arrived(t, now)
            buf.add_bytes(buffered * per_item)
            buf.over_budget(evicted)
        self._tel.accepted(Signal.TRACES, n)
        if late_dropped:
            self._tel.dropped(Signal.TRACES, late_dropped, "sampled_out")
            self._late[(Signal.TRACES, NOT_SAMPLED)].inc(late_dropped)
        if evicted:
            self._count_evicted(evicted)
        if late_kept or passthrough:
            out = _Output(Signal.TRACES)
            for rs, ss, span, (policy, threshold) in late_kept:
                out.add_kept_spans(rs, ss, [span], policy, threshold)
            for rs, ss, span in passthrough:
                out.add(rs, ss, [span])
            if late_kept:
                self._late[(Signal.TRACES, SAMPLED)].inc(len(late_kept))
            self._enqueue(out)
            self._flush()

    def _consume_logs(self, request: Request) -> None:
        n = self._admit(Signal.LOGS, request)
        if not n:
            return
        per_item = request.ByteSize() / n
        now = self._clock()
        immediate: list[tuple] = []
        late_kept = late_dropped = traceless_dropped = buffered = 0
        evicted: list[Trace] = []
        buf = self._buffer
        sampled, not_sampled = self._sampled, self._not_sampled
        keep_severity = self._always_keep_severity
        fraction = self._traceless_fraction
        rng = self._rng
        with self._lock:
            traces = buf.traces
            for rl in request.resource_logs:
                for sl in rl.scope_logs:
                    for rec in sl.log_records:
                        tid = rec.trace_id
                        if not tid:
                            if fraction < 1.0 and rng() >= fraction:
                                traceless_dropped += 1
                            else:
                                immediate.append((rl, sl, rec))
                            continue
                        if rec.severity_number >= keep_severity:
                            immediate.append((rl, sl, rec))
                            continue
                        t = traces.get(tid)
                        if t is None:
                            if sampled.get(tid) is not None:
                                late_kept += 1
                                immediate.append((rl, sl, rec))
                                continue
                            if tid in not_sampled:
                                late_dropped += 1
                                continue
                            t = buf.create(tid, now, evicted)
                        if t.last_sl is sl:
                            t.last_logs.append(rec)
                        else:
                            t.last_sl = sl
                            t.last_logs = [rec]
                            t.log_groups.append((rl, sl, t.last_logs))
                        t.n_logs += 1
                        t.nbytes += per_item
                        buffered += 1
            buf.add_bytes(buffered * per_item)
            buf.over_budget(evicted)
            direct = len(immediate) == n and not self._ready
        if late_kept:
            self._late[(Signal.LOGS, SAMPLED)].inc(late_kept)
        if direct:
            # nothing held back: forward the original request as is, and let a refusal reach the sender
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
            for rl, sl, rec in immediate:
                out.add(rl, sl, [rec])
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
        dropped = {Signal.TRACES: {}, Signal.LOGS: {}}
        for t, decision, policy, threshold in decided:
            self._count_trace(decision, policy)
            if decision is SAMPLED:
                for rs, ss, spans in t.span_groups:
                    spans_out.add_kept_spans(rs, ss, spans, policy, threshold)
                for rl, sl, recs in t.log_groups:
                    logs_out.add(rl, sl, recs)
            else:
                reason = "sampled_out" if decision is NOT_SAMPLED else "policy_drop"
                d = dropped[Signal.TRACES]
                d[reason] = d.get(reason, 0) + t.n_spans
                d = dropped[Signal.LOGS]
                d[reason] = d.get(reason, 0) + t.n_logs
        for signal, by_reason in dropped.items():
            for reason, count in by_reason.items():
                self._tel.dropped(signal, count, reason)
        if spans_out.n:
            self._enqueue(spans_out)
        if logs_out.n:
            self._enqueue(logs_out)

    def _count_trace(self, decision: str, policy: str) -> None:
        key = (decision, policy)
        child = self._trace_counters.get(key)
        if child is None:
            child = self._trace_counters[key] = self._traces_family.labels(self._component, decision, policy)
        child.inc()

    def _count_evicted(self, evicted: list[Trace]) -> None:
        spans = sum(t.n_spans for t in evicted)
        logs = sum(t.n_logs for t in evicted)
        self._tel.dropped(Signal.TRACES, spans, TOO_EARLY)
        self._tel.dropped(Signal.LOGS, logs, TOO_EARLY)
        child = self._trace_counters.get((TOO_EARLY, "none"))
        if child is None:
            child = self._trace_counters[(TOO_EARLY, "none")] = self._traces_family.labels(
                self._component, TOO_EARLY, "none")
        child.inc(len(evicted))

    # --- delivering -------------------------------------------------------------------------------

    def _enqueue(self, out: _Output) -> None:
        with self._lock:
            self._ready.append((out.signal, out.request, out.n))
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
