"""Issue 3 shown with real processes: tail sampling keeps whole stories, span metrics stay true.

A real ``python -m sidecar`` child runs span_metrics -> tail_sampling -> batch -> otlp,
with one tail_sampling instance in the traces and the logs pipeline; the test sends
OTLP/gRPC to it and a real OTLP backend records what comes out. Every expectation is
computed here from what was sent (the W3C consistent rule included), never read back
from the implementation.
"""

from __future__ import annotations

import random
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction

import grpc
import psutil
import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from prometheus_client.parser import text_string_to_metric_families

from sidecar.signals import Signal
from sidecar.testing import OTLPBackend, SidecarProcess, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

SLOW_MS = 1000
PERCENTAGE = 10
#: W3C Trace Context level 2 / OTel consistent sampling: keep iff R >= T, T = round((1 - p) * 2**56).
THRESHOLD = round((1 - Fraction(PERCENTAGE, 100)) * 2**56)
#: What kept spans must carry in ``ot=th:``: 100% for the deterministic policies, T for the probabilistic one.
TH = {"errors": "0", "slow": "0", "debug": "0", "baseline": "e6666666666666"}
POLICY_OF_KIND = {"error": "errors", "slow": "slow", "forced": "debug"}
ERROR_SEVERITY = 17
BASE_NS = 1_750_000_000_000_000_000
SERVICES = (("resnet-server", "resnet50"), ("bert-server", "bert-base"))
CHILD_NAMES = ("preprocess", "ml.forward", "postprocess")


def sampling_config(backend: str, grpc_port: int, metrics_port: int, *, decision_wait: str = "1s",
                    num_traces: int = 50_000) -> str:
    """The recommended pipeline in miniature: span_metrics -> tail_sampling -> batch -> otlp."""
    return f"""
receivers:
  otlp:
    protocols:
      grpc: {{endpoint: 127.0.0.1:{grpc_port}}}
processors:
  span_metrics: {{}}
  tail_sampling:
    decision_wait: {decision_wait}
    decision_wait_after_root_received: 200ms
    num_traces: {num_traces}
    policies:
      - {{name: errors, type: status_code, status_code: {{status_codes: [ERROR]}}}}
      - {{name: slow, type: latency, latency: {{threshold_ms: {SLOW_MS}}}}}
      - {{name: debug, type: boolean_attribute, boolean_attribute: {{key: sampling.force_keep, value: true}}}}
      - {{name: baseline, type: probabilistic, probabilistic: {{sampling_percentage: {PERCENTAGE}}}}}
  batch: {{send_batch_size: 2048, timeout: 100ms}}
exporters:
  otlp/backend:
    endpoint: {backend}
    tls: {{insecure: true}}
    timeout: 5s
    retry_on_failure: {{initial_interval: 100ms, max_interval: 500ms, max_elapsed_time: 0}}
service:
  telemetry:
    metrics: {{address: 127.0.0.1:{metrics_port}}}
  shutdown_timeout: 10s
  pipelines:
    traces: {{receivers: [otlp], processors: [span_metrics, tail_sampling, batch], exporters: [otlp/backend]}}
    logs: {{receivers: [otlp], processors: [tail_sampling, batch], exporters: [otlp/backend]}}
"""


class Sidecar:
    """A sidecar process with the sampling config, its backend and its ports."""

    def __init__(self, env: dict | None = None, **config):
        self.grpc_port, self.metrics_port = free_port(), free_port()
        self.backend = OTLPBackend().start()
        self.process = SidecarProcess(sampling_config(self.backend.endpoint, self.grpc_port, self.metrics_port,
                                                      **config), env=env)

    def __enter__(self) -> "Sidecar":
        try:
            self.process.start()
        except BaseException:
            self.backend.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.process.__exit__(*exc)
        finally:
            self.backend.stop()

    def drain(self) -> None:
        """SIGTERM: the sidecar decides and delivers everything it holds, then exits; nothing arrives after."""
        assert self.process.terminate(30) == 0, self.process.log()

    def sender(self) -> "Sender":
        return Sender(self.grpc_port)

    def scrape(self) -> "Scrape":
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return Scrape(r.read().decode())

    def scrape_when(self, name: str, at_least: float, timeout: float = 15.0, **labels: str) -> "Scrape":
        """A scrape taken once metric ``name`` (summed over ``labels``) has reached ``at_least``, or at timeout."""
        deadline = time.monotonic() + timeout
        while True:
            scrape = self.scrape()
            if scrape.value(name, **labels) >= at_least or time.monotonic() > deadline:
                return scrape
            time.sleep(0.05)


