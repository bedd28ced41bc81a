"""Generate/stream loops as GenAI spans and metrics (OpenTelemetry GenAI semantic conventions).

::

    with trace_generation(model="llama-3-8b", temperature=0.7, max_tokens=256, input_tokens=len(ids)) as gen:
        for tok in model.stream(ids):
            gen.token()               # the first call marks time to first token
        gen.finish("stop")

The span (``{operation} {model}``) carries ``gen_ai.*`` request attributes, token usage,
finish reasons, and ``gen_ai.server.time_to_first_token`` / ``time_per_output_token``
(seconds). The same values feed the GenAI histograms ``gen_ai.server.request.duration``,
``gen_ai.server.time_to_first_token``, ``gen_ai.server.time_per_output_token`` and
``gen_ai.client.token.usage`` (with ``gen_ai.token.type``). Prompt and completion
text are recorded only with ``capture_content=True``, as span events; when
``configure(redaction=...)`` is set they pass through the redacting exporter.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import time
from collections.abc import Callable
from typing import Any, Literal

from opentelemetry import metrics, trace
from opentelemetry.context import attach, detach
from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context

from contract.attributes import (
    GEN_AI_COMPLETION,
    GEN_AI_OPERATION_NAME,
    GEN_AI_PROMPT,
    GEN_AI_REQUEST_MODEL,
    GEN_AI_RESPONSE_FINISH_REASONS,
    GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN,
    GEN_AI_SERVER_TIME_TO_FIRST_TOKEN,
    GEN_AI_TOKEN_TYPE,
    GEN_AI_USAGE_INPUT_TOKENS,
    GEN_AI_USAGE_OUTPUT_TOKENS,
)

_SCOPE = "instrumentation.genai"
# Bucket boundaries recommended by the GenAI semantic conventions.
_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)


class _Instruments:
    """The four GenAI histograms for one meter provider (created once, reused by every generation)."""

    def __init__(self, meter_provider: Any) -> None:
        meter = metrics.get_meter(_SCOPE, meter_provider=meter_provider)
        hist = meter.create_histogram
        self.duration = hist("gen_ai.server.request.duration", unit="s",
                             description="Generative AI server request duration",
                             explicit_bucket_boundaries_advisory=_DURATION_BUCKETS)
        self.ttft = hist(GEN_AI_SERVER_TIME_TO_FIRST_TOKEN, unit="s",
                         description="Time to generate the first token",
                         explicit_bucket_boundaries_advisory=_TTFT_BUCKETS)
        self.tpot = hist(GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN, unit="s",
                         description="Time per output token after the first",
                         explicit_bucket_boundaries_advisory=_TPOT_BUCKETS)
        self.tokens = hist("gen_ai.client.token.usage", unit="{token}",
                           description="Number of input and output tokens used",
                           explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS)


_instruments: dict[int, tuple[Any, _Instruments]] = {}


def _instruments_for(meter_provider: Any) -> _Instruments:
    """The instruments of ``meter_provider`` (None: the global one), created on first use.

    The entry keeps the provider it was made for and is checked by identity, so a provider
    created later at a recycled address never gets another provider's instruments.
    """
    key = id(meter_provider) if meter_provider is not None else 0
    entry = _instruments.get(key)
    if entry is None or entry[0] is not meter_provider:
        entry = _instruments[key] = (meter_provider, _Instruments(meter_provider))
    return entry[1]


class Generation:
    """Handle for one generation: count tokens, set the finish reason, optionally record content."""

    def __init__(self, span: Any, instruments: _Instruments, metric_attrs: dict[str, Any], capture_content: bool,
                 input_tokens: int | None) -> None:
        self.span = span
        self._inst = instruments
        self._metric_attrs = metric_attrs
        self._capture = capture_content
        self._start = time.perf_counter()
        self._first: float | None = None
        self._last: float | None = None
        self.output_tokens = 0
        self.input_tokens = input_tokens
        self.finish_reasons: list[str] = []

    def token(self, n: int = 1) -> None:
        """Count ``n`` output tokens just produced; the first call marks time to first token."""
        now = time.perf_counter()
        if self._first is None:
            self._first = now
        self._last = now
        self.output_tokens += n

    def set_input_tokens(self, n: int) -> None:
        self.input_tokens = n

    def finish(self, reason: str) -> None:
        """Record why a sequence ended (``stop``, ``length``, ...); call once per returned sequence."""
        self.finish_reasons.append(reason)

    def prompt(self, text: str) -> None:
        """Record the prompt (only with ``capture_content=True``)."""
        if self._capture:
            self.span.add_event("gen_ai.content.prompt", {GEN_AI_PROMPT: text})

    def completion(self, text: str) -> None:
        """Record generated text (only with ``capture_content=True``)."""
        if self._capture:
            self.span.add_event("gen_ai.content.completion", {GEN_AI_COMPLETION: text})

    def _end(self, error: BaseException | None) -> None:
        end = time.perf_counter()
        span, inst, attrs = self.span, self._inst, self._metric_attrs
        if error is not None:
            attrs = {**attrs, "error.type": type(error).__qualname__}
        inst.duration.record(end - self._start, attrs)
        final: dict[str, Any] = {GEN_AI_USAGE_OUTPUT_TOKENS: self.output_tokens}
        if self.input_tokens is not None:
            final[GEN_AI_USAGE_INPUT_TOKENS] = self.input_tokens
            inst.tokens.record(self.input_tokens, {**attrs, GEN_AI_TOKEN_TYPE: "input"})
        inst.tokens.record(self.output_tokens, {**attrs, GEN_AI_TOKEN_TYPE: "output"})
        if self.finish_reasons:
            final[GEN_AI_RESPONSE_FINISH_REASONS] = self.finish_reasons
        for fn in _GEN_OBSERVERS:  # drift and cost summaries (instrumentation.drift)
            try:
                fn(self._metric_attrs[GEN_AI_REQUEST_MODEL], None, self.input_tokens, self.output_tokens,
                   end - self._start)
            except Exception:  # noqa: BLE001 - an observer must never fail a generation
                pass
        if self._first is not None:
            ttft = self._first - self._start
            final[GEN_AI_SERVER_TIME_TO_FIRST_TOKEN] = ttft
            inst.ttft.record(ttft, attrs)
            if self.output_tokens > 1 and self._last is not None:
                tpot = (self._last - self._first) / (self.output_tokens - 1)
                final[GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN] = tpot
                inst.tpot.record(tpot, attrs)
        span.set_attributes(final)
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        span.end()


class trace_generation:  # noqa: N801 - used like a function (context manager / decorator)
    """Trace a generate or stream loop as one GenAI span (see the module doc).

    As a decorator on a generator function each yielded item counts as one output
    token; on a plain function the wrapped call is traced and the handle is
    available through :func:`current_generation`.
    """

    def __init__(self, model: str, *, operation: Literal["text_completion", "chat"] | str = "text_completion",
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 seed: int | None = None, max_tokens: int | None = None, input_tokens: int | None = None,
                 capture_content: bool = False, tracer_provider: Any = None, meter_provider: Any = None) -> None:
        self._tracer = trace.get_tracer(_SCOPE, tracer_provider=tracer_provider)
        self._inst = _instruments_for(meter_provider)
        self._name = f"{operation} {model}"
        attrs: dict[str, Any] = {GEN_AI_OPERATION_NAME: operation, GEN_AI_REQUEST_MODEL: model}
        self._metric_attrs = dict(attrs)
        for key, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("seed", seed),
                           ("max_tokens", max_tokens)):
            if value is not None:
                attrs[f"gen_ai.request.{key}"] = value
        self._attrs = attrs
        self._capture = capture_content
        self._input_tokens = input_tokens
        self._stack: list[tuple[Generation, object, object]] = []

    def _open(self) -> tuple[Generation, object, object]:
        span = self._tracer.start_span(self._name, kind=SpanKind.INTERNAL, attributes=self._attrs)
        gen = Generation(span, self._inst, self._metric_attrs, self._capture, self._input_tokens)
        return gen, attach(set_span_in_context(span)), _CURRENT_GEN.set(gen)

    @staticmethod
    def _close(opened: tuple[Generation, object, object], error: BaseException | None) -> None:
        gen, token, gen_token = opened
        _CURRENT_GEN.reset(gen_token)  # type: ignore[arg-type]
        detach(token)
        gen._end(error)

    def __enter__(self) -> Generation:
        opened = self._open()
        self._stack.append(opened)
        return opened[0]

    def __exit__(self, etype: Any, exc: BaseException | None, tb: Any) -> None:
        self._close(self._stack.pop(), exc)

    def __call__(self, func: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isgeneratorfunction(func):
            @functools.wraps(func)
            def gen_wrapper(*args: Any, **kwargs: Any) -> Any:
                # The span is current only while the generator body runs, never in the caller between items.
                span = self._tracer.start_span(self._name, kind=SpanKind.INTERNAL, attributes=self._attrs)
                gen = Generation(span, self._inst, self._metric_attrs, self._capture, self._input_tokens)
                span_ctx = set_span_in_context(span)
                it = func(*args, **kwargs)
                error = None
                try:
                    while True:
                        token, gen_token = attach(span_ctx), _CURRENT_GEN.set(gen)
                        try:
                            item = next(it)
                        except StopIteration:
                            return
                        finally:
                            _CURRENT_GEN.reset(gen_token)
                            detach(token)
                        gen.token()
                        yield item
                except GeneratorExit:  # the consumer stopped early: not an error
                    it.close()
                    raise
                except BaseException as e:
                    error = e
                    raise
                finally:
                    gen._end(error)
            return gen_wrapper

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            opened = self._open()
            try:
                result = func(*args, **kwargs)
            except BaseException as e:
                self._close(opened, e)
                raise
            self._close(opened, None)
            return result
        return wrapper


_CURRENT_GEN: contextvars.ContextVar[Generation | None] = contextvars.ContextVar("gen_ai_generation", default=None)


def current_generation() -> Generation | None:
    """The :class:`Generation` being traced in this context (inside a decorated function), else None."""
    return _CURRENT_GEN.get()


#: Called when a generation ends as ``fn(model, model_version, input_tokens, output_tokens, seconds)``.
_GEN_OBSERVERS: list[Callable[..., None]] = []


def add_generation_observer(fn: Callable[..., None]) -> Callable[[], None]:
    """Have ``fn`` see each finished generation (drift and cost summaries use this); returns its remover."""
    _GEN_OBSERVERS.append(fn)

    def remove() -> None:
        if fn in _GEN_OBSERVERS:
            _GEN_OBSERVERS.remove(fn)

    return remove
