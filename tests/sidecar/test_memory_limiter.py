"""memory_limiter: refusing above the soft limit, accepting again below it, with an injected RSS reading."""

from __future__ import annotations

import time

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from sidecar.envelope import Envelope
from sidecar.component import Kind, Refused
from sidecar.config import ComponentId, ConfigError, parse_config
from sidecar.processors.memory_limiter import MemoryLimiter, MemoryLimiterConfig, read_rss, total_memory
from sidecar.registry import CreateSettings
from sidecar.signals import Signal
from sidecar.telemetry import SelfTelemetry
from sidecar.testing import CollectingConsumer, Counted

MIB = 1024 * 1024


class FakeMemory:
    """An RSS reading the test sets; ``release`` (gc + malloc_trim) may lower it by ``freed``."""

    def __init__(self, rss_mib: int = 50):
        self.rss = rss_mib * MIB
        self.freed = 0
        self.releases = 0

    def read(self) -> int:
        return self.rss

    def release(self) -> None:
        self.releases += 1
        self.rss -= self.freed


def spans(n: int) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    ss = req.resource_spans.add().scope_spans.add()
    for _ in range(n):
        ss.spans.append(Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="forward"))
    return req


def make(body: dict, memory: FakeMemory, total_mib: int | None = None):
    telemetry = SelfTelemetry()
    sink = CollectingConsumer()
    cid = ComponentId("memory_limiter")
    settings = CreateSettings(id=cid, kind=Kind.PROCESSOR, telemetry=telemetry.component("processor", str(cid)))
    limiter = MemoryLimiter(settings, MemoryLimiterConfig.model_validate(body), sink, rss_reader=memory.read,
                            release_memory=memory.release,
                            total_memory_bytes=None if total_mib is None else total_mib * MIB)
    return Counted(limiter, settings.telemetry), sink, telemetry  # behind the pipeline's counting edge


def test_passes_data_through_while_under_the_soft_limit():
    memory = FakeMemory(50)
    limiter, sink, _ = make({"limit_mib": 100}, memory)
    limiter.check()
    req = spans(3)
    limiter.consume(Envelope(Signal.TRACES, req))
    assert sink.requests == [(Signal.TRACES, req)]
    assert sink.requests[0][1] is req  # no copy
    assert memory.releases == 0


def test_refuses_above_the_soft_limit_and_recovers_below_it():
    memory = FakeMemory(50)
    limiter, sink, telemetry = make({"limit_mib": 100, "spike_limit_mib": 20, "check_interval": "2s"}, memory)
    assert limiter.soft_limit == 80 * MIB

    memory.rss = 85 * MIB  # over soft, under hard
    limiter.check()
    assert limiter.refusing
    assert memory.releases == 1  # tried to hand memory back before deciding
    with pytest.raises(Refused) as err:
        limiter.consume(Envelope(Signal.TRACES, spans(4)))
    assert err.value.reason == "memory_limit" and err.value.retryable
    assert err.value.retry_after == 2.0
    assert "85 MiB" in str(err.value)
    assert sink.requests == []
    assert limiter._edge.telemetry.value("refused", Signal.TRACES, "memory_limit") == 4
    assert telemetry.registry.get_sample_value("sidecar_memory_limiter_refusing", {"component": "memory_limiter"}) == 1
    assert telemetry.registry.get_sample_value("sidecar_memory_limiter_rss_bytes",
                                               {"component": "memory_limiter"}) == 85 * MIB

    memory.rss = 79 * MIB
    limiter.check()
    assert not limiter.refusing
    limiter.consume(Envelope(Signal.LOGS, ExportLogsServiceRequest()))
    assert len(sink.requests) == 1
    assert telemetry.registry.get_sample_value("sidecar_memory_limiter_refusing", {"component": "memory_limiter"}) == 0


def test_memory_handed_back_by_gc_avoids_refusing():
    memory = FakeMemory(90)
    memory.freed = 30 * MIB  # gc + malloc_trim bring RSS from 90 to 60 MiB
    limiter, _, _ = make({"limit_mib": 100}, memory)
    limiter.check()
    assert memory.releases == 1
    assert not limiter.refusing
    assert limiter.rss == 60 * MIB


def test_spike_defaults_to_a_fifth_of_the_limit():
    limiter, _, telemetry = make({"limit_mib": 500}, FakeMemory())
    assert limiter.limit == 500 * MIB and limiter.soft_limit == 400 * MIB
    assert telemetry.registry.get_sample_value("sidecar_memory_limiter_limit_bytes",
                                               {"component": "memory_limiter", "limit": "soft"}) == 400 * MIB


def test_percentages_of_the_container_limit():
    memory = FakeMemory(350)
    limiter, _, _ = make({"limit_percentage": 50, "spike_limit_percentage": 10}, memory, total_mib=1000)
    assert limiter.limit == 500 * MIB and limiter.soft_limit == 400 * MIB
    limiter.check()
    assert not limiter.refusing
    memory.rss = 401 * MIB
    limiter.check()
    assert limiter.refusing


def test_background_checks_start_with_an_immediate_reading():
    memory = FakeMemory(95)
    limiter, _, _ = make({"limit_mib": 100, "check_interval": "10ms"}, memory)
    limiter.start(None)
    try:
        assert limiter.refusing  # decided at start, before the first interval
        memory.rss = 10 * MIB
        deadline = time.monotonic() + 5
        while limiter.refusing and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not limiter.refusing  # the thread keeps checking
    finally:
        limiter.shutdown(time.monotonic() + 1)
    assert not limiter._ticker.running


@pytest.mark.parametrize("body, message", [
    ({}, "set exactly one of limit_mib or limit_percentage"),
    ({"limit_mib": 100, "limit_percentage": 80}, "set exactly one of limit_mib or limit_percentage"),
    ({"limit_mib": 100, "spike_limit_mib": 100}, "spike_limit_mib (100) must be less than limit_mib (100)"),
    ({"limit_percentage": 80, "spike_limit_mib": 10}, "spike_limit_mib goes with limit_mib"),
    ({"limit_mib": 100, "check_interval": 0}, "check_interval must be > 0"),
])
def test_config_errors(body, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MemoryLimiterConfig.model_validate(body)


def test_config_error_names_the_component_path():
    text = """
receivers:
  otlp:
    protocols:
      grpc:
processors:
  memory_limiter:
    check_interval: 1s
exporters:
  debug:
service:
  pipelines:
    traces:
      receivers: [otlp]
      processors: [memory_limiter]
      exporters: [debug]
"""
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    assert "processors.memory_limiter: set exactly one of limit_mib or limit_percentage" in err.value.problems


def test_reads_real_rss_and_cgroup_limits(tmp_path):
    import psutil

    # the cheap /proc/self/statm reading agrees with the OS's RSS, and follows an allocation
    assert read_rss() == pytest.approx(psutil.Process().memory_info().rss, rel=0.05)
    before = read_rss()
    block = bytearray(64 * MIB)
    block[::4096] = b"\x01" * (64 * MIB // 4096)  # write every page, so each is resident
    assert read_rss() - before >= 48 * MIB
    del block
    physical = total_memory(str(tmp_path / "nowhere"))
    assert physical > 0
    (tmp_path / "memory.max").write_text("268435456\n")
    assert total_memory(str(tmp_path)) == 256 * MIB
    (tmp_path / "memory.max").write_text("max\n")
    assert total_memory(str(tmp_path)) == physical
    (tmp_path / "memory.max").unlink()
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1 "unlimited"
    assert total_memory(str(tmp_path)) == physical