class Sender:
    """OTLP/gRPC client that retries what the sidecar refuses with a retryable code, as an SDK would."""

    RETRYABLE = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)

    def __init__(self, port: int):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.traces = trace_service_pb2_grpc.TraceServiceStub(self.channel)
        self.logs = logs_service_pb2_grpc.LogsServiceStub(self.channel)

    def send(self, request) -> None:
        stub = self.traces if isinstance(request, ExportTraceServiceRequest) else self.logs
        for _ in range(400):
            try:
                stub.Export(request, timeout=10)
                return
            except grpc.RpcError as e:
                if e.code() not in self.RETRYABLE:
                    raise
                time.sleep(0.05)
        raise AssertionError("the sidecar kept refusing a request")


def run_in_parallel(*jobs) -> None:
    """Run each callable in its own thread, as independent exporters would; re-raise the first failure."""
    errors: list[BaseException] = []

    def guarded(job) -> None:
        try:
            job()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    if errors:
        raise errors[0]


class Scrape:
    """One scrape of the sidecar's Prometheus endpoint."""

    def __init__(self, text: str):
        self.samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples named ``name`` whose labels include ``labels``."""
        return sum(s.value for s in self.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def series(self, name: str, label_names: tuple[str, ...], **labels: str) -> Counter:
        out: Counter = Counter()
        for s in self.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out[tuple(s.labels.get(k, "") for k in label_names)] += int(s.value)
        return +out


# --- the workload ----------------------------------------------------------------------------------


@dataclass
class SentTrace:
    trace_id: bytes
    kind: str  # error | slow | forced | plain
    service: int
    spans: list[Span]  # root first
    logs: list[LogRecord] = field(default_factory=list)

    @property
    def randomness(self) -> int:
        """R: ``rv`` from the ``ot`` tracestate entry if present, else the trace id's rightmost 56 bits."""
        ot, _ = parse_tracestate(self.spans[0].trace_state)
        if "rv" in ot:
            return int(ot["rv"], 16)
        return int.from_bytes(self.trace_id[-7:], "big")

    @property
    def policy(self) -> str | None:
        """The policy that must keep this trace, or None when it must be dropped."""
        if self.kind in POLICY_OF_KIND:
            return POLICY_OF_KIND[self.kind]
        return "baseline" if self.randomness >= THRESHOLD else None


def _attr(span_or_record, key: str, value) -> None:
    kv = span_or_record.attributes.add(key=key)
    if isinstance(value, bool):
        kv.value.bool_value = value
    elif isinstance(value, int):
        kv.value.int_value = value
    else:
        kv.value.string_value = value


