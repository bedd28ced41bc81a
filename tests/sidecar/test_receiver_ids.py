"""The receiver's id check: each half of the wire scanner on the received bytes agrees with the check on the
parsed message (which the receiver uses for JSON input)."""

import random

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidecar import _wire_py
from sidecar.receivers.otlp import _check_logs, _check_traces

try:
    from sidecar import _wire as _c
except ImportError:  # pragma: no cover
    _c = None


@pytest.fixture(params=[pytest.param(_wire_py, id="python"), pytest.param(
    _c, id="c", marks=pytest.mark.skipif(_c is None, reason="the C extension is not built"))])
def wire(request):
    return request.param


def _random_traces(rng: random.Random) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    for _ in range(rng.randint(0, 3)):
        rs = req.resource_spans.add()
        rs.resource.attributes.add(key="service.name").value.string_value = "svc"
        for _ in range(rng.randint(0, 3)):
            ss = rs.scope_spans.add()
            for _ in range(rng.randint(0, 5)):
                sp = ss.spans.add(name="op", start_time_unix_nano=rng.getrandbits(63))
                sp.trace_id = rng.randbytes(rng.choice([16] * 20 + [0, 5, 15, 17]))
                sp.span_id = rng.randbytes(rng.choice([8] * 20 + [0, 7, 9]))
                sp.parent_span_id = rng.randbytes(rng.choice([0, 8, 8, 8] + [3]))
                sp.attributes.add(key="k").value.int_value = 1
    return req


def _random_logs(rng: random.Random) -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    for _ in range(rng.randint(0, 3)):
        sl = req.resource_logs.add().scope_logs.add()
        for _ in range(rng.randint(0, 6)):
            rec = sl.log_records.add(severity_number=rng.randint(0, 24))
            rec.trace_id = rng.randbytes(rng.choice([16] * 10 + [0] * 10 + [4, 17]))
            rec.span_id = rng.randbytes(rng.choice([8] * 10 + [0] * 10 + [2]))
            rec.body.string_value = "line"
    return req


def test_the_scanner_and_the_message_check_agree(wire):
    for seed in range(300):
        rng = random.Random(seed)
        traces, logs = _random_traces(rng), _random_logs(rng)
        assert wire.check_ids(traces.SerializeToString(), False) == _check_traces(traces)
        assert wire.check_ids(logs.SerializeToString(), True) == _check_logs(logs)


def test_a_later_occurrence_of_an_id_wins_as_in_the_parsed_message(wire):
    """Raw client bytes may repeat a field: a 16-byte trace id followed by a 5-byte one is invalid."""
    span = ExportTraceServiceRequest().resource_spans.add().scope_spans.add().spans.add(
        trace_id=b"\x01" * 16, span_id=b"\x02" * 8)
    span_bytes = span.SerializeToString() + b"\x0a\x05" + b"\x03" * 5  # field 1 again, 5 bytes
    scope = b"\x12" + bytes([len(span_bytes)]) + span_bytes
    resource = b"\x12" + bytes([len(scope)]) + scope
    raw = b"\x0a" + bytes([len(resource)]) + resource
    parsed = ExportTraceServiceRequest.FromString(raw)
    assert len(parsed.resource_spans[0].scope_spans[0].spans[0].trace_id) == 5
    assert _check_traces(parsed) == -1 == wire.check_ids(raw, False)


def test_malformed_bytes_raise_instead_of_crashing(wire):
    with pytest.raises(ValueError):
        wire.check_ids(b"\x0a\xff\xff\xff", False)
