"""OTLP/JSON from an attacker: every malformed body is an OTLPJSONError naming what was wrong, never a crash.

Before, these reached the HTTP receiver as RecursionError / TypeError / AttributeError and were
answered 500 (found by tests/fuzz/harness.py).
"""

from __future__ import annotations

import pytest

from sidecar.otlp_json import OTLPJSONError, from_json
from sidecar.signals import Signal

_DEEP_KVLIST = (b'{"resourceSpans": [{"resource": {"attributes": [{"key": "k", "value": '
                + b'{"kvlistValue": {"values": [{"key": "k", "value": ' * 60 + b'{"stringValue": "x"}'
                + b"}]}}" * 60 + b"}]}}]}")


@pytest.mark.parametrize("signal, body, names", [
    (Signal.TRACES, b"[" * 100_000, "nested deeper than 100"),
    (Signal.TRACES, b'{"resourceSpans": [1]}', "resourceSpans[0]: expected an object"),
    (Signal.TRACES, b'{"resourceSpans": [{"scopeSpans": [{"spans": ["x"]}]}]}',
     "resourceSpans[0].scopeSpans[0].spans[0]: expected an object"),
    (Signal.TRACES, b'{"resourceSpans": {"a": 1}}', "resourceSpans: expected an array"),
    (Signal.LOGS, b'{"resourceLogs": [{"scopeLogs": [{"logRecords": [null]}]}]}',
     "resourceLogs[0].scopeLogs[0].logRecords[0]: expected an object"),
    (Signal.METRICS, b'{"resourceMetrics": [{"scopeMetrics": [{"metrics": [{"gauge": 5}]}]}]}',
     "resourceMetrics[0].scopeMetrics[0].metrics[0].gauge: expected an object"),
    (Signal.METRICS, b'{"resourceMetrics": [{"scopeMetrics": [{"metrics": [{"sum": {"dataPoints": [true]}}]}]}]}',
     "metrics[0].sum.dataPoints[0]: expected an object"),
    (Signal.TRACES, b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"startTimeUnixNano": "1e999999"}]}]}]}',
     "startTimeUnixNano"),
    (Signal.TRACES, b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"kind": 2e70}]}]}]}', "kind"),
    (Signal.TRACES, _DEEP_KVLIST, "depth"),
])
def test_hostile_json_is_a_clear_error(signal, body, names):
    with pytest.raises(OTLPJSONError) as e:
        from_json(signal, body)
    assert names.lower() in str(e.value).lower()


def test_valid_json_still_parses():
    body = (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "0102030405060708090a0b0c0d0e0f10",'
            b' "spanId": "0102030405060708", "name": "POST /predict", "kind": 2}]}]}]}')
    span = from_json(Signal.TRACES, body).resource_spans[0].scope_spans[0].spans[0]
    assert (span.name, span.kind, span.span_id.hex()) == ("POST /predict", 2, "0102030405060708")
