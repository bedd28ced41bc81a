"""The ``tail_sampling`` processor: one decision per trace, for its spans and its logs.

One instance serves a traces pipeline and a logs pipeline (its next stage is a
router by signal), so a trace's log records wait with its spans and share their
fate. The hot path works on the received encoding through the wire scanner
(``sidecar.wire``: C, or the same answers in Python): runs of spans of one trace
are sliced from the bytes into the buffer, and what the configured policies need
(status, start and end, tracestate randomness, attribute values) is folded into
the trace per run; the received request is then free to go. The per-trace loops (sorting
runs into the buffer, running the policies) are C (``_trace.c``) with a pure-Python twin,
chosen with the wire scanner's rule (``buffer.sort_spans``, ``sort_logs``, ``decide``). Kept traces (a tenth,
typically) are not parsed either: their bytes are spliced into a new
Export*ServiceRequest under their original resource and scope and handed on as that
encoding (the next stages, redaction and the exporters, work on bytes too).
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
from typing import Callable

from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from prometheus_client import Counter, Gauge

from sidecar import wire
from sidecar.component import Component, Consumer, Refused
from sidecar.processors.tail_sampling import policies as _policies
from sidecar.processors.tail_sampling.buffer import Trace, decide, sort_logs, sort_spans
from sidecar.processors.tail_sampling.config import TailSamplingConfig
from sidecar.processors.tail_sampling.decisions import LRU
from sidecar.processors.tail_sampling.durable import DurableBuffer
from sidecar.processors.tail_sampling.output import POLICY_ATTRIBUTE, KeptSpans, Output
from sidecar.envelope import Envelope
from sidecar.host import Decision
from sidecar.outbox import Outbox
from sidecar.registry import CreateSettings
from sidecar.signals import Signal
from sidecar.ticker import Ticker

log = logging.getLogger(__name__)


SAMPLED, NOT_SAMPLED, DROPPED = "sampled", "not_sampled", "dropped"
_LABELS = (DROPPED, SAMPLED, NOT_SAMPLED, "none")  # decide()'s: the decisions, and no policy's name
#: the most items of decided output the outbox merges into one request (the shipped persistent queue batches to
#: as many before an export)
COALESCE_ITEMS = 8192


def _matched(checks: list, slots: list[int], hits: tuple, res_matched: int) -> int:
    """Bits of the attribute checks a run of spans passes, from the scanner's ``SpanRun.hits``:
    a span with the key is judged by its value, one without it by its resource. ``slots[i]``: the
    index of check i's key among the keys scanned (checks may share a key)."""
    matched = 0
    for (_, _, bit, matches), slot in zip(checks, slots):
        h = hits[slot]
        if h is None:
            matched |= res_matched & bit
            continue
        if h.absent:
            matched |= res_matched & bit
        for encoded in h.values:
            if matches(AnyValue.FromString(encoded)):
                matched |= bit
                break
    return matched


