"""The otlp receiver's limits a user can set, and how it answers, counts and logs what clients get wrong."""

from __future__ import annotations

import gzip
import logging
import time

import grpc
import pytest
import urllib3
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidecar.component import Kind
from sidecar.config import ComponentId, ConfigError, parse_config
from sidecar.pipeline import Edge
from sidecar.receivers.otlp import FACTORY, OTLPReceiverConfig
from sidecar.registry import CreateSettings
from sidecar.signals import Signal
from sidecar.telemetry import SelfTelemetry
from sidecar.testing import free_port

TRACE_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
PROTOBUF = {"Content-Type": "application/x-protobuf"}


class Broken:
    """A next stage with a bug: every request makes it raise."""

    def consume(self, envelope) -> None:
        raise KeyError("a bug downstream")


def traces(n: int = 2) -> bytes:
    req = ExportTraceServiceRequest()
    ss = req.resource_spans.add().scope_spans.add()
    for i in range(n):
        ss.spans.add(trace_id=b"\1" * 16, span_id=(i + 1).to_bytes(8, "big"), name="predict")
    return req.SerializeToString()


@pytest.fixture
def telemetry():
    return SelfTelemetry()


def start(telemetry: SelfTelemetry, http: dict | None = None, next_consumer=None):
    from sidecar.testing import CollectingConsumer

    cid = ComponentId("otlp", "")
    settings = CreateSettings(id=cid, kind=Kind.RECEIVER, telemetry=telemetry.component("receiver", str(cid)))
    cfg = OTLPReceiverConfig.model_validate({"protocols": {
        "grpc": {"endpoint": f"127.0.0.1:{free_port()}"},
        "http": {"endpoint": f"127.0.0.1:{free_port()}", **(http or {})}}})
    rec = FACTORY.create(settings, cfg, Edge(next_consumer or CollectingConsumer(), settings.telemetry))
    rec.start(None)
    return rec


def refused(telemetry: SelfTelemetry, protocol: str, reason: str) -> float:
    return telemetry.registry.get_sample_value("sidecar_receiver_requests_refused_total",
                                               {"component": "otlp", "protocol": protocol, "reason": reason}) or 0.0


def post(rec, body: bytes, headers=PROTOBUF):
    pool = urllib3.PoolManager(retries=False, timeout=10)
    return pool.request("POST", f"http://127.0.0.1:{rec.http_port}/v1/traces", body=body, headers=headers)


# --- config -------------------------------------------------------------------------------------------


def test_limits_have_safe_defaults():
    http = OTLPReceiverConfig.model_validate({"protocols": {"http": None}}).protocols.http
    assert (http.max_connections, http.read_header_timeout, http.read_timeout, http.idle_timeout) == (512, 10, 30, 60)
    assert (http.max_decompressed_body_size, http.max_gzip_members) == (None, 64)


def test_a_bad_limit_is_named_by_its_yaml_path():
    text = """
receivers:
  otlp:
    protocols:
      http: {read_timeout: 0s, max_connections: 0}
exporters:
  debug:
service:
  pipelines:
    traces: {receivers: [otlp], exporters: [debug]}
"""
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    problems = "\n".join(err.value.problems)
    assert "receivers.otlp.protocols.http.read_timeout: " in problems and "must be > 0" in problems
    assert "receivers.otlp.protocols.http.max_connections: " in problems


# --- decompression ------------------------------------------------------------------------------------


def test_decompressed_size_and_gzip_members_are_the_configured_limits(telemetry):
    rec = start(telemetry, {"max_request_body_size": 1 << 20, "max_decompressed_body_size": 4096,
                            "max_gzip_members": 2})
    try:
        gz = {**PROTOBUF, "Content-Encoding": "gzip"}
        assert post(rec, gzip.compress(traces(2)), gz).status == 200
        assert post(rec, gzip.compress(b"\0" * 5000), gz).status == 413  # 5 kB inflated > 4096
        three = gzip.compress(traces(1)) * 3  # three members, each a valid request on its own
        r = post(rec, three, gz)
        assert r.status == 400 and b"more than 2 gzip members" in r.data
        assert post(rec, gzip.compress(traces(1)) * 2, gz).status == 200
        assert refused(telemetry, "http", "too_large") == 1
        assert refused(telemetry, "http", "invalid") == 1
    finally:
        rec.shutdown(time.monotonic() + 5)


# --- client errors: 400 / INVALID_ARGUMENT, counted, one log line now and then ------------------------


GARBAGE = [b"\xff" * 7, b"\x0a\x05\x12\x03\x0a", b"\x0a" * 200, b"\x08\x96"]


def test_malformed_requests_are_invalid_argument_counted_and_logged_once_without_traceback(telemetry, caplog):
    rec = start(telemetry)
    channel = grpc.insecure_channel(f"127.0.0.1:{rec.grpc_port}")
    export = channel.unary_unary(TRACE_EXPORT, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        with caplog.at_level(logging.INFO, logger="sidecar.receivers.otlp"):
            for _ in range(10):
                for body in GARBAGE:
                    with pytest.raises(grpc.RpcError) as err:
                        export(body, timeout=10)
                    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                    assert post(rec, body).status == 400
        assert refused(telemetry, "grpc", "invalid") == refused(telemetry, "http", "invalid") == 10 * len(GARBAGE)
        lines = [r for r in caplog.records if r.name == "sidecar.receivers.otlp"]
        assert len(lines) == 2, [r.getMessage() for r in lines]  # one per (protocol, reason) in 10 s
        assert all(not r.exc_info and "\n" not in r.getMessage() for r in lines)
        assert "refused an OTLP/gRPC request (invalid, INVALID_ARGUMENT)" in "".join(r.getMessage() for r in lines)
    finally:
        channel.close()
        rec.shutdown(time.monotonic() + 5)


def test_a_pipeline_bug_is_internal_and_its_traceback_is_not_logged_per_request(telemetry, caplog):
    rec = start(telemetry, next_consumer=Broken())
    try:
        with caplog.at_level(logging.INFO, logger="sidecar.receivers.otlp"):
            statuses = {post(rec, traces()).status for _ in range(20)}
        assert statuses == {500}
        assert refused(telemetry, "http", "internal") == 20
        lines = [r for r in caplog.records if r.name == "sidecar.receivers.otlp"]
        assert len(lines) == 1 and lines[0].exc_info is not None  # the bug's traceback, once
    finally:
        rec.shutdown(time.monotonic() + 5)


def test_an_oversized_grpc_message_is_refused_and_counted(telemetry):
    cid = ComponentId("otlp", "")
    settings = CreateSettings(id=cid, kind=Kind.RECEIVER, telemetry=telemetry.component("receiver", str(cid)))
    from sidecar.testing import CollectingConsumer

    sink = CollectingConsumer()
    rec = FACTORY.create(settings, OTLPReceiverConfig.model_validate(
        {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{free_port()}", "max_recv_msg_size_mib": 1}}}),
        Edge(sink, settings.telemetry))
    rec.start(None)
    channel = grpc.insecure_channel(f"127.0.0.1:{rec.grpc_port}")
    export = channel.unary_unary(TRACE_EXPORT, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        with pytest.raises(grpc.RpcError) as err:
            export(traces(30_000), timeout=10)  # ~1.1 MiB
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "max_recv_msg_size_mib" in err.value.details()
        assert refused(telemetry, "grpc", "too_large") == 1
        export(traces(2), timeout=10)
        assert sink.items[Signal.TRACES] == 2
    finally:
        channel.close()
        rec.shutdown(time.monotonic() + 5)
