"""span_metrics labels only ever carry redacted text: it runs before the redaction processor, and
/metrics (bound to all interfaces in the Kubernetes config) is scraped from outside the pod."""

from __future__ import annotations

from prometheus_client.exposition import generate_latest

from sidecar.envelope import Envelope
from sidecar.signals import Signal
from tests.sidecar.test_span_metrics import add_span, make, request

PII_NAME = "GET /users/jane.doe@example.com/card/4111111111111111"
PII = ("jane.doe@example.com", "4111111111111111")


def exported_text(proc) -> str:
    return str(proc.build_metrics_request())


def test_span_names_and_model_ids_are_masked_in_place_on_metrics_and_in_the_otlp_export():
    proc, sink, tel = make(with_metrics_route=True, dimensions=[{"name": "user"}])
    req, ss = request("checkout")
    for _ in range(3):
        add_span(ss, name=PII_NAME, attrs={"ml.model.id": "ft-for-jane.doe@example.com", "user": "4111111111111111"})
    add_span(ss, name="GET /users/john@example.org/card/5500000000000004")
    proc.consume(Envelope(Signal.TRACES, req))
    text = generate_latest(tel.registry).decode()
    otlp = exported_text(proc)
    for secret in PII + ("john@example.org", "5500000000000004"):
        assert secret not in text and secret not in otlp
    # masked in place: the name keeps its shape, so requests of one route stay one series
    assert 'span_name="GET /users/[EMAIL]/card/[CARD]"' in text
    assert 'model_id="[EMAIL]"' in text and 'user="[CARD]"' in text
    calls = [line for line in text.splitlines() if line.startswith("traces_span_metrics_calls_total{")]
    assert sorted(line.rsplit(" ", 1)[1] for line in calls) == ["1.0", "3.0"]
    # the spans themselves pass through untouched: the redaction processor downstream decides for them
    assert sink.of(Signal.TRACES)[0].resource_spans[0].scope_spans[0].spans[0].name == PII_NAME
    # counted, per component: two series keys, the first with three masked values, the second with one
    assert 'sidecar_span_metrics_labels_masked_total{component="span_metrics"} 4.0' in text


def test_masked_label_counts_belong_to_their_own_processor():
    first, _, first_tel = make()
    second, _, second_tel = make()
    req, ss = request("svc")
    add_span(ss, name=PII_NAME)
    first.consume(Envelope(Signal.TRACES, req))
    assert 'sidecar_span_metrics_labels_masked_total{component="span_metrics"} 1.0' in \
        generate_latest(first_tel.registry).decode()
    assert 'sidecar_span_metrics_labels_masked_total{component="span_metrics"} 0.0' in \
        generate_latest(second_tel.registry).decode()
    assert second._mask.__self__ is not first._mask.__self__  # one engine (and its stats) per processor


def test_clean_labels_are_unchanged_and_masking_can_be_turned_off():
    proc, _, tel = make(redact_labels=False)
    req, ss = request("svc")
    add_span(ss, name=PII_NAME)
    add_span(ss, name="predict")
    proc.consume(Envelope(Signal.TRACES, req))
    text = generate_latest(tel.registry).decode()
    assert f'span_name="{PII_NAME}"' in text and 'span_name="predict"' in text