class TailSamplingProcessor(Component):
    """Holds traces (spans and logs) until decided; forwards kept ones, drops the rest and counts them."""

    def __init__(self, settings: CreateSettings, cfg: TailSamplingConfig, next_consumer: Consumer, *,
                 clock: Callable[[], float] = time.monotonic, rng: Callable[[], float] = random.random):
        self._settings = settings
        self._tel = settings.telemetry
        self._cfg = cfg
        self._next = next_consumer
        self._clock = clock
        self._rng = rng
        self._lock = threading.Lock()  # buffer, caches, policies, ready list
        # with ``storage``, undecided data is also in a write-ahead log (durable.py) and its traces pin it
        self._durable = DurableBuffer(settings, cfg)
        self._buffer = self._durable.trace_buffer(
            decision_wait=cfg.decision_wait, root_wait=cfg.decision_wait_after_root_received,
            num_traces=cfg.num_traces, max_bytes=cfg.max_buffered_bytes)
        self._sampled: LRU[bytes, tuple[str, int]] = LRU(cfg.decision_cache.sampled_cache_size)
        self._not_sampled: LRU[bytes, bool] = LRU(cfg.decision_cache.non_sampled_cache_size)
        built = [_policies.build(p) for p in cfg.policies]
        self._drop_policies = [p for p in built if isinstance(p, _policies.Drop)]
        self._keep_policies = [p for p in built if not isinstance(p, _policies.Drop)]
        self.policies = {p.name: p for p in built}
        # decided once: what each arriving span must yield for these policies (the sort's arguments)
        needs = _policies.needs_of(built)
        self._needs = (_policies.STATUS in needs, _policies.TIMES in needs, _policies.RANDOMNESS in needs)
        self._checks = _policies.attribute_checks(built)
        self._drop_plans = [p.plan() for p in self._drop_policies]  # after the checks: attribute plans carry bits
        self._keep_plans = [p.plan() for p in self._keep_policies]
        self._check_keys = tuple(dict.fromkeys(c.key_bytes for c in self._checks))  # each key scanned once
        self._check_slots = [self._check_keys.index(c.key_bytes) for c in self._checks]
        checks, slots = self._checks, self._check_slots
        # (all check bits, SpanRun.hits when no span has a scanned key, resource bits, a run's bits), or None
        self._sort_checks = None if not checks else (
            (1 << len(checks)) - 1, (None,) * len(self._check_keys), self._resource_matches,
            lambda hits, res_matched: _matched(checks, slots, hits, res_matched))
        if len(self._check_keys) > wire.MAX_KEYS:
            raise ValueError(f"tail_sampling: the attribute policies look at {len(self._check_keys)} keys; "
                             f"at most {wire.MAX_KEYS} are supported")
        sev = cfg.logs.always_keep_severity_at_least
        self._always_keep_severity = sev if sev > 0 else 1 << 30
        self._traceless_fraction = cfg.logs.without_trace_sampling_percentage / 100.0
        # decided output waiting for the next stage, in order (the limits are ``output`` in the config)
        # (with the log on, an output accepted downstream releases its pin: durable.py); what waits for a tick
        # goes on as one request per signal (see _enqueue)
        self._outbox = Outbox(self._durable.releasing(next_consumer), settings.telemetry,
                              max_items=cfg.output.max_items, clock=clock, name=str(settings.id),
                              coalesce=self._durable.merge, coalesce_items=COALESCE_ITEMS,
                              release=self._durable.delivered)
        self._backpressure_items = cfg.output.backpressure_items

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
        self._early = family(Counter, "sidecar_tail_sampling_early_decisions",
                             "Traces decided before their wait was over because the buffer was full (num_traces or "
                             "max_buffered_bytes): decided on what had arrived, kept or dropped by the policies.",
                             ("component",)).labels(cid)
        family(Gauge, "sidecar_tail_sampling_buffered_traces", "Traces waiting for a decision.",
               ("component",)).labels(cid).set_function(lambda: len(self._buffer))
        family(Gauge, "sidecar_tail_sampling_buffered_bytes",
               "Memory held by the data waiting for a decision (its encoded size plus per-item overhead).",
               ("component",)).labels(cid).set_function(lambda: self._buffer.nbytes)

        root_wait = cfg.decision_wait_after_root_received
        self.tick_interval = max(0.005, min(0.1, root_wait / 2 if root_wait else 0.1))
        self._ticker = Ticker(self.tick, self.tick_interval, name=f"tail_sampling[{cid}]")
        self._decisions = None  # the host's decision channel, from start()
        #: per signal, decided items this run left in the log for the next start (the shutdown report reads it)
        self.left_on_disk: dict[Signal, int] = {}

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self, host) -> None:
        if host is not None:  # span_metrics (in front) publishes exemplars of kept traces only
            self._decisions = host.sampling_decisions
            self._decisions.register(self._component, self._cfg.decision_wait)
        self._durable.start(host, self._sort)  # replays what a crash left in the log, before new data
        self._ticker.start()

    def shutdown(self, deadline: float) -> None:
        """Decide every pending trace now and hand everything to the next stage before ``deadline``."""
        self._ticker.stop(deadline)
        now = self._clock()
        with self._lock:
            decided = self._decide_all(self._buffer.drain(), now)
        self._emit_decided(decided)
        # with the log on, what the next stage did not take by the deadline keeps its pin: the log keeps it for
        # the next start, and the shutdown report counts it on disk, not lost
        self.left_on_disk = self._outbox.drain(deadline, on_disk=self._durable.enabled)
        self._durable.close()

    # --- consuming --------------------------------------------------------------------------------

    def consume(self, envelope: Envelope) -> None:
        if self._durable.enabled:
            self._durable.consume(envelope, self._sort)  # logged; synced before this returns or the fan-out answers
        else:
            self._sort(envelope)

    def _sort(self, envelope: Envelope) -> None:
        signal = envelope.signal
        if signal is Signal.TRACES:
            self._consume_traces(envelope)
        elif signal is Signal.LOGS:
            self._consume_logs(envelope)
        else:
            raise Refused("unsupported_signal", retryable=False, message=f"tail_sampling does not take {signal.value}")

    def _admit(self, envelope: Envelope) -> int:
        """The request's items; refuse it while decided output is backed up downstream."""
        if self._outbox.items > self._backpressure_items:
            self._outbox.flush()
            if self._outbox.items > self._backpressure_items:
                raise Refused("downstream_backpressure", message="tail_sampling output is backed up")
        return envelope.items

    def _consume_traces(self, envelope: Envelope) -> None:
        """Sort a traces request into the buffer from the wire scanner's runs (consecutive spans of one
        trace and tracestate): span bytes are sliced from the encoding and sorted in per run (C or Python)."""
        n = self._admit(envelope)
        if not n:
            return
        runs = wire.span_runs(envelope.encoded, self._check_keys)
        now = self._clock()
        late_kept: list[tuple] = []  # (resource head, scope head, span bytes, tracestate, (policy, threshold))
        passthrough: list[tuple] = []  # (resource head, scope head, span bytes)
        older: list[Trace] = []  # buffered traces this request brings data of an older log segment to
        evicted: list[Trace] = []
        buf = self._buffer
        with self._lock, buf.sorting():
            added, n_late_kept, late_dropped = sort_spans(
                runs, buf, now, self._sampled.entries, self._not_sampled.entries, self._needs, self._sort_checks,
                late_kept, passthrough, older, evicted)
            early = self._end_sort(added, older, evicted, now)
        self._finish_traces(n, late_dropped, early, n_late_kept, late_kept, passthrough)

    def _consume_logs(self, envelope: Envelope) -> None:
        """Sort a logs request from the wire scanner's runs (consecutive records of one trace, same severity side)."""
        n = self._admit(envelope)
        if not n:
            return
        runs = wire.log_runs(envelope.encoded, self._always_keep_severity)
        now = self._clock()
        immediate: list[tuple] = []  # (resource head, scope head, record bytes)
        older: list[Trace] = []
        evicted: list[Trace] = []
        buf = self._buffer
        with self._lock, buf.sorting():
            added, n_immediate, late_kept, late_dropped, traceless_dropped = sort_logs(
                runs, buf, now, self._sampled.entries, self._not_sampled.entries, self._traceless_fraction,
                self._rng, immediate, older, evicted)
            early = self._end_sort(added, older, evicted, now)
            direct = n_immediate == n and not len(self._outbox) and not early
        self._finish_logs(envelope, direct, late_kept, late_dropped, traceless_dropped, early, immediate)

    def _end_sort(self, added: int, older: list[Trace], evicted: list[Trace], now: float) -> list | None:
        """A request's sort is over (under the lock): count its bytes, move the pins of ``older`` (traces it
        brought data of an older log segment to), take out what the budget no longer holds, and decide the
        traces a full buffer took out (``evicted``): the decisions :meth:`_decided_early` hands on, or None."""
        buf = self._buffer
        buf.add_bytes(added)
        if older:
            buf.repin(older)
        buf.over_budget(evicted)
        return self._decide_all(evicted, now) if evicted else None

    def _resource_matches(self, values: tuple) -> int:
        """Bits of the attribute checks the resource's own value passes (spans without the key inherit it);
        ``values``: the scanner's encoded value per scanned key (``ResourceGroup.values``)."""
        bits = 0
        for (_, _, bit, matches), slot in zip(self._checks, self._check_slots):
            value = values[slot]
            if value is not None and matches(AnyValue.FromString(value)):
                bits |= bit
        return bits

    def _finish_traces(self, n: int, late_dropped: int, early: list | None, n_late_kept: int,
                       late_kept: list[tuple], passthrough: list[tuple]) -> None:
        """After a traces request is sorted: count it, hand on the traces the full buffer made it decide
        (``early``), and forward late spans of kept traces ((resource head, scope head, encoded spans,
        tracestate, (policy, threshold))) and spans without a trace id ((resource head, scope head, encoded
        spans))."""
        if late_dropped:
            self._tel.dropped(Signal.TRACES, late_dropped, "sampled_out")
            self._late[(Signal.TRACES, NOT_SAMPLED)].inc(late_dropped)
        if early:
            self._decided_early(early)
        if late_kept or passthrough:
            out = Output(Signal.TRACES)
            kept = KeptSpans()
            for rhead, shead, blobs, ts, (policy, threshold) in late_kept:
                out.add(rhead, shead, kept.encode(blobs, ts, threshold, policy))
            for rhead, shead, blobs in passthrough:
                out.add(rhead, shead, blobs)
            if n_late_kept:
                self._late[(Signal.TRACES, SAMPLED)].inc(n_late_kept)
            self._enqueue(out)

    def _finish_logs(self, envelope: Envelope, direct: bool, late_kept: int, late_dropped: int,
                     traceless_dropped: int, early: list | None, immediate: list[tuple]) -> None:
        """After a logs request is sorted: count it, and forward what is not held back.

        ``immediate`` holds (resource head, scope head, encoded records) forwarded now; when that
        is the whole request (``direct``) the request itself goes on, so a refusal reaches the sender.
        """
        if late_kept:
            self._late[(Signal.LOGS, SAMPLED)].inc(late_kept)
        if direct:
            self._next.consume(envelope)
            return
        if late_dropped:
            self._tel.dropped(Signal.LOGS, late_dropped, "sampled_out")
            self._late[(Signal.LOGS, NOT_SAMPLED)].inc(late_dropped)
        if traceless_dropped:
            self._tel.dropped(Signal.LOGS, traceless_dropped, "sampled_out")
        if early:
            self._decided_early(early)
        if immediate:
            out = Output(Signal.LOGS)
            for rhead, shead, blobs in immediate:
                out.add(rhead, shead, blobs)
            self._enqueue(out)

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
        if len(self._outbox):
            self._outbox.flush()

    def _decide_all(self, traces: list[Trace], now: float) -> list[tuple[Trace, str, str, int]]:
        """Decisions for ``traces``, remembered in the decision cache. Call with the lock held."""
        out, kept, dropped = decide(traces, self._drop_plans, self._keep_plans, now, _LABELS)
        self._sampled.put_many(kept)
        self._not_sampled.put_many(dropped)
        return out

    def _emit_decided(self, decided: list[tuple[Trace, str, str, int]]) -> None:
        spans_out = Output(Signal.TRACES)
        logs_out = Output(Signal.LOGS)
        kept = KeptSpans()
        traces_by: dict[tuple[str, str], int] = {}  # (decision, policy) -> traces, but for not sampled
        dropped: dict[str, list[int]] = {}  # reason -> [spans, log records]
        kept_traces = []
        n_not_sampled = 0
        for t, decision, policy, threshold in decided:
            if decision is NOT_SAMPLED:  # most traces: only counted
                if not n_not_sampled:
                    counts = dropped.setdefault("sampled_out", [0, 0])
                n_not_sampled += 1
                counts[0] += t.n_spans
                counts[1] += t.n_logs
                continue
            key = (decision, policy)
            traces_by[key] = traces_by.get(key, 0) + 1
            if decision is SAMPLED:
                kept_traces.append(t)
                if t.spans is not None:
                    for (rhead, shead, tracestate), blobs in t.span_groups:
                        spans_out.add(rhead, shead, kept.encode(blobs, tracestate, threshold, policy))
                if t.logs is not None:
                    for (rhead, shead), blobs in t.log_groups:
                        logs_out.add(rhead, shead, blobs)
            else:
                drops = dropped.setdefault("policy_drop", [0, 0])
                drops[0] += t.n_spans
                drops[1] += t.n_logs
        if n_not_sampled:
            traces_by[(NOT_SAMPLED, "none")] = n_not_sampled
        for (decision, policy), n in traces_by.items():
            self._count_traces(decision, policy, n)
        for reason, (n_spans, n_logs) in dropped.items():
            self._tel.dropped(Signal.TRACES, n_spans, reason)
            self._tel.dropped(Signal.LOGS, n_logs, reason)
        if self._decisions is not None and self._decisions.subscribed:
            new = tuple.__new__  # Decision's own constructor, without its Python-level __new__
            self._decisions.publish([new(Decision, (t.trace_id, decision is SAMPLED, policy))
                                     for t, decision, policy, _ in decided])
        if spans_out.n:
            self._enqueue(spans_out, kept_traces)
        if logs_out.n:
            self._enqueue(logs_out, kept_traces)
        if self._durable.enabled:
            self._durable.release([t for t, _, _, _ in decided])  # the output now pins what it carries

    def _count_traces(self, decision: str, policy: str, n: int) -> None:
        key = (decision, policy)
        child = self._trace_counters.get(key)
        if child is None:
            child = self._trace_counters[key] = self._traces_family.labels(self._component, decision, policy)
        child.inc(n)

    def _decided_early(self, decided: list[tuple[Trace, str, str, int]]) -> None:
        """Hand on the traces a full buffer (``num_traces``, ``max_buffered_bytes``) pushed out before their
        wait was over, decided on what had arrived: errors, forced and sampled traces are kept as usual.
        Dropping them instead (otelcol's eviction) would lose data the receiver had acknowledged, and after
        a crash the replay of a large log would do so for traces the policies keep."""
        self._early.inc(len(decided))
        self._emit_decided(decided)

    # --- delivering -------------------------------------------------------------------------------

    def _enqueue(self, out: Output, traces: list[Trace] | None = None) -> None:
        """Hold ``out`` for the next stage; with the log on, it pins the log until accepted (``traces``:
        the decided traces it carries; None: output of the request being sorted).

        The ticker hands it on (within ``tick_interval``), merged with what else waits: one request
        downstream per tick rather than one per received request. A full buffer makes every request
        decide some traces early, and delivering each small output at once from the receiver cost a
        persistent-queue file, its fsync and an export per request: 45% more CPU per item
        (docs/benchmarks.md, sixteenth round). No acknowledgement waits for a delivery; beyond
        ``backpressure_items`` waiting, :meth:`_admit` delivers first and refuses what still does not fit."""
        if self._durable.enabled:
            self._outbox.put(self._durable.envelope(out.signal, out.encoded(), out.n, traces))
        else:  # as bytes: the next stages work on the encoding (parsed only by one that reads the message)
            self._outbox.put(Envelope(out.signal, encoded=out.encoded(), items=out.n))

    # --- introspection (tests, the demo) --------------------------------------------------------

    @property
    def buffered_traces(self) -> int:
        return len(self._buffer)

    @property
    def buffered_bytes(self) -> float:
        return self._buffer.nbytes

    @property
    def pending_output_items(self) -> int:
        return self._outbox.items
