"""The sidecar as users run it: a real process, the real OTel SDK in front, a real OTLP backend behind."""

from __future__ import annotations

import gzip
import json
import logging
import os
import signal
import threading
import time
import urllib.request

import grpc
import psutil
import pytest
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from sidecar.otlp_json import to_json
from sidecar.signals import Signal
from sidecar.testing import OTLPBackend, SidecarProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def forward_config(ports, backend_endpoint: str, *, processors: str = "[batch]", queue: str = "",
                   extensions: str = "", service_extensions: str = "[health_check]", extra_processors: str = "",
                   retry: str = "{initial_interval: 100ms, max_interval: 500ms, max_elapsed_time: 0}") -> str:
    return f"""
extensions:
  health_check: {{endpoint: 127.0.0.1:{ports.health}}}
{extensions}
receivers:
  otlp:
    protocols:
      grpc: {{endpoint: 127.0.0.1:{ports.grpc}}}
      http: {{endpoint: 127.0.0.1:{ports.http}}}
processors:
  batch: {{timeout: 100ms}}
{extra_processors}
exporters:
  otlp/backend:
    endpoint: {backend_endpoint}
    tls: {{insecure: true}}
    timeout: 2s
    retry_on_failure: {retry}
    {queue}
service:
  extensions: {service_extensions}
  telemetry:
    metrics: {{address: 127.0.0.1:{ports.metrics}}}
  shutdown_timeout: 10s
  pipelines:
    traces: {{receivers: [otlp], processors: {processors}, exporters: [otlp/backend]}}
    logs: {{receivers: [otlp], processors: {processors}, exporters: [otlp/backend]}}
    metrics: {{receivers: [otlp], processors: {processors}, exporters: [otlp/backend]}}
"""


def sdk_tracer(endpoint: str, *, http: bool = False):
    resource = Resource.create({"service.name": "resnet-server", "ml.model.id": "resnet50", "k8s.pod.name": "pod-1"})
    provider = TracerProvider(resource=resource)
    memory = InMemorySpanExporter()
    exporter = HTTPSpanExporter(endpoint=f"http://{endpoint}/v1/traces") if http else \
        OTLPSpanExporter(endpoint=endpoint, insecure=True)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return provider, memory


def emit_inference_traces(provider, n: int) -> None:
    tracer = provider.get_tracer("tests.e2e", "1.0")
    for i in range(n):
        with tracer.start_as_current_span("POST /predict", kind=SpanKind.SERVER, attributes={"http.route": "/predict",
                                                                               "request.id": f"req-{i}"}):
            with tracer.start_as_current_span("ml.forward resnet50", attributes={
                    "ml.model.id": "resnet50", "ml.model.version": "v3", "ml.batch_size": 8,
                    "ml.input.shapes": ["8x3x224x224"], "gen_ai.request.temperature": 0.7}) as span:
                span.add_event("tokens", {"count": i})
                if i % 5 == 0:
                    span.set_status(Status(StatusCode.ERROR, "CUDA OOM"))


def span_key(span) -> tuple:
    return (span.trace_id.hex() if isinstance(span.trace_id, bytes) else f"{span.trace_id:032x}",)


