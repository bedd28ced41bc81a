"""The syslog exporter: RFC 5424 formatting, and delivery to a real rsyslogd over UDP, TCP and TLS."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Status, StatusCode
from pydantic import ValidationError

from sidecar.component import Kind
from sidecar.config import ConfigError, parse_config
from sidecar.envelope import Envelope
from sidecar.exporters import _rfc5424 as rfc
from sidecar.exporters.syslog import FACTORY, SyslogExporterConfig
from sidecar.host import Host
from sidecar.registry import ComponentId, CreateSettings
from sidecar.signals import Signal
from sidecar.telemetry import SelfTelemetry
from sidecar.testing import SidecarProcess, free_port
from tests.sidecar.rsyslog import WHY_NOT, Rsyslog, available, parse_rfc5424

TRACE_ID = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")
SPAN_ID = bytes.fromhex("00f067aa0ba902b7")
T0 = 1_700_000_000_123_456_789
ROOT = Path(__file__).resolve().parents[2]


def logs_request(*records: dict, resource: dict | None = None) -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    rl = req.resource_logs.add()
    for k, v in ({"service.name": "resnet-server"} if resource is None else resource).items():
        rl.resource.attributes.add(key=k).value.string_value = v
    sl = rl.scope_logs.add()
    for r in records:
        rec = sl.log_records.add(time_unix_nano=T0, severity_number=r.get("severity", 9),
                                 trace_id=r.get("trace_id", TRACE_ID), span_id=r.get("span_id", SPAN_ID),
                                 event_name=r.get("event_name", ""))
        rec.body.string_value = r.get("body", "hello")
        for k, v in r.get("attrs", {}).items():
            rec.attributes.add(key=k).value.string_value = v
    return req


def formatter(**kw) -> rfc.Formatter:
    return rfc.Formatter(**{"facility": 16, "sd_id": "otel@32473", "max_message_bytes": 2048,
                            "default_hostname": "node-1", **kw})


# --- formatting: pure functions ---------------------------------------------------------------

@pytest.mark.parametrize("number, text, expected", [
    (1, "", rfc.DEBUG), (5, "", rfc.DEBUG), (8, "", rfc.DEBUG), (9, "", rfc.INFORMATIONAL),
    (10, "", rfc.NOTICE), (12, "", rfc.NOTICE), (13, "", rfc.WARNING), (16, "", rfc.WARNING),
    (17, "", rfc.ERROR), (20, "", rfc.ERROR), (21, "", rfc.CRITICAL), (24, "", rfc.CRITICAL),
    (0, "warning", rfc.WARNING), (0, "ERROR", rfc.ERROR), (0, "", rfc.INFORMATIONAL), (9, "ERROR", rfc.INFORMATIONAL),
])
def test_severity_follows_the_otel_severity_number(number, text, expected):
    assert rfc.severity(number, text) == expected


def test_param_values_are_escaped_and_names_follow_sd_name_rules():
    assert rfc.escape_param_value('a"b\\c]d') == 'a\\"b\\\\c\\]d'
    assert rfc.sd_name("http.route") == "http.route"
    assert rfc.sd_name('a b=c]d"e') == "a_b_c_d_e"
    assert rfc.sd_name("é" + "x" * 40) == "_" + "x" * 31
    assert rfc.sd_name("") == "_"


def test_a_log_record_becomes_one_well_formed_message():
    req = logs_request({"severity": 17, "body": 'model said "no" ] \\ — ünïcode', "event_name": "inference.failed",
                        "attrs": {"request.id": 'req-"42"]', "latency_ms": "12.5", "user.email": "a@b.c"}},
                       resource={"service.name": "resnet server", "host.name": "pod-7", "process.pid": "4242",
                                 "ml.model.id": "resnet50", "ml.model.version": "v3"})
    [m] = formatter(attributes=("latency_ms",)).log_messages(req)
    got = parse_rfc5424(m.data)
    assert (got.facility, got.severity) == (16, rfc.ERROR)
    assert got.timestamp == "2023-11-14T22:13:20.123456Z"
    assert (got.hostname, got.app_name, got.procid, got.msgid) == ("pod-7", "resnet_server", "4242", "inference.failed")
    assert got.sd == {"otel@32473": {"trace_id": TRACE_ID.hex(), "span_id": SPAN_ID.hex(), "request_id": 'req-"42"]',
                                     "model_id": "resnet50", "model_version": "v3", "latency_ms": "12.5"}}
    assert got.bom and got.msg == 'model said "no" ] \\ — ünïcode'
    assert not m.truncated


def test_no_ids_no_time_no_body_still_well_formed():
    req = logs_request({"trace_id": b"", "span_id": b"", "body": ""}, resource={})
    req.resource_logs[0].scope_logs[0].log_records[0].time_unix_nano = 0
    [m] = formatter().log_messages(req)
    assert m.data == b"<134>1 - node-1 - - log -"
    got = parse_rfc5424(m.data)
    assert got.sd == {} and got.msg == ""


def test_structured_bodies_are_written_as_json():
    req = logs_request({})
    body = req.resource_logs[0].scope_logs[0].log_records[0].body
    kv = body.kvlist_value.values.add(key="latency_ms")
    kv.value.double_value = 12.5
    body.kvlist_value.values.add(key="ok").value.bool_value = True
    [m] = formatter().log_messages(req)
    assert parse_rfc5424(m.data).msg == '{"latency_ms":12.5,"ok":true}'


def test_long_messages_keep_the_ids_and_are_cut_at_a_character_boundary():
    req = logs_request({"body": "é" * 5000, "attrs": {"request.id": "r-1", "note": "n" * 2000}})
    [m] = formatter(max_message_bytes=1024, attributes=("note",)).log_messages(req)
    assert len(m.data) <= 1024 and m.truncated
    got = parse_rfc5424(m.data)  # still valid UTF-8: no half character at the end
    assert got.sd["otel@32473"]["trace_id"] == TRACE_ID.hex() and got.sd["otel@32473"]["request_id"] == "r-1"
    assert len(got.sd["otel@32473"]["note"].encode()) == rfc.MAX_PARAM_VALUE_BYTES
    assert got.msg and set(got.msg) == {"é"}
    assert len(m.data) >= 1022  # as much of MSG as fits


def test_params_that_do_not_fit_are_left_out_and_the_rest_stays_valid():
    big = {f"k{i}": "v" * 250 for i in range(10)}
    req = logs_request({"attrs": big, "body": "x"})
    [m] = formatter(max_message_bytes=1024, attributes=tuple(big)).log_messages(req)
    got = parse_rfc5424(m.data)
    assert len(m.data) <= 1024 and m.truncated
    assert "trace_id" in got.sd["otel@32473"] and 0 < len(got.sd["otel@32473"]) < 2 + 10


def test_header_fields_are_made_printable_ascii():
    req = logs_request({}, resource={"service.name": "modèle de prod " + "x" * 60, "host.name": "h ost"})
    [m] = formatter().log_messages(req)
    got = parse_rfc5424(m.data)
    assert got.app_name == "mod_le_de_prod_" + "x" * 33 and got.hostname == "h_ost"
    [m] = formatter(app_name="classifier", hostname="gpu-3").log_messages(req)
    assert (parse_rfc5424(m.data).app_name, parse_rfc5424(m.data).hostname) == ("classifier", "gpu-3")


def spans_request() -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "resnet-server"
    ss = rs.scope_spans.add()
    for i, code in enumerate((1, 2, 0)):
        s = ss.spans.add(trace_id=TRACE_ID, span_id=bytes([i + 1]) * 8, parent_span_id=SPAN_ID, name=f"ml.forward {i}",
                         start_time_unix_nano=T0, end_time_unix_nano=T0 + 12_345_678)
        s.status.code = code
        if code == 2:
            s.status.message = "CUDA out of memory"
        s.attributes.add(key="ml.model.id").value.string_value = "resnet50"
    return req


@pytest.mark.parametrize("include, sent, skipped", [(False, [], 3), ("errors", ["ml.forward 1"], 2),
                                                    ("all", ["ml.forward 0", "ml.forward 1", "ml.forward 2"], 0)])
def test_span_summaries_for_errors_or_all(include, sent, skipped):
    msgs, n_skipped = formatter(include_spans=include).span_messages(spans_request())
    assert n_skipped == skipped
    got = [parse_rfc5424(m.data) for m in msgs]
    assert [g.sd["otel@32473"]["name"] for g in got] == sent
    for g in got:
        sd = g.sd["otel@32473"]
        assert g.msgid == "span" and sd["trace_id"] == TRACE_ID.hex() and sd["model_id"] == "resnet50"
        assert sd["duration_ms"] == "12.346" and sd["parent_span_id"] == SPAN_ID.hex()
        if sd["status"] == "ERROR":
            assert g.severity == rfc.ERROR and g.msg == "span 'ml.forward 1' 12.346 ms status=ERROR: CUDA out of memory"
        else:
            assert g.severity == rfc.INFORMATIONAL


def test_octet_counting_frame():
    assert rfc.frame("é".encode()) == b"2 \xc3\xa9"


# --- config -----------------------------------------------------------------------------------

@pytest.mark.parametrize("body, problem", [
    ({}, "endpoint"),
    ({"endpoint": "syslog.local"}, "host:port"),
    ({"endpoint": "h:514", "network": "quic"}, "network"),
    ({"endpoint": "h:514", "facility": "local9"}, "unknown facility"),
    ({"endpoint": "h:514", "facility": 24}, "unknown facility"),
    ({"endpoint": "h:514", "structured_data_id": "otel"}, "private enterprise number"),
    ({"endpoint": "h:514", "structured_data_id": "ot el@1"}, "private enterprise number"),
    ({"endpoint": "h:514", "app_name": "my app"}, "printable ASCII"),
    ({"endpoint": "h:514", "network": "udp", "max_message_bytes": 100000}, "65507"),
    ({"endpoint": "h:514", "max_message_bytes": 100}, "max_message_bytes"),
    ({"endpoint": "h:514", "include_spans": "some"}, "include_spans"),
    ({"endpoint": "h:514", "tls": {"ca_file": "ca.pem"}}, "only used with network: tls"),
    ({"endpoint": "h:6514", "network": "tls", "tls": {"cert_file": "c.pem"}}, "key_file"),
    ({"endpoint": "h:514", "severity": "error"}, "severity"),
])
def test_config_errors(body, problem):
    with pytest.raises(ValidationError) as e:
        SyslogExporterConfig.model_validate(body)
    assert problem in str(e.value)


def test_config_in_a_sidecar_file_names_the_yaml_path_and_refuses_metrics():
    text = """