class Workload:
    """Inference traces of known kinds with their logs, plus logs that carry no trace id."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.ids: set[bytes] = set()
        self.n_logs = 0

    def _id(self, nbytes: int) -> bytes:
        while True:
            b = self.rng.getrandbits(nbytes * 8).to_bytes(nbytes, "big")
            if any(b) and b not in self.ids:
                self.ids.add(b)
                return b

    def log(self, trace_id: bytes = b"", span_id: bytes = b"", severity: int = 9) -> LogRecord:
        self.n_logs += 1
        rec = LogRecord(time_unix_nano=BASE_NS + self.n_logs, severity_number=severity, trace_id=trace_id,
                        span_id=span_id, severity_text={9: "INFO", 13: "WARN", 17: "ERROR", 21: "FATAL"}[severity])
        rec.body.string_value = f"log-{self.n_logs}"
        _attr(rec, "request_id", f"req-{self.n_logs}")
        return rec

    def trace(self, kind: str, *, trace_id: bytes | None = None, n_children: int | None = None) -> SentTrace:
        rng = self.rng
        tid = trace_id or self._id(16)
        service = rng.randrange(len(SERVICES))
        model = SERVICES[service][1]
        version = rng.choice(("v3", "v4"))
        start = BASE_NS + rng.getrandbits(40)
        duration_ms = rng.randint(SLOW_MS + 200, 3000) if kind == "slow" else rng.randint(1, 900)
        end = start + duration_ms * 1_000_000
        r = rng.random()
        tracestate = ("vendor=abc,other=1" if r < 0.05 else
                      f"ot=rv:{rng.getrandbits(56):014x}" if r < 0.08 else "")
        root = Span(trace_id=tid, span_id=self._id(8), name="POST /predict", kind=Span.SPAN_KIND_SERVER,
                    start_time_unix_nano=start, end_time_unix_nano=end, trace_state=tracestate)
        _attr(root, "ml.model.id", model)
        _attr(root, "http.route", "/predict")
        if rng.random() < 0.06:  # called from another service: the local root has a remote parent
            root.parent_span_id = self._id(8)
            if rng.random() < 0.5:  # flagged remote (decided early), else only decision_wait decides it
                root.flags = 0x301
        spans = [root]
        n = rng.randint(0, 3) if n_children is None else n_children
        for i in range(n):
            child = Span(trace_id=tid, span_id=self._id(8), parent_span_id=root.span_id, name=CHILD_NAMES[i],
                         kind=Span.SPAN_KIND_INTERNAL, start_time_unix_nano=start + (i + 1) * 1000,
                         end_time_unix_nano=end - (i + 1) * 1000, trace_state=tracestate)
            _attr(child, "ml.model.id", model)
            _attr(child, "ml.model.version", version)
            _attr(child, "ml.batch_size", 8)
            spans.append(child)
        if kind == "error":
            victim = rng.choice(spans)
            victim.status.code = Status.STATUS_CODE_ERROR
            victim.status.message = "RuntimeError: CUDA out of memory"
        elif rng.random() < 0.2:
            rng.choice(spans).status.code = Status.STATUS_CODE_OK
        if kind == "forced":
            _attr(rng.choice(spans), "sampling.force_keep", True)
        elif rng.random() < 0.05:
            _attr(rng.choice(spans), "sampling.force_keep", False)  # a decoy: false must not force anything
        t = SentTrace(tid, kind, service, spans)
        for _ in range(rng.randint(1, 3)):
            t.logs.append(self.log(tid, rng.choice(spans).span_id, rng.choice((9, 9, 13))))
        if kind == "error" or (kind == "plain" and rng.random() < 0.06):
            t.logs.append(self.log(tid, rng.choice(spans).span_id, rng.choice((ERROR_SEVERITY, 21))))
        return t

    def traces(self, n: int) -> list[SentTrace]:
        out = []
        for _ in range(n):
            u = self.rng.random()
            out.append(self.trace("error" if u < 0.05 else "slow" if u < 0.10 else "forced" if u < 0.13 else "plain"))
        return out


def _resource(resource, service: int) -> None:
    _attr(resource, "service.name", SERVICES[service][0])
    _attr(resource, "k8s.pod.name", f"{SERVICES[service][0]}-pod-1")


def spans_request(items: list[tuple[int, Span]]) -> ExportTraceServiceRequest:
    """One request holding ``(service, span)`` items, one ResourceSpans per service, in the given order."""
    req = ExportTraceServiceRequest()
    scopes = {}
    for service, span in items:
        ss = scopes.get(service)
        if ss is None:
            rs = req.resource_spans.add()
            _resource(rs.resource, service)
            ss = scopes[service] = rs.scope_spans.add()
            ss.scope.name, ss.scope.version = "instrumentation.torch", "0.1.0"
        ss.spans.append(span)
    return req


def logs_request(items: list[tuple[int | None, LogRecord]]) -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    scopes = {}
    for service, rec in items:
        key = 0 if service is None else service
        sl = scopes.get(key)
        if sl is None:
            rl = req.resource_logs.add()
            _resource(rl.resource, key)
            sl = scopes[key] = rl.scope_logs.add()
            sl.scope.name = "app"
        sl.log_records.append(rec)
    return req


def whole_trace_requests(traces: list[SentTrace], spans_per_request: int) -> list[list[SentTrace]]:
    """Consecutive traces grouped so each request has about ``spans_per_request`` spans; no trace is split."""
    groups, group, n = [], [], 0
    for t in traces:
        group.append(t)
        n += len(t.spans)
        if n >= spans_per_request:
            groups.append(group)
            group, n = [], 0
    if group:
        groups.append(group)
    return groups


# --- reading what the backend got -------------------------------------------------------------------


def parse_tracestate(ts: str) -> tuple[dict[str, str], list[str]]:
    """The ``ot`` entry's sub-keys and the other list members, in order."""
    ot: dict[str, str] = {}
    others = []
    for member in filter(None, (m.strip() for m in ts.split(","))):
        if member.startswith("ot="):
            ot = dict(part.split(":", 1) for part in member[3:].split(";") if ":" in part)
        else:
            others.append(member)
    return ot, others


