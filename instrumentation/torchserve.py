"""TorchServe handler base: each batch is a span continuing the callers' traces.

``class MyHandler(TracingHandler)`` instead of ``BaseHandler``. ``handle`` opens a
server span ``torchserve.handle <model>`` whose parent is the first request's
``traceparent`` header (the other requests of a batch become span links), and
``preprocess``/``inference``/``postprocess`` become child spans. ``initialize``
calls :func:`instrumentation.configure` (idempotent) so handler logs reach the
sidecar with the trace id. TorchServe is optional: this module needs ``ts`` only for
:class:`TracingHandler`; :class:`TracingHandlerMixin` works with any base that has
TorchServe's handler methods.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import attach, detach
from opentelemetry.trace import Link, SpanKind, Status, StatusCode, set_span_in_context

from instrumentation._context import _CURRENT, RequestContext

_SCOPE = "instrumentation.torchserve"
_HEADERS = ("traceparent", "tracestate", "baggage", "x-request-id", "x-debug-trace")
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
    out = {}
    for name in _HEADERS:
        value = context.get_request_header(idx, name)
        if value is None:
            value = context.get_request_header(idx, name.title())
        if value is not None:
            out[name] = value.decode() if isinstance(value, (bytes, bytearray)) else str(value)
    return out


class TracingHandlerMixin:
    """Span per batch with child spans for the three stages; mix in before TorchServe's ``BaseHandler``."""

    tracer_provider: Any = None
    _tracer: Any = None

    def _otel_tracer(self) -> Any:
        if self._tracer is None:
            self._tracer = trace.get_tracer(_SCOPE, tracer_provider=self.tracer_provider)
        return self._tracer

    def initialize(self, context: Any) -> Any:
        from instrumentation._setup import configure

        configure(service_name=getattr(context, "model_name", None) or None)
        return super().initialize(context)  # type: ignore[misc]

    def handle(self, data: list, context: Any) -> Any:
        n = len(data) if data is not None else 0
        carriers = [_request_headers(context, i) for i in range(n)]
        parents = [propagate.extract(c, getter=_getter) for c in carriers]
        links = [Link(trace.get_current_span(p).get_span_context()) for p in parents[1:]
                 if trace.get_current_span(p).get_span_context().is_valid]
        first = carriers[0] if carriers else {}
        model = getattr(context, "model_name", None) or type(self).__name__
        manifest = getattr(context, "manifest", None) or {}
        version = (manifest.get("model") or {}).get("modelVersion")
        attrs: dict[str, Any] = {"ml.model.id": model, "ml.batch_size": n}
        if version is not None:
            attrs["ml.model.version"] = str(version)
        req_ids = getattr(context, "request_ids", None) or {}
        rid = first.get("x-request-id") or req_ids.get(0)
        ctx = RequestContext(request_id=rid, force_keep=first.get("x-debug-trace", "").lower() in _TRUE)
        ctx.model_id, ctx.model_version = model, attrs.get("ml.model.version")
        rc_token = _CURRENT.set(ctx)
        parent_token = attach(parents[0]) if parents else None
        try:
            span = self._otel_tracer().start_span(f"torchserve.handle {model}", kind=SpanKind.SERVER,
                                                  attributes=attrs, links=links)
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

    def _stage(self, name: str, fn: Any, *args: Any) -> Any:
        with self._otel_tracer().start_as_current_span(f"torchserve.{name}"):
            return fn(*args)

    def preprocess(self, data: Any) -> Any:
        return self._stage("preprocess", super().preprocess, data)  # type: ignore[misc]

    def inference(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        return self._stage("inference", lambda d: super(TracingHandlerMixin, self).inference(d, *args, **kwargs),
                           data)

    def postprocess(self, data: Any) -> Any:
        return self._stage("postprocess", super().postprocess, data)  # type: ignore[misc]


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
