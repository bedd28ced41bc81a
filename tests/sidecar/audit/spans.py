"""Real OTel SDK spans, encoded as the OTLP exporter would send them, for the audit tests."""

from __future__ import annotations

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode


class App:
    """Produces the spans an instrumented inference service emits for one request."""

    def __init__(self, service: str = "classifier"):
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(resource=Resource.create({"service.name": service}))
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("test")

    def request(self, request_id: str, *, user: str = "alice", version: str = "2.4.1", status: int = 200,
                payload_in: str | None = None, payload_out: str | None = None, generation: bool = False):
        common = {"request.id": request_id, "user.id": user, "tag.intent": "classify", "tag.tenant": "acme"}
        with self.tracer.start_as_current_span("POST /predict", kind=SpanKind.SERVER, attributes={
                **common, "http.request.body": '{"x": [1, 2]}', "http.response.body": '{"label": 1}'}) as server:
            attrs = {**common, "ml.model.id": "resnet", "ml.model.version": version, "ml.batch_size": 2,
                     "ml.input.shapes": ["2x3"], "ml.output.shapes": ["2x10"]}
            if payload_in is not None:
                attrs["ml.input.payload"] = payload_in
            if payload_out is not None:
                attrs["ml.output.payload"] = payload_out
            with self.tracer.start_as_current_span("ml.forward resnet", attributes=attrs):
                pass
            if generation:
                with self.tracer.start_as_current_span("text_completion llm", attributes={
                        **common, "gen_ai.request.model": "llm", "gen_ai.request.temperature": 0.7,
                        "gen_ai.request.top_p": 0.9, "gen_ai.request.seed": 42,
                        "gen_ai.usage.input_tokens": 12, "gen_ai.usage.output_tokens": 30}):
                    pass
            with self.tracer.start_as_current_span("postprocess"):
                pass
            server.set_attribute("http.response.status_code", status)
            if status >= 500:
                server.set_status(Status(StatusCode.ERROR, "boom"))
        return server.get_span_context()

    def take(self):
        """The spans finished since the last call, as one ExportTraceServiceRequest."""
        spans = self.exporter.get_finished_spans()
        self.exporter.clear()
        return encode_spans(spans)