def string_attr(span: Span, key: str) -> str | None:
    values = [kv.value.string_value for kv in span.attributes if kv.key == key]
    assert len(values) <= 1, f"{key} set {len(values)} times"
    return values[0] if values else None


def as_sent(received: Span, tracestate: str) -> bytes:
    """A received span with the sampler's annotations removed: must equal what was sent."""
    s = Span()
    s.CopyFrom(received)
    kept = [kv for kv in s.attributes if kv.key != "sampling.policy"]
    del s.attributes[:]
    s.attributes.extend(kept)
    s.trace_state = tracestate
    return s.SerializeToString(deterministic=True)


def received_spans(backend: OTLPBackend) -> dict[tuple[bytes, bytes], tuple[str, Span]]:
    """(trace id, span id) -> (service.name of its resource, span); a span received twice fails."""
    out = {}
    for resource, _, span in backend.spans():
        key = (span.trace_id, span.span_id)
        assert key not in out, f"span {span.span_id.hex()} of trace {span.trace_id.hex()} delivered twice"
        service = next(kv.value.string_value for kv in resource.attributes if kv.key == "service.name")
        out[key] = (service, span)
    return out


def decisions_of(spans: dict) -> dict[tuple[bytes, bytes], tuple[str, str | None]]:
    return {key: (span.trace_state, string_attr(span, "sampling.policy")) for key, (_, span) in spans.items()}


# --- 1. the whole story, 20,000 traces ---------------------------------------------------------------