@pytest.mark.filterwarnings("ignore:.*LoggingHandler.*:DeprecationWarning")  # the SDK's own handler, as users have it
def test_sdk_grpc_and_http_traces_logs_metrics_arrive_intact(ports, backend):
    with SidecarProcess(forward_config(ports, backend.endpoint)) as sc:
        provider, memory = sdk_tracer(f"127.0.0.1:{ports.grpc}")
        emit_inference_traces(provider, 10)
        http_provider, http_memory = sdk_tracer(f"127.0.0.1:{ports.http}", http=True)
        emit_inference_traces(http_provider, 5)

        logger_provider = LoggerProvider(resource=Resource.create({"service.name": "resnet-server"}))
        logger_provider.add_log_record_processor(SimpleLogRecordProcessor(
            OTLPLogExporter(endpoint=f"127.0.0.1:{ports.grpc}", insecure=True)))
        log = logging.getLogger("e2e.app")
        log.propagate = False
        log.addHandler(LoggingHandler(logger_provider=logger_provider))
        log.setLevel(logging.INFO)
        tracer = provider.get_tracer("tests.e2e")
        with tracer.start_as_current_span("with-log") as span:
            log.warning("inference slow", extra={"model_id": "resnet50", "latency_ms": 1234})
            log_trace_id = span.get_span_context().trace_id

        reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=f"127.0.0.1:{ports.grpc}", insecure=True),
                                               export_interval_millis=60_000)
        meter_provider = MeterProvider(metric_readers=[reader], resource=Resource.create({"service.name": "m"}))
        meter_provider.get_meter("e2e").create_counter("inferences").add(7, {"model": "resnet50"})
        meter_provider.force_flush()

        sent = {(s.context.trace_id, s.context.span_id): s for s in memory.get_finished_spans() + http_memory.get_finished_spans()}
        assert backend.wait_for_items(Signal.TRACES, len(sent)), backend.items
        assert backend.wait_for_items(Signal.LOGS, 1)
        assert backend.wait_for_items(Signal.METRICS, 1)

        got = {(int.from_bytes(s.trace_id, "big"), int.from_bytes(s.span_id, "big")): (r, s) for r, _, s in backend.spans()}
        assert set(got) >= set(sent)
        for key, want in sent.items():
            resource, span = got[key]
            assert span.name == want.name
            parent = int.from_bytes(span.parent_span_id, "big") if span.parent_span_id else None
            assert parent == (want.parent.span_id if want.parent else None)
            attrs = {kv.key: kv.value for kv in span.attributes}
            for k, v in want.attributes.items():
                value = attrs[k]
                kind = value.WhichOneof("value")
                if kind == "array_value":
                    assert [x.string_value for x in value.array_value.values] == list(v)
                else:
                    assert getattr(value, kind) == v
            assert [e.name for e in span.events] == [e.name for e in want.events]
            assert span.status.code == want.status.status_code.value
            assert span.start_time_unix_nano == want.start_time and span.end_time_unix_nano == want.end_time
            res = {kv.key: kv.value.string_value for kv in resource.attributes}
            assert res["service.name"] == "resnet-server" and res["k8s.pod.name"] == "pod-1"

        (_, _, rec), = [x for x in backend.log_records() if x[2].body.string_value == "inference slow"]
        assert int.from_bytes(rec.trace_id, "big") == log_trace_id
        assert rec.severity_text == "WARN" or rec.severity_number == 13
        assert {kv.key for kv in rec.attributes} >= {"model_id", "latency_ms"}
        (_, _, metric), = [m for m in backend.metrics() if m[2].name == "inferences"]
        assert metric.sum.data_points[0].as_int == 7

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{ports.metrics}/metrics").read().decode()
        assert 'sidecar_items_exported_total{component="otlp/backend",kind="exporter",signal="traces"}' in metrics
        # where the CPU went: the receivers' handler pools are named, and the series add up to the process's CPU
        cpu = {s.labels.get("thread"): s.value for f in text_string_to_metric_families(metrics) for s in f.samples
               if s.name in ("sidecar_thread_cpu_seconds_total", "process_cpu_seconds_total")}
        assert {"otlp-grpc", "other", None} <= set(cpu)  # None: process_cpu_seconds_total
        assert abs(sum(v for k, v in cpu.items() if k is not None) - cpu[None]) < 0.1
        ready = urllib.request.urlopen(f"http://127.0.0.1:{ports.health}/readyz")
        assert ready.status == 200
        for p in (provider, http_provider, logger_provider, meter_provider):
            p.shutdown()


def _request_with_ids(seed: int, n_spans: int = 3) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "json-vs-proto"
    ss = rs.scope_spans.add()
    ss.scope.name = "manual"
    for i in range(n_spans):
        sp = ss.spans.add(trace_id=seed.to_bytes(16, "big"), span_id=(seed * 100 + i + 1).to_bytes(8, "big"),
                          name=f"op-{i}", kind=1, start_time_unix_nano=1_700_000_000_000_000_000 + i,
                          end_time_unix_nano=1_700_000_000_100_000_000 + i)
        if i:
            sp.parent_span_id = (seed * 100 + 1).to_bytes(8, "big")
        sp.attributes.add(key="ml.model.id").value.string_value = "bert"
        sp.events.add(name="first_token", time_unix_nano=1_700_000_000_050_000_000)
    return req


def test_json_with_hex_ids_arrives_identical_to_protobuf(ports, backend):
    with SidecarProcess(forward_config(ports, backend.endpoint)):
        req = _request_with_ids(7)
        url = f"http://127.0.0.1:{ports.http}/v1/traces"
        body = to_json(Signal.TRACES, req).encode()
        assert '"traceId":"00000000000000000000000000000007"' in body.decode()
        r = urllib.request.urlopen(urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}))
        assert r.status == 200 and r.headers["Content-Type"].startswith("application/json")
        zipped = gzip.compress(req.SerializeToString())
        r = urllib.request.urlopen(urllib.request.Request(url, data=zipped, headers={
            "Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"}))
        assert r.status == 200
        assert backend.wait_for_items(Signal.TRACES, 6)
        spans = [s.SerializeToString(deterministic=True) for _, _, s in backend.spans()]
        assert spans[:3] == spans[3:] == [s.SerializeToString(deterministic=True) for s in req.resource_spans[0].scope_spans[0].spans]


