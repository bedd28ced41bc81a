"""TorchServe handler base: each batch is a span continuing the callers' traces.

``class MyHandler(TracingHandler)`` instead of ``BaseHandler``. ``handle`` opens a
server span ``torchserve.handle <model>`` whose parent is the first request's
``traceparent`` header (the other requests of a batch become span links), and
``preprocess``/``inference``/``postprocess`` become child spans, including the
overrides a subclass defines (the usual TorchServe idiom); a subclass that calls
``super().preprocess(...)`` still gets one span per stage. Every span carries
``ml.model.id``/``ml.model.version`` from the archive's manifest. ``initialize``
calls :func:`instrumentation.configure` (idempotent) so handler logs reach the
sidecar with the trace id. TorchServe is optional: this module needs ``ts`` only for
:class:`TracingHandler`; :class:`TracingHandlerMixin` works with any base that has
TorchServe's handler methods.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import attach, detach
from opentelemetry.trace import Link, SpanKind, Status, StatusCode, set_span_in_context

from contract.attributes import ML_BATCH_SIZE, ML_MODEL_ID, ML_MODEL_VERSION
from instrumentation._context import _CURRENT, RequestContext

_SCOPE = "instrumentation.torchserve"
_HEADERS = frozenset({"traceparent", "tracestate", "baggage", "x-request-id", "x-debug-trace"})
_STAGES = ("preprocess", "inference", "postprocess")
_TRUE = frozenset({"1", "true", "yes", "on"})


class _HeaderGetter:
    """TextMap getter over a dict of the request's propagation headers."""

    def get(self, carrier: dict[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        return [value] if value is not None else None

    def keys(self, carrier: dict[str, str]) -> list[str]:
        return list(carrier)


_getter = _HeaderGetter()


def _request_headers(context: Any, idx: int) -> dict[str, str]:
    """The propagation headers of request ``idx``, names lower-cased (HTTP names are case-insensitive)."""
    out = {}
    for name, value in (context.get_all_request_header(idx) or {}).items():
        key = name.lower() if isinstance(name, str) else name
        if key in _HEADERS and value is not None:
            out[key] = value.decode() if isinstance(value, (bytes, bytearray)) else str(value)
    return out


def _traced(stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` as a ``torchserve.<stage>`` span; a call made from inside the same stage (``super()``) is not."""
    span_name = f"torchserve.{stage}"

    @functools.wraps(fn)
    def wrapper(self: TracingHandlerMixin, *args: Any, **kwargs: Any) -> Any:
        outer = self._otel_stage
        if outer == stage:
            return fn(self, *args, **kwargs)
        self._otel_stage = stage
        try:
            with self._otel_tracer().start_as_current_span(span_name, attributes=self._otel_model_attrs):
                return fn(self, *args, **kwargs)
        finally:
            self._otel_stage = outer

    wrapper._otel_traced = True  # type: ignore[attr-defined]
    return wrapper


class TracingHandlerMixin:
    """Span per batch with child spans for the three stages; mix in before TorchServe's ``BaseHandler``."""

    tracer_provider: Any = None
    _tracer: Any = None
    _otel_stage: str | None = None
    _otel_model_attrs: dict[str, Any] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Trace the stages a subclass overrides, since they shadow the mixin's traced ones."""
        super().__init_subclass__(**kwargs)
        for stage in _STAGES:
            fn = cls.__dict__.get(stage)
            if callable(fn) and not getattr(fn, "_otel_traced", False):
                setattr(cls, stage, _traced(stage, fn))

    def _otel_tracer(self) -> Any:
        if self._tracer is None:
            self._tracer = trace.get_tracer(_SCOPE, tracer_provider=self.tracer_provider)
        return self._tracer

    def initialize(self, context: Any) -> Any:
        from instrumentation._setup import configure

        configure(service_name=getattr(context, "model_name", None) or None)
        return super().initialize(context)  # type: ignore[misc]

    def _model_attrs(self, context: Any) -> dict[str, Any]:
        """``ml.model.id``/``ml.model.version`` from the context; the same for every batch, so built once."""
        if self._otel_model_attrs is None:
            model = getattr(context, "model_name", None) or type(self).__name__
            manifest = getattr(context, "manifest", None) or {}
            version = (manifest.get("model") or {}).get("modelVersion")
            attrs: dict[str, Any] = {ML_MODEL_ID: model}
            if version is not None:
                attrs[ML_MODEL_VERSION] = str(version)
            self._otel_model_attrs = attrs
        return self._otel_model_attrs

    def handle(self, data: list, context: Any) -> Any:
        n = len(data) if data is not None else 0
        carriers = [_request_headers(context, i) for i in range(n)]
        parents = [propagate.extract(c, getter=_getter) for c in carriers]
        links = [Link(sc) for sc in (trace.get_current_span(p).get_span_context() for p in parents[1:])
                 if sc.is_valid]
        model_attrs = self._model_attrs(context)
        model = model_attrs[ML_MODEL_ID]
        first = carriers[0] if carriers else {}
        req_ids = getattr(context, "request_ids", None) or {}
        ctx = RequestContext(request_id=first.get("x-request-id") or req_ids.get(0),
                             force_keep=first.get("x-debug-trace", "").lower() in _TRUE)
        ctx.model_id, ctx.model_version = model, model_attrs.get(ML_MODEL_VERSION)
        rc_token = _CURRENT.set(ctx)
        parent_token = attach(parents[0]) if parents else None
        try:
            span = self._otel_tracer().start_span(
                f"torchserve.handle {model}", kind=SpanKind.SERVER,
                attributes={**model_attrs, ML_BATCH_SIZE: n},
                links=links)
            token = attach(set_span_in_context(span))
            try:
                return super().handle(data, context)  # type: ignore[misc]
            except BaseException as e:
                span.record_exception(e)
                span.set_status(Status(StatusCode.ERROR, f"{type(e).__name__}: {e}"))
                raise
            finally:
                detach(token)
                span.end()
        finally:
            if parent_token is not None:
                detach(parent_token)
            _CURRENT.reset(rc_token)


def _super_stage(stage: str) -> Callable[..., Any]:
    def call(self: TracingHandlerMixin, *args: Any, **kwargs: Any) -> Any:
        return getattr(super(TracingHandlerMixin, self), stage)(*args, **kwargs)

    call.__name__ = call.__qualname__ = stage
    return call


for _stage in _STAGES:  # the base's own stages, for handlers that do not override them
    setattr(TracingHandlerMixin, _stage, _traced(_stage, _super_stage(_stage)))


def _make_handler() -> type:
    from ts.torch_handler.base_handler import BaseHandler  # optional dependency

    class TracingHandler(TracingHandlerMixin, BaseHandler):
        """TorchServe ``BaseHandler`` with per-batch tracing (see the module doc)."""

    return TracingHandler


def __getattr__(name: str) -> Any:
    if name == "TracingHandler":
        cls = _make_handler()
        globals()["TracingHandler"] = cls
        return cls
    raise AttributeError(name)