receivers: {otlp: {protocols: {http: {endpoint: 127.0.0.1:4318}}}}
exporters:
  syslog: {endpoint: "127.0.0.1:514", facility: local12}
  syslog/ok: {endpoint: "127.0.0.1:514", network: udp, include_spans: false, facility: 3}
service:
  pipelines:
    logs: {receivers: [otlp], exporters: [syslog/ok]}
    metrics: {receivers: [otlp], exporters: [syslog/ok]}
"""
    with pytest.raises(ConfigError) as e:
        parse_config(text)
    problems = "\n".join(e.value.problems)
    assert "exporters.syslog.facility" in problems
    assert "does not support metrics" in problems


# --- delivery to a real rsyslogd --------------------------------------------------------------


@pytest.fixture(scope="module")
def rsyslog(tmp_path_factory):
    if not available():
        pytest.skip(WHY_NOT)
    server = Rsyslog(tmp_path_factory.mktemp("rsyslog")).start()
    yield server
    server.stop()


def exporter(endpoint: str, network: str, **extra):
    tel = SelfTelemetry()
    cfg = SyslogExporterConfig.model_validate({
        "endpoint": endpoint, "network": network, "timeout": "2s",
        "retry_on_failure": {"initial_interval": "50ms", "max_interval": "200ms", "max_elapsed_time": "30s"},
        **extra})
    comp = tel.component("exporter", "syslog")
    exp = FACTORY.create(CreateSettings(ComponentId("syslog"), Kind.EXPORTER, comp), cfg, None)
    exp.start(Host(tel))
    return exp, comp, tel


def wait_for(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def received_with(rsyslog, marker: str, n: int) -> list[dict]:
    got = rsyslog.wait_for(lambda rs: sum(marker in r["msg"] for r in rs) >= n)
    return [r for r in got if marker in r["msg"]]


def check_received(r: dict) -> rfc.Message:
    """rsyslog parsed it as RFC 5424 and so does the strict reader, and both see the same structured data."""
    assert r["version"] == "1", r
    got = parse_rfc5424(r["raw"].replace("#012", "\n").encode("utf-8"))
    assert r["parsed_sd"] == got.sd and (r["msgid"], r["app"], r["host"]) == (got.msgid, got.app_name, got.hostname)
    return got


@pytest.mark.parametrize("network", ["udp", "tcp", "tls"])
def test_rsyslog_receives_well_formed_messages(rsyslog, network):
    if network == "tls" and not rsyslog.tls_port:
        pytest.skip("rsyslog's gtls driver or the openssl CLI is not installed")
    port = {"udp": rsyslog.udp_port, "tcp": rsyslog.tcp_port, "tls": rsyslog.tls_port}[network]
    tls = {"tls": {"ca_file": str(rsyslog.ca_file), "server_name_override": "localhost"}} if network == "tls" else {}
    exp, tel, _ = exporter(f"127.0.0.1:{port}", network, facility="local4", attributes=["latency_ms"], **tls)
    marker = f"via-{network}"
    try:
        for i in range(3):
            exp.consume(Envelope(Signal.LOGS, logs_request(
                {"severity": 13, "body": f"{marker} {i}: line one\nline two", "attrs": {"request.id": f"r{i}"}},
                {"severity": 17, "body": f"{marker} {i}: failed ] \"quoted\"", "attrs": {"latency_ms": "12.5"}})))
        got = received_with(rsyslog, marker, 6)
    finally:
        exp.shutdown(time.monotonic() + 5)
    assert {r["input"] for r in got} == {network}
    parsed = [check_received(r) for r in got]
    assert all(p.sd["otel@32473"]["trace_id"] == TRACE_ID.hex() and p.bom and p.facility == 20 for p in parsed)
    assert sorted(p.msg for p in parsed if p.severity == rfc.WARNING) == \
        [f"{marker} {i}: line one\nline two" for i in range(3)]  # one message each: framing kept the newline inside
    assert {p.sd["otel@32473"].get("latency_ms") for p in parsed if p.severity == rfc.ERROR} == {"12.5"}
    assert tel.value("exported", Signal.LOGS) == 6


def test_tcp_reconnects_after_rsyslog_restarts(rsyslog):
    exp, tel, _ = exporter(f"127.0.0.1:{rsyslog.tcp_port}", "tcp")
    try:
        exp.consume(Envelope(Signal.LOGS, logs_request({"body": "before restart"})))
        received_with(rsyslog, "before restart", 1)
        rsyslog.stop()
        exp.consume(Envelope(Signal.LOGS, logs_request({"body": "during outage"})))
        wait_for(lambda: tel.value("retried", Signal.LOGS) >= 1)  # refused while down: retried, not lost
        rsyslog.start()
        exp.consume(Envelope(Signal.LOGS, logs_request({"body": "after restart"})))
        got = received_with(rsyslog, "restart", 2) + received_with(rsyslog, "during outage", 1)
    finally:
        exp.shutdown(time.monotonic() + 5)
    assert {r["msg"].lstrip("\ufeff") for r in got} == {"before restart", "after restart", "during outage"}
    assert tel.value("exported", Signal.LOGS) == 3


def test_untrusted_server_certificate_is_permanent(rsyslog):
    if not rsyslog.tls_port:
        pytest.skip("rsyslog's gtls driver or the openssl CLI is not installed")
    exp, tel, _ = exporter(f"127.0.0.1:{rsyslog.tls_port}", "tls", tls={"server_name_override": "localhost"})
    try:
        exp.consume(Envelope(Signal.LOGS, logs_request({"body": "self-signed, not trusted"})))
        wait_for(lambda: tel.value("dropped", Signal.LOGS, "permanent_error", "false") == 1)
    finally:
        exp.shutdown(time.monotonic() + 5)
    assert tel.value("retried", Signal.LOGS) == 0
    exp, tel, _ = exporter(f"127.0.0.1:{rsyslog.tls_port}", "tls", tls={"insecure_skip_verify": True})
    try:
        exp.consume(Envelope(Signal.LOGS, logs_request({"body": "self-signed, not checked"})))
        received_with(rsyslog, "self-signed, not checked", 1)
    finally:
        exp.shutdown(time.monotonic() + 5)


def test_mutual_tls_sends_the_client_certificate_and_a_refusal_is_not_counted_as_delivered(rsyslog):
    if not rsyslog.tls_port:
        pytest.skip("rsyslog's gtls driver or the openssl CLI is not installed")
    endpoint = f"127.0.0.1:{rsyslog.mtls_port}"
    tls = {"ca_file": str(rsyslog.ca_file), "server_name_override": "localhost"}
    exp, tel, _ = exporter(endpoint, "tls", tls={**tls, "cert_file": str(rsyslog.client_cert),
                                                 "key_file": str(rsyslog.client_key)})
    try:
        exp.consume(Envelope(Signal.LOGS, logs_request({"body": "with a client certificate"})))
        [r] = received_with(rsyslog, "with a client certificate", 1)
    finally:
        exp.shutdown(time.monotonic() + 5)
    assert r["input"] == "mtls" and tel.value("exported", Signal.LOGS) == 1
    # without one, rsyslog closes the connection after the (TLS 1.3) handshake: dropped as permanent, not "exported"
    exp, tel, _ = exporter(endpoint, "tls", tls=tls)
    try:
        exp.consume(Envelope(Signal.LOGS, logs_request({"body": "without a client certificate"})))
        wait_for(lambda: tel.value("dropped", Signal.LOGS, "permanent_error", "false") == 1)
    finally:
        exp.shutdown(time.monotonic() + 5)
    assert tel.value("exported", Signal.LOGS) == 0


def test_tls_session_tickets_do_not_look_like_a_closed_connection(rsyslog):
    """An OpenSSL server sends TLS 1.3 session tickets after the handshake (rsyslog's gtls does not):
    the connection stays in use instead of being reopened for every request."""
    if not rsyslog.tls_port:
        pytest.skip("the openssl CLI is not installed")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(rsyslog.ca_file, rsyslog.key_file)
    listener = socket.create_server(("127.0.0.1", 0))
    connections, received = [], bytearray()

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with ctx.wrap_socket(conn, server_side=True) as tls:
                connections.append(tls.version())
                while chunk := tls.recv(65536):
                    received.extend(chunk)

    threading.Thread(target=serve, daemon=True).start()
    exp, tel, _ = exporter(f"127.0.0.1:{listener.getsockname()[1]}", "tls",
                           tls={"ca_file": str(rsyslog.ca_file), "server_name_override": "localhost"},
                           sending_queue={"num_consumers": 1})
    try:
        for i in range(3):
            exp.consume(Envelope(Signal.LOGS, logs_request({"body": f"ticket {i}"})))
            wait_for(lambda: received.count(b"ticket") == i + 1)
    finally:
        exp.shutdown(time.monotonic() + 5)
        listener.close()
    assert connections == ["TLSv1.3"] and tel.value("exported", Signal.LOGS) == 3


def test_missing_ca_file_fails_at_start_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"exporters.syslog.tls.ca_file: .*nope.pem"):
        exporter("127.0.0.1:6514", "tls", tls={"ca_file": str(tmp_path / "nope.pem")})


def test_oversized_message_arrives_truncated_over_udp(rsyslog):
    exp, _, tel = exporter(f"127.0.0.1:{rsyslog.udp_port}", "udp", max_message_bytes=1500)
    try:
        exp.consume(Envelope(Signal.LOGS, logs_request({"body": "oversized " + "x" * 5000})))
        [r] = received_with(rsyslog, "oversized", 1)
    finally:
        exp.shutdown(time.monotonic() + 5)
    assert len(r["raw"].encode()) <= 1500
    check_received(r)
    assert tel.registry.get_sample_value("sidecar_syslog_messages_truncated_total", {"component": "syslog"}) == 1


def test_filtered_spans_are_counted_as_intended_drops(rsyslog):
    exp, tel, _ = exporter(f"127.0.0.1:{rsyslog.tcp_port}", "tcp", include_spans="errors")
    try:
        exp.consume(Envelope(Signal.TRACES, spans_request()))
        [r] = received_with(rsyslog, "CUDA out of memory", 1)
        wait_for(lambda: tel.value("exported", Signal.TRACES) == 1)
    finally:
        exp.shutdown(time.monotonic() + 5)
    assert check_received(r).sd["otel@32473"]["status"] == "ERROR"
    assert tel.value("dropped", Signal.TRACES, "filtered", "true") == 2


# --- the whole path: app logging -> OTel SDK -> sidecar process -> rsyslogd -------------------

@contextlib.contextmanager
def handler_app(http_port: int):
    """A TorchServe-style handler's logging: its logger with its own custom handler, the bridge beside it,
    the real OTel SDK exporting OTLP/HTTP to the sidecar. Yields (logger, tracer, what the own handler wrote)."""
    from instrumentation import LoggingBridge

    resource = Resource.create({"service.name": "torchserve-resnet", "process.pid": str(os.getpid())})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(SimpleSpanProcessor(
        OTLPSpanExporter(endpoint=f"http://127.0.0.1:{http_port}/v1/traces")))
    logger_provider = LoggerProvider(resource=resource)
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(
        OTLPLogExporter(endpoint=f"http://127.0.0.1:{http_port}/v1/logs")))
    own_output = io.StringIO()
    log = logging.getLogger("tests.syslog.handler")
    log.setLevel(logging.INFO)
    log.propagate = False
    own, bridge = logging.StreamHandler(own_output), LoggingBridge(logger_provider=logger_provider)
    log.addHandler(own)
    log.addHandler(bridge)
    try:
        yield log, tracer_provider.get_tracer("tests.syslog"), own_output
    finally:
        log.removeHandler(own)
        log.removeHandler(bridge)
        logger_provider.shutdown()
        tracer_provider.shutdown()


def handle_one_request(log, tracer, request_id: str, fail: str) -> str:
    """What TracingHandler.handle sets up around a handler's code; returns the trace id."""
    from instrumentation import RequestContext, request_context

    ctx = RequestContext(request_id=request_id)
    ctx.model_id, ctx.model_version = "resnet50", "v3"
    with request_context(ctx), tracer.start_as_current_span("torchserve.handle resnet50") as span:
        log.info("e2e inference done", extra={"latency_ms": 12.5})
        log.error("e2e inference failed: out of memory")
        span.set_status(Status(StatusCode.ERROR, fail))
    return format(span.get_span_context().trace_id, "032x")


def check_handler_messages(got: list[dict], trace_id: str, request_id: str) -> None:
    for r in got:
        p = check_received(r)
        sd = p.sd["otel@32473"]
        assert sd["trace_id"] == trace_id and sd["request_id"] == request_id
        assert (sd["model_id"], sd["model_version"]) == ("resnet50", "v3")
        assert p.app_name == "torchserve-resnet" and p.procid == str(os.getpid())
        if "e2e inference done" in p.msg:
            assert p.severity == rfc.INFORMATIONAL and sd["latency_ms"] == "12.5"
        else:
            assert p.severity == rfc.ERROR


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_app_logs_flow_through_the_sidecar_to_rsyslog_over_each_transport(rsyslog, tmp_path):
    http, metrics = free_port(), free_port()
    tls_exporter = (f"""
  syslog/tls:
    endpoint: 127.0.0.1:{rsyslog.tls_port}
    network: tls
    tls: {{ca_file: {rsyslog.ca_file}, server_name_override: localhost}}
    attributes: [latency_ms]""" if rsyslog.tls_port else "")
    config = f"""
receivers:
  otlp: {{protocols: {{http: {{endpoint: 127.0.0.1:{http}}}}}}}
processors:
  batch: {{timeout: 50ms}}
exporters:
  syslog/udp: {{endpoint: "127.0.0.1:{rsyslog.udp_port}", network: udp, attributes: [latency_ms]}}
  syslog/tcp: {{endpoint: "127.0.0.1:{rsyslog.tcp_port}", network: tcp, facility: local0,
               attributes: [latency_ms], include_spans: errors}}{tls_exporter}
service:
  telemetry: {{metrics: {{address: "127.0.0.1:{metrics}"}}}}
  pipelines:
    logs: {{receivers: [otlp], processors: [batch], exporters: [syslog/udp, syslog/tcp{", syslog/tls" if tls_exporter else ""}]}}
    traces: {{receivers: [otlp], processors: [batch], exporters: [syslog/tcp]}}
"""
    n_inputs = 3 if tls_exporter else 2
    with handler_app(http) as (log, tracer, own_output), SidecarProcess(config, workdir=tmp_path / "sidecar"):
        trace_id = handle_one_request(log, tracer, "req-e2e-1", "e2e OOM")
        got = rsyslog.wait_for(lambda rs: sum("e2e inference" in r["msg"] for r in rs) >= 2 * n_inputs
                               and any("e2e OOM" in r["msg"] for r in rs))
    assert "e2e inference done" in own_output.getvalue()  # the app's own handler still gets its records
    logs = [r for r in got if "e2e inference" in r["msg"]]
    assert sorted(r["input"] for r in logs) == sorted(["udp", "tcp", "tls"][:n_inputs] * 2)
    check_handler_messages(logs, trace_id, "req-e2e-1")
    [span_msg] = [r for r in got if "e2e OOM" in r["msg"]]
    sd = check_received(span_msg).sd["otel@32473"]
    assert sd["trace_id"] == trace_id and sd["status"] == "ERROR" and sd["name"] == "torchserve.handle resnet50"


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_the_shipped_syslog_config_delivers(rsyslog, tmp_path):
    """collector-config/sidecar-syslog.yaml (the README's example) as shipped, pointed at this rsyslogd."""
    ports = {k: free_port() for k in ("grpc", "http", "health", "metrics")}
    env = {"SYSLOG_ENDPOINT": f"127.0.0.1:{rsyslog.tcp_port}", "SIDECAR_FILE_EXPORT_DIR": str(tmp_path / "files"),
           "SIDECAR_OTLP_GRPC_ENDPOINT": f"127.0.0.1:{ports['grpc']}",
           "SIDECAR_OTLP_HTTP_ENDPOINT": f"127.0.0.1:{ports['http']}",
           "SIDECAR_HEALTH_ENDPOINT": f"127.0.0.1:{ports['health']}",
           "SIDECAR_METRICS_ENDPOINT": f"127.0.0.1:{ports['metrics']}"}
    config = (ROOT / "collector-config" / "sidecar-syslog.yaml").read_text()
    with handler_app(ports["http"]) as (log, tracer, _), SidecarProcess(config, workdir=tmp_path / "sc", env=env):
        trace_id = handle_one_request(log, tracer, "req-shipped", "shipped OOM")
        got = rsyslog.wait_for(lambda rs: sum(trace_id in r["sd"] for r in rs) >= 3)
    mine = [r for r in got if trace_id in r["sd"]]
    check_handler_messages([r for r in mine if "e2e inference" in r["msg"]], trace_id, "req-shipped")
    assert sorted(r["msgid"] for r in mine) == ["log", "log", "span"] and {r["facility"] for r in mine} == {"16"}