def _http_status(url: str, body: bytes, content_type: str) -> tuple[int, str]:
    try:
        r = urllib.request.urlopen(urllib.request.Request(url, data=body, headers={"Content-Type": content_type}))
        return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def test_malformed_input_gets_clear_errors_and_the_sidecar_keeps_serving(ports, backend):
    cfg = forward_config(ports, backend.endpoint).replace(
        f"grpc: {{endpoint: 127.0.0.1:{ports.grpc}}}", f"grpc: {{endpoint: 127.0.0.1:{ports.grpc}, max_recv_msg_size_mib: 1}}")
    with SidecarProcess(cfg) as sc:
        url = f"http://127.0.0.1:{ports.http}/v1/traces"
        good = _request_with_ids(1).SerializeToString()
        bad_ids = _request_with_ids(2)
        bad_ids.resource_spans[0].scope_spans[0].spans[1].trace_id = b"\x01" * 5
        cases = {
            "garbage": (b"\xff\xfe\x00garbage\x13\x37" * 10, "application/x-protobuf", 400),
            "wrong content type": (good, "text/plain", 415),
            "truncated protobuf": (good[: len(good) // 2], "application/x-protobuf", 400),
            "invalid json": (b'{"resourceSpans": [', "application/json", 400),
            "wrong-length hex id": (b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"abcd","spanId":"0102030405060708"}]}]}]}',
                                    "application/json", 400),
            "wrong-length binary id": (bad_ids.SerializeToString(), "application/x-protobuf", 400),
        }
        for name, (body, ctype, want) in cases.items():
            status, text = _http_status(url, body, ctype)
            assert status == want, (name, status, text)
            assert text, name
        status, text = _http_status(url, b"x" * (25 * 1024 * 1024), "application/x-protobuf")
        assert status == 413, text
        assert "trace_id" in _http_status(url, bad_ids.SerializeToString(), "application/x-protobuf")[1]

        channel = grpc.insecure_channel(f"127.0.0.1:{ports.grpc}")
        raw = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                                  request_serializer=lambda b: b, response_deserializer=lambda b: b)
        for body, code in ((b"\xff\xfe\x00garbage" * 10, grpc.StatusCode.INVALID_ARGUMENT),
                           (bad_ids.SerializeToString(), grpc.StatusCode.INVALID_ARGUMENT),
                           (b"\x0a" + b"\xff" * 20, None)):
            with pytest.raises(grpc.RpcError) as e:
                raw(body, timeout=5)
            if code is not None:
                assert e.value.code() == code, e.value
        big = _request_with_ids(3)
        big.resource_spans[0].scope_spans[0].spans[0].attributes.add(key="blob").value.string_value = "x" * (2 * 1024 * 1024)
        stub = trace_service_pb2_grpc.TraceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.Export(big, timeout=5)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        # still serving, on both protocols
        assert _http_status(url, good, "application/x-protobuf")[0] == 200
        stub.Export(_request_with_ids(4), timeout=5)
        assert backend.wait_for_items(Signal.TRACES, 6)
        assert sc.proc.poll() is None


def test_backend_outage_then_recovery_delivers_every_item_exactly(ports):
    backend = OTLPBackend()  # down at first
    with SidecarProcess(forward_config(ports, backend.endpoint)):
        stub = trace_service_pb2_grpc.TraceServiceStub(grpc.insecure_channel(f"127.0.0.1:{ports.grpc}"))
        sent = [_request_with_ids(seed) for seed in range(1, 41)]
        for req in sent:
            stub.Export(req, timeout=5)  # acknowledged while the backend is down
        time.sleep(1.0)
        assert backend.items[Signal.TRACES] == 0
        backend.start()
        try:
            assert backend.wait_for_items(Signal.TRACES, 120, timeout=30), backend.items
            got = sorted(s.SerializeToString(deterministic=True) for _, _, s in backend.spans())
            want = sorted(s.SerializeToString(deterministic=True) for r in sent for s in r.resource_spans[0].scope_spans[0].spans)
            assert got == want
        finally:
            backend.stop()


