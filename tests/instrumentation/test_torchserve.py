"""The TorchServe handler base: stage spans, traceparent continuation (fake TorchServe context)."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
from opentelemetry.trace import SpanKind, StatusCode

from instrumentation.torchserve import TracingHandlerMixin


class FakeBaseHandler:
    """TorchServe's BaseHandler control flow: handle() calls the three stages."""

    def initialize(self, context):
        self.initialized = True

    def preprocess(self, data):
        return [row["body"] for row in data]

    def inference(self, data, *args, **kwargs):
        if "boom" in data:
            raise ValueError("bad tensor")
        return [x.upper() for x in data]

    def postprocess(self, data):
        return data

    def handle(self, data, context):
        return self.postprocess(self.inference(self.preprocess(data)))


class FakeContext:
    model_name = "tiny"
    manifest = {"model": {"modelVersion": "2.0"}}

    def __init__(self, headers: list[dict]):
        self._headers = headers
        self.request_ids = {i: f"ts-{i}" for i in range(len(headers))}

    def get_request_header(self, idx, key):
        return self._headers[idx].get(key)


def handler(spans):
    class Handler(TracingHandlerMixin, FakeBaseHandler):
        tracer_provider = spans.provider

    return Handler()


TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def test_batch_span_continues_the_callers_trace_with_stage_children(spans):
    ctx = FakeContext([{"traceparent": f"00-{TRACE}-{PARENT}-01", "x-request-id": "rid-1"},
                       {"traceparent": f"00-{'1' * 32}-{'2' * 16}-01"}])
    assert handler(spans).handle([{"body": "a"}, {"body": "b"}], ctx) == ["A", "B"]
    by_name = {s.name: s for s in spans.finished()}
    root = by_name["torchserve.handle tiny"]
    assert root.kind is SpanKind.SERVER
    assert format(root.context.trace_id, "032x") == TRACE and format(root.parent.span_id, "016x") == PARENT
    assert [format(link.context.trace_id, "032x") for link in root.links] == ["1" * 32]
    assert root.attributes["ml.model.id"] == "tiny" and root.attributes["ml.model.version"] == "2.0"
    assert root.attributes["ml.batch_size"] == 2 and root.attributes["request.id"] == "rid-1"
    for stage in ("preprocess", "inference", "postprocess"):
        assert by_name[f"torchserve.{stage}"].parent.span_id == root.context.span_id


def test_failure_marks_the_stage_and_the_batch(spans):
    with pytest.raises(ValueError):
        handler(spans).handle([{"body": "boom"}], FakeContext([{}]))
    by_name = {s.name: s for s in spans.finished()}
    assert by_name["torchserve.inference"].status.status_code is StatusCode.ERROR
    assert by_name["torchserve.handle tiny"].status.status_code is StatusCode.ERROR
    assert any(e.name == "exception" for e in by_name["torchserve.handle tiny"].events)


@pytest.mark.torchserve
@pytest.mark.skipif(importlib.util.find_spec("ts") is None or shutil.which("java") is None,
                    reason="needs torchserve==0.12.0 and Java 17")
def test_real_torchserve_end_to_end():
    pytest.skip("TODO: archive a tiny model with torch-model-archiver, serve it, assert the trace arrives")
