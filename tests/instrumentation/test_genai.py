"""Generation spans and GenAI metrics."""

from __future__ import annotations

import pytest
from opentelemetry.trace import StatusCode

from instrumentation import current_generation, trace_generation

from .conftest import histogram_points


def test_generation_span_attributes_and_metrics(spans, meter):
    meter_provider, reader = meter
    clock = iter([0.0, 0.5, 0.6, 0.7, 0.9, 1.0])
    import instrumentation.genai as genai

    real = genai.time.perf_counter
    genai.time.perf_counter = lambda: next(clock)  # start, 4 tokens, end
    try:
        with trace_generation("tiny-llm", operation="chat", temperature=0.7, top_p=0.9, top_k=40, seed=1,
                              max_tokens=64, input_tokens=12, tracer_provider=spans.provider,
                              meter_provider=meter_provider) as gen:
            for _ in range(4):
                gen.token()
            gen.finish("stop")
    finally:
        genai.time.perf_counter = real
    (span,) = spans.finished()
    assert span.name == "chat tiny-llm"
    a = span.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "tiny-llm"
    assert (a["gen_ai.request.temperature"], a["gen_ai.request.top_p"], a["gen_ai.request.top_k"]) == (0.7, 0.9, 40)
    assert a["gen_ai.request.seed"] == 1 and a["gen_ai.request.max_tokens"] == 64
    assert a["gen_ai.usage.input_tokens"] == 12 and a["gen_ai.usage.output_tokens"] == 4
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert a["gen_ai.server.time_to_first_token"] == pytest.approx(0.5)
    assert a["gen_ai.server.time_per_output_token"] == pytest.approx((0.9 - 0.5) / 3)

    (ttft,) = histogram_points(reader, "gen_ai.server.time_to_first_token")
    assert ttft.sum == pytest.approx(0.5)
    (dur,) = histogram_points(reader, "gen_ai.server.request.duration")
    assert dur.sum == pytest.approx(1.0)
    assert dict(dur.attributes) == {"gen_ai.operation.name": "chat", "gen_ai.request.model": "tiny-llm"}
    (tpot,) = histogram_points(reader, "gen_ai.server.time_per_output_token")
    assert tpot.sum == pytest.approx(0.4 / 3)
    usage = {p.attributes["gen_ai.token.type"]: p.sum for p in histogram_points(reader, "gen_ai.client.token.usage")}
    assert usage == {"input": 12, "output": 4}


def test_content_is_not_captured_unless_asked(spans):
    for capture in (False, True):
        with trace_generation("m", capture_content=capture, tracer_provider=spans.provider) as gen:
            gen.prompt("my secret prompt")
            gen.completion("the answer")
    off, on = spans.finished()
    assert off.events == ()
    assert [e.attributes.get("gen_ai.prompt") or e.attributes.get("gen_ai.completion") for e in on.events] == [
        "my secret prompt", "the answer"]


def test_decorated_generator_counts_yielded_tokens_and_keeps_caller_context_clean(spans, meter):
    meter_provider, _ = meter
    tracer = spans.provider.get_tracer("t")

    @trace_generation("streamer", tracer_provider=spans.provider, meter_provider=meter_provider)
    def stream(n):
        current_generation().set_input_tokens(3)
        with tracer.start_as_current_span("decode step"):
            pass
        yield from range(n)

    seen = []
    for tok in stream(5):
        with tracer.start_as_current_span("consumer"):  # between items the caller's context is its own
            seen.append(tok)
    gen_span = spans.named("text_completion streamer")[0]
    assert seen == [0, 1, 2, 3, 4]
    assert gen_span.attributes["gen_ai.usage.output_tokens"] == 5
    assert gen_span.attributes["gen_ai.usage.input_tokens"] == 3
    assert spans.named("decode step")[0].parent.span_id == gen_span.context.span_id
    assert all(s.parent is None for s in spans.named("consumer"))


def test_error_in_generation_marks_span_and_metric(spans, meter):
    meter_provider, reader = meter
    with pytest.raises(ValueError):
        with trace_generation("m", tracer_provider=spans.provider, meter_provider=meter_provider) as gen:
            gen.token()
            raise ValueError("CUDA OOM")
    (span,) = spans.finished()
    assert span.status.status_code is StatusCode.ERROR
    (dur,) = histogram_points(reader, "gen_ai.server.request.duration")
    assert dur.attributes["error.type"] == "ValueError"