def test_one_backend_down_never_stalls_another(ports, backend):
    down = OTLPBackend()
    cfg = forward_config(ports, backend.endpoint).replace("exporters: [otlp/backend]", "exporters: [otlp/backend, otlp/down]")
    cfg = cfg.replace("service:\n", f"""  otlp/down:
    endpoint: {down.endpoint}
    tls: {{insecure: true}}
    retry_on_failure: {{initial_interval: 100ms, max_elapsed_time: 0}}
service:
""", 1)
    with SidecarProcess(cfg):
        stub = trace_service_pb2_grpc.TraceServiceStub(grpc.insecure_channel(f"127.0.0.1:{ports.grpc}"))
        for seed in range(1, 21):
            stub.Export(_request_with_ids(seed), timeout=5)
        assert backend.wait_for_items(Signal.TRACES, 60, timeout=10)


def _load(port: int, acked: list, stop: threading.Event, first_seed: int) -> None:
    stub = trace_service_pb2_grpc.TraceServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    seed = first_seed
    while not stop.is_set():
        req = _request_with_ids(seed, n_spans=5)
        try:
            stub.Export(req, timeout=5)
        except grpc.RpcError:
            return
        acked.append(seed)
        seed += 1


def test_kill_9_under_load_with_persistent_queue_loses_nothing_acknowledged(ports, tmp_path):
    backend = OTLPBackend()  # down during the load: everything sits in the persistent queue
    storage = tmp_path / "storage"
    cfg = forward_config(ports, backend.endpoint, processors="[]",
                         extensions=f"  file_storage: {{directory: {storage}}}",
                         service_extensions="[health_check, file_storage]",
                         queue="sending_queue: {storage: file_storage, queue_size: 100000}")
    workdir = tmp_path / "run"
    workdir.mkdir()
    sc = SidecarProcess(cfg, workdir=workdir).start()
    acked: list[int] = []
    stop = threading.Event()
    threads = [threading.Thread(target=_load, args=(ports.grpc, acked, stop, k * 1_000_000 + 1)) for k in range(1, 4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(acked) < 300 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(sc.pid, signal.SIGKILL)  # mid-flight
    sc.proc.wait(10)
    stop.set()
    for t in threads:
        t.join(10)
    assert len(acked) >= 300, len(acked)

    backend.start()
    try:
        sc2 = SidecarProcess(cfg, workdir=workdir).start()
        try:
            want = {(seed * 100 + i + 1) for seed in acked for i in range(5)}
            # wait for the acknowledged ids themselves, not for a count: a request written to disk whose
            # ack the kill cut off is delivered too (at least once), so a count can be reached early
            got: set[int] = set()
            deadline = time.monotonic() + 60
            while not want <= got and time.monotonic() < deadline:
                time.sleep(0.1)
                got = {int.from_bytes(s.span_id, "big") for _, _, s in backend.spans()}
            assert want <= got, f"{len(want - got)} acknowledged spans lost"
        finally:
            sc2.terminate()
    finally:
        backend.stop()


def test_sigterm_drains_the_pipeline(ports, backend):
    cfg = forward_config(ports, backend.endpoint).replace("batch: {timeout: 100ms}", "batch: {timeout: 30s, send_batch_size: 100000}")
    sc = SidecarProcess(cfg).start()
    stub = trace_service_pb2_grpc.TraceServiceStub(grpc.insecure_channel(f"127.0.0.1:{ports.grpc}"))
    for seed in range(1, 11):
        stub.Export(_request_with_ids(seed), timeout=5)
    assert backend.items[Signal.TRACES] == 0  # still in the batch
    assert sc.terminate(30) == 0
    assert backend.items[Signal.TRACES] == 30


def test_sigterm_with_backend_down_keeps_data_on_disk_for_the_next_start(ports, tmp_path):
    backend = OTLPBackend()
    storage = tmp_path / "storage"
    cfg = forward_config(ports, backend.endpoint, processors="[]",
                         extensions=f"  file_storage: {{directory: {storage}}}",
                         service_extensions="[health_check, file_storage]",
                         queue="sending_queue: {storage: file_storage}").replace("shutdown_timeout: 10s", "shutdown_timeout: 1s")
    sc = SidecarProcess(cfg, workdir=tmp_path).start()
    stub = trace_service_pb2_grpc.TraceServiceStub(grpc.insecure_channel(f"127.0.0.1:{ports.grpc}"))
    for seed in range(1, 11):
        stub.Export(_request_with_ids(seed), timeout=5)
    assert sc.terminate(30) == 0
    backend.start()
    try:
        with SidecarProcess(cfg, workdir=tmp_path):
            assert backend.wait_for_items(Signal.TRACES, 30, timeout=30)
    finally:
        backend.stop()


def test_memory_limiter_refuses_a_flood_with_retryable_codes_and_rss_stays_bounded(ports):
    backend = OTLPBackend()  # down: accepted data piles up in the queue until the limiter says stop
    cfg = forward_config(ports, backend.endpoint, processors="[memory_limiter]",
                         extra_processors="  memory_limiter: {check_interval: 100ms, limit_mib: 220, spike_limit_mib: 60}",
                         queue="sending_queue: {queue_size: 1000000}")
    with SidecarProcess(cfg) as sc:
        proc = psutil.Process(sc.pid)
        payload = _request_with_ids(5, n_spans=50)
        for sp in payload.resource_spans[0].scope_spans[0].spans:
            sp.attributes.add(key="prompt").value.string_value = "p" * 20_000  # ~1 MB per request
        body = payload.SerializeToString()
        codes: dict[str, int] = {}
        peak = 0
        lock = threading.Lock()

        def flood(n: int) -> None:
            nonlocal peak
            channel = grpc.insecure_channel(f"127.0.0.1:{ports.grpc}", options=[("grpc.max_send_message_length", 64 << 20)])
            raw = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                                      request_serializer=lambda b: b, response_deserializer=lambda b: b)
            for _ in range(n):
                try:
                    raw(body, timeout=10)
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                with lock:
                    codes[code] = codes.get(code, 0) + 1
                    peak = max(peak, proc.memory_info().rss)

        threads = [threading.Thread(target=flood, args=(250,)) for _ in range(4)]  # ~1 GB offered
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert codes.get("RESOURCE_EXHAUSTED", 0) > 0, codes
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}, codes
        assert peak < 350 * 1024 * 1024, f"peak RSS {peak / 2**20:.0f} MiB"
        assert sc.proc.poll() is None