def test_20k_traces_keep_errors_slow_forced_and_10_percent_with_their_logs_and_true_metrics():
    work = Workload(seed=3)
    traces = work.traces(20_000)
    traceless = [work.log(severity=work.rng.choice((9, 13, ERROR_SEVERITY))) for _ in range(1_000)]
    groups = whole_trace_requests(traces, 300)

    by_kind = Counter(t.kind for t in traces)
    kept = {t.trace_id: t for t in traces if t.policy}
    plain = [t for t in traces if t.kind == "plain"]
    plain_kept = {t.trace_id for t in plain if t.policy}
    want_spans = sum(len(t.spans) for t in kept.values())
    want_logs = {rec.body.string_value: rec for t in traces for rec in t.logs
                 if t.trace_id in kept or rec.severity_number >= ERROR_SEVERITY}
    want_logs.update((rec.body.string_value, rec) for rec in traceless)
    assert min(by_kind.values()) >= 500 and by_kind["plain"] >= 15_000, by_kind

    with Sidecar(decision_wait="2s") as sc:  # margin for a trace whose logs come first, on a busy machine
        per_group = -(-len(traceless) // len(groups))
        def send_share(k: int, of: int) -> None:
            sender = sc.sender()
            for i in range(k, len(groups), of):
                spans = spans_request([(t.service, s) for t in groups[i] for s in t.spans])
                logs = [(t.service, rec) for t in groups[i] for rec in t.logs]
                logs += [(None, rec) for rec in traceless[i * per_group:(i + 1) * per_group]]
                # the SDK's span and log exporters are independent: a trace's logs may come first
                for request in (spans, logs_request(logs))[::1 if i % 2 else -1]:
                    sender.send(request)

        run_in_parallel(*(lambda k=k: send_share(k, 4) for k in range(4)))  # four workers export at once
        sc.backend.wait_for_items(Signal.TRACES, want_spans, timeout=30)
        sc.backend.wait_for_items(Signal.LOGS, len(want_logs), timeout=10)
        metrics = sc.scrape_when("sidecar_tail_sampling_traces_total", len(traces))
        sc.drain()

    # traces: exactly the predicted set, each one whole
    got = received_spans(sc.backend)
    got_traces = {tid for tid, _ in got}
    for kind in ("error", "slow", "forced"):
        missing = [t.trace_id.hex() for t in traces if t.kind == kind and t.trace_id not in got_traces]
        assert not missing, f"{len(missing)} of {by_kind[kind]} {kind} traces dropped, e.g. {missing[:3]}"
    got_plain = {t.trace_id for t in plain if t.trace_id in got_traces}
    share = 100 * len(got_plain) / len(plain)
    assert abs(share - PERCENTAGE) <= 1.5, f"{share:.2f}% of plain traces kept"
    assert got_plain == plain_kept, (f"{len(got_plain - plain_kept)} plain traces kept and "
                                     f"{len(plain_kept - got_plain)} dropped against the W3C consistent rule")
    assert got_traces == set(kept)
    assert len(got) == want_spans, f"{len(got)} spans delivered, {want_spans} expected"

    # kept spans: intact, under their resource, marked with the deciding policy and the threshold
    for t in kept.values():
        for sent in t.spans:
            service, span = got[(t.trace_id, sent.span_id)]
            assert service == SERVICES[t.service][0]
            assert string_attr(span, "sampling.policy") == t.policy, (t.kind, t.trace_id.hex())
            ot, others = parse_tracestate(span.trace_state)
            sent_ot, sent_others = parse_tracestate(sent.trace_state)
            assert ot == {**sent_ot, "th": TH[t.policy]}, (span.trace_state, sent.trace_state, t.policy)
            assert others == sent_others, span.trace_state
            assert span.trace_state.startswith("ot="), span.trace_state  # W3C: the updated entry moves left
            assert as_sent(span, sent.trace_state) == sent.SerializeToString(deterministic=True)

    # logs: those of kept traces, every ERROR log, every log without a trace id; nothing else, nothing twice
    got_logs = Counter(rec.body.string_value for _, _, rec in sc.backend.log_records())
    assert not [b for b, n in got_logs.items() if n > 1], "log records delivered twice"
    error_logs = {rec.body.string_value for t in traces for rec in t.logs if rec.severity_number >= ERROR_SEVERITY}
    dropped_error_logs = {rec.body.string_value for t in traces if t.trace_id not in kept for rec in t.logs
                          if rec.severity_number >= ERROR_SEVERITY}
    assert len(dropped_error_logs) >= 100
    assert error_logs <= set(got_logs), f"{len(error_logs - set(got_logs))} ERROR logs lost"
    assert {rec.body.string_value for rec in traceless} <= set(got_logs), "logs without a trace id lost"
    kept_logs = {rec.body.string_value for t in kept.values() for rec in t.logs}
    assert kept_logs <= set(got_logs), f"{len(kept_logs - set(got_logs))} logs of kept traces lost"
    assert set(got_logs) == set(want_logs), (f"{len(set(got_logs) - set(want_logs))} logs of dropped traces "
                                             "delivered")
    for _, _, rec in sc.backend.log_records():
        assert rec.SerializeToString(deterministic=True) == want_logs[rec.body.string_value].SerializeToString(
            deterministic=True)

    # span metrics: computed from every span sent, before sampling
    labels = ("service_name", "span_name", "span_kind", "status_code", "model_id", "model_version")
    truth: Counter = Counter()
    fast: Counter = Counter()  # spans of at most 1 s: the le="1.0" bucket
    for t in traces:
        service, model = SERVICES[t.service]
        for s in t.spans:
            version = next((kv.value.string_value for kv in s.attributes if kv.key == "ml.model.version"), "")
            key = (service, s.name, Span.SpanKind.Name(s.kind), Status.StatusCode.Name(s.status.code), model, version)
            truth[key] += 1
            if s.end_time_unix_nano - s.start_time_unix_nano <= 1_000_000_000:
                fast[key] += 1
    calls = metrics.series("traces_span_metrics_calls_total", labels)
    assert calls == truth
    errors = metrics.series("traces_span_metrics_calls_total", ("span_name",), status_code="STATUS_CODE_ERROR")
    error_truth: Counter = Counter()
    for key, n in truth.items():
        if key[3] == "STATUS_CODE_ERROR":
            error_truth[(key[1],)] += n
    assert errors == error_truth
    assert sum(errors.values()) == by_kind["error"]
    assert metrics.series("traces_span_metrics_duration_seconds_count", labels) == truth
    assert metrics.series("traces_span_metrics_duration_seconds_bucket", labels, le="1.0") == +fast

    # the sampler's own account agrees
    want_decided = Counter(("sampled", t.policy) for t in kept.values())
    want_decided[("not_sampled", "none")] = len(traces) - len(kept)
    assert metrics.series("sidecar_tail_sampling_traces_total", ("decision", "policy")) == want_decided
    assert metrics.value("sidecar_tail_sampling_early_decisions_total") == 0


# --- 2. consistent across sidecars --------------------------------------------------------------------


def test_two_sidecars_given_the_same_traces_differently_make_identical_decisions():
    traces = Workload(seed=11).traces(4_000)
    in_order = [spans_request([(t.service, s) for t in g for s in t.spans]) for g in whole_trace_requests(traces, 300)]
    # the other sidecar: shuffled traces, children before their root, cut into requests of 97 spans
    # (traces straddle requests; the root comes last, so a trace is decided only once it is whole)
    shuffled = list(traces)
    random.Random(5).shuffle(shuffled)
    flat = [(t.service, s) for t in shuffled for s in reversed(t.spans)]
    regrouped = [spans_request(flat[i:i + 97]) for i in range(0, len(flat), 97)]
    want = sum(len(t.spans) for t in traces if t.policy)

    # the second sidecar also runs the pure-Python paths: the C scanner must not change a decision
    with Sidecar(decision_wait="3s") as a, Sidecar(decision_wait="3s", env={"SIDECAR_PURE_PYTHON": "1"}) as b:
        def send_all(sc: Sidecar, requests: list) -> None:
            sender = sc.sender()
            for r in requests:
                sender.send(r)

        run_in_parallel(lambda: send_all(a, in_order), lambda: send_all(b, regrouped))
        for sc in (a, b):
            sc.backend.wait_for_items(Signal.TRACES, want, timeout=30)
            sc.drain()

    got_a, got_b = received_spans(a.backend), received_spans(b.backend)
    assert {tid for tid, _ in got_a} == {tid for tid, _ in got_b}
    assert decisions_of(got_a) == decisions_of(got_b)
    policies = Counter(policy for _, policy in decisions_of(got_a).values())
    assert set(policies) == {"errors", "slow", "debug", "baseline"}, policies
    assert {tid for tid, _ in got_a} == {t.trace_id for t in traces if t.policy}


# --- 3. late data follows the cached decision ---------------------------------------------------------


def _trace_id(randomness: int, prefix: int) -> bytes:
    return prefix.to_bytes(9, "big") + randomness.to_bytes(7, "big")


def test_late_spans_and_logs_follow_the_cached_decision():
    work = Workload(seed=17)
    kept_by_chance = work.trace("plain", trace_id=_trace_id(2**56 - 1, 1), n_children=1)  # R at the top: kept
    kept_error = work.trace("error", n_children=1)
    dropped = work.trace("plain", trace_id=_trace_id(1, 2), n_children=1)  # R near 0: dropped
    assert (kept_by_chance.policy, kept_error.policy, dropped.policy) == ("baseline", "errors", None)
    three = [kept_by_chance, kept_error, dropped]

    def late_span(t: SentTrace) -> Span:
        s = Span(trace_id=t.trace_id, span_id=work._id(8), parent_span_id=t.spans[0].span_id, name="late.retry",
                 kind=Span.SPAN_KIND_INTERNAL, start_time_unix_nano=t.spans[0].end_time_unix_nano,
                 end_time_unix_nano=t.spans[0].end_time_unix_nano + 5_000_000, trace_state=t.spans[0].trace_state)
        _attr(s, "ml.model.id", SERVICES[t.service][1])
        return s

    with Sidecar() as sc:
        sender = sc.sender()
        sender.send(spans_request([(t.service, s) for t in three for s in t.spans]))
        sender.send(logs_request([(t.service, rec) for t in three for rec in t.logs]))
        decided = sc.scrape_when("sidecar_tail_sampling_traces_total", 3)
        assert decided.value("sidecar_tail_sampling_traces_total") == 3, "the three traces were not decided"

        late = {t.trace_id: late_span(t) for t in three}
        late_logs = {t.trace_id: work.log(t.trace_id, t.spans[0].span_id) for t in three}
        late_error_log = work.log(dropped.trace_id, dropped.spans[0].span_id, ERROR_SEVERITY)
        sender.send(spans_request([(t.service, late[t.trace_id]) for t in three]))
        sender.send(logs_request([(t.service, late_logs[t.trace_id]) for t in three] +
                                 [(dropped.service, late_error_log)]))
        want_spans = sum(len(t.spans) + 1 for t in three if t.policy)
        sc.backend.wait_for_items(Signal.TRACES, want_spans, timeout=10)
        metrics = sc.scrape()
        sc.drain()

    got = received_spans(sc.backend)
    for t in (kept_by_chance, kept_error):
        span = late[t.trace_id]
        assert (t.trace_id, span.span_id) in got, f"the late span of the trace kept by {t.policy!r} was lost"
        _, arrived = got[(t.trace_id, span.span_id)]
        assert string_attr(arrived, "sampling.policy") == t.policy
        assert parse_tracestate(arrived.trace_state)[0]["th"] == TH[t.policy]
        assert as_sent(arrived, span.trace_state) == span.SerializeToString(deterministic=True)
    assert not [key for key in got if key[0] == dropped.trace_id], "a span of the dropped trace was delivered"
    assert len(got) == want_spans

    bodies = {rec.body.string_value for _, _, rec in sc.backend.log_records()}
    want_bodies = {rec.body.string_value for t in three for rec in t.logs if t.policy or rec.severity_number >= 17}
    want_bodies |= {late_logs[t.trace_id].body.string_value for t in (kept_by_chance, kept_error)}
    want_bodies.add(late_error_log.body.string_value)
    assert bodies == want_bodies

    late_items = metrics.series("sidecar_tail_sampling_late_items_total", ("signal", "decision"))
    assert late_items == Counter({("traces", "sampled"): 2, ("traces", "not_sampled"): 1,
                                  ("logs", "sampled"): 2, ("logs", "not_sampled"): 1})


# --- 4. a flood of traces that never end --------------------------------------------------------------


def test_memory_stays_bounded_under_a_flood_of_never_ending_traces():
    num_traces, flood, per_request = 2_000, 50_000, 500
    payload = "x" * 2048
    work = Workload(seed=23)
    with Sidecar(decision_wait="120s", num_traces=num_traces) as sc:
        proc = psutil.Process(sc.process.pid)
        sender = sc.sender()
        first = work.trace("error")
        sender.send(spans_request([(first.service, s) for s in first.spans]))
        assert sc.backend.wait_for_items(Signal.TRACES, len(first.spans), timeout=10)
        start_rss = peak_rss = proc.memory_info().rss

        for _ in range(0, flood, per_request):
            items = []
            for _ in range(per_request):
                s = Span(trace_id=work._id(16), span_id=work._id(8), parent_span_id=work._id(8),  # root never comes
                         name="ml.forward", kind=Span.SPAN_KIND_INTERNAL, start_time_unix_nano=BASE_NS,
                         end_time_unix_nano=BASE_NS + 1_000_000)
                _attr(s, "prompt", payload)
                items.append((0, s))
            sender.send(spans_request(items))
            peak_rss = max(peak_rss, proc.memory_info().rss)

        metrics = sc.scrape()
        assert metrics.value("sidecar_tail_sampling_buffered_traces") == num_traces
        # the traces the full buffer pushed out were decided on what had arrived, not dropped unseen
        assert metrics.value("sidecar_tail_sampling_early_decisions_total") == flood - num_traces
        growth = (peak_rss - start_rss) / 2**20
        offered = flood * len(payload) / 2**20
        assert growth < 60, (f"RSS grew {growth:.0f} MiB (from {start_rss / 2**20:.0f} MiB) "
                             f"with ~{offered:.0f} MiB offered")  # unbounded, it grows ~170 MiB

        # still deciding: a finished trace arriving now is decided on its root and delivered
        kept_errors = metrics.value("sidecar_tail_sampling_traces_total", decision="sampled", policy="errors")
        last = work.trace("error")
        sender.send(spans_request([(last.service, s) for s in last.spans]))
        deadline = time.monotonic() + 10
        while sc.scrape().value("sidecar_tail_sampling_traces_total", decision="sampled",
                                policy="errors") < kept_errors + 1:
            assert time.monotonic() < deadline, "the finished error trace was not decided"
            time.sleep(0.05)
        assert sc.scrape().value("sidecar_tail_sampling_early_decisions_total") == flood - num_traces + 1