def test_bad_config_fails_fast_naming_the_path(tmp_path):
    sc = SidecarProcess("receivers:\n  otlp:\n    protocols:\n      grcp: {}\nexporters:\n  debug: {}\n"
                        "service:\n  pipelines:\n    traces: {receivers: [otlp], exporters: [debug]}\n", workdir=tmp_path)
    with pytest.raises(RuntimeError) as e:
        sc.start()
    assert "receivers.otlp.protocols.grcp: unknown key" in str(e.value)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MiB tmpfs: a real full disk (needs root; skipped elsewhere)."""
    import subprocess

    where = tmp_path / "tiny-disk"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_full_disk_refuses_with_a_retryable_code_and_loses_nothing_accepted(ports, tiny_disk, tmp_path):
    backend = OTLPBackend()  # down: the persistent queue fills the disk
    cfg = forward_config(ports, backend.endpoint, processors="[]",
                         extensions=f"  file_storage: {{directory: {tiny_disk}}}",
                         service_extensions="[health_check, file_storage]",
                         queue="sending_queue: {storage: file_storage, queue_size: 100000}")
    with SidecarProcess(cfg, workdir=tmp_path / "run") as sc:
        stub = trace_service_pb2_grpc.TraceServiceStub(grpc.insecure_channel(f"127.0.0.1:{ports.grpc}"))
        acked, refusals = [], []
        for seed in range(1, 400):
            req = _request_with_ids(seed, n_spans=20)
            for sp in req.resource_spans[0].scope_spans[0].spans:
                sp.attributes.add(key="payload").value.string_value = "x" * 1000  # ~20 KB per request
            try:
                stub.Export(req, timeout=5)
                acked.append(seed)
            except grpc.RpcError as e:
                refusals.append((e.code(), e.details()))
                if len(refusals) >= 3:
                    break
        assert acked and refusals, (len(acked), refusals)
        assert all(code == grpc.StatusCode.UNAVAILABLE for code, _ in refusals), refusals
        assert "No space left" in refusals[0][1] or "disk" in refusals[0][1].lower(), refusals[0][1]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{ports.metrics}/metrics").read().decode()
        assert 'reason="disk_full"' in metrics
        assert sc.proc.poll() is None

        backend.start()
        try:
            want = {seed * 100 + i + 1 for seed in acked for i in range(20)}
            assert backend.wait_for_items(Signal.TRACES, len(want), timeout=60)
            assert {int.from_bytes(s.span_id, "big") for _, _, s in backend.spans()} >= want
            # the queue drained, the disk has room again: new data is accepted
            deadline = time.monotonic() + 10
            while True:
                try:
                    stub.Export(_request_with_ids(10_000), timeout=5)
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline, "still refusing after the queue drained"
                    time.sleep(0.2)
        finally:
            backend.stop()
