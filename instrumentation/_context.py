"""Per-request identity shared by spans and logs: one contextvar, one span processor.

The web middleware opens a :class:`RequestContext` for each request; everything that
runs in that request (child spans, log records, the JSON formatter) reads it from
the contextvar, so request id, user id, semantic tags and the debug "force keep"
flag reach every span and log without being passed around. asyncio tasks inherit
it automatically; for threads, run the work in ``contextvars.copy_context()``.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import baggage, propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from contract.attributes import REQUEST_ID, SAMPLING_FORCE_KEEP, TAG_PREFIX, USER_ID

#: Span attribute names shared with the sidecar: the project-wide contract, in contract.attributes.
FORCE_KEEP = SAMPLING_FORCE_KEEP


class RequestContext:
    """Identity of the request being served; mutable so later ``set_tags`` calls are seen everywhere."""

    __slots__ = ("request_id", "user_id", "force_keep", "tags", "model_id", "model_version", "span_attributes")

    def __init__(self, request_id: str | None = None, user_id: str | None = None, force_keep: bool = False,
                 tags: dict[str, str] | None = None) -> None:
        self.request_id = request_id
        self.user_id = user_id
        self.force_keep = force_keep
        self.tags: dict[str, str] = dict(tags or {})
        self.model_id: str | None = None
        self.model_version: str | None = None
        #: Attributes stamped on every span started in this request; built once, extended by set_tags.
        self.span_attributes: dict[str, Any] = {}
        if request_id:
            self.span_attributes[REQUEST_ID] = request_id
        if user_id:
            self.span_attributes[USER_ID] = user_id
        if force_keep:
            self.span_attributes[FORCE_KEEP] = True
        for k, v in self.tags.items():
            self.span_attributes[TAG_PREFIX + k] = v


_CURRENT: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar("otel_request_context", default=None)


def current_request() -> RequestContext | None:
    """The request being served in this context, or None outside a request."""
    return _CURRENT.get()


@contextmanager
def request_context(ctx: RequestContext) -> Iterator[RequestContext]:
    """Make ``ctx`` current for the duration of the block (used by the middleware and handlers)."""
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


def set_tags(**tags: str) -> None:
    """Attach semantic tags (e.g. ``intent="classify"``) to the current request.

    They land on the current span and on every span and log record created later in
    the request (as ``tag.<name>``), and :func:`inject` forwards them as W3C baggage.
    """
    ctx = _CURRENT.get()
    attrs = {TAG_PREFIX + k: str(v) for k, v in tags.items()}
    if ctx is not None:
        ctx.tags.update({k: str(v) for k, v in tags.items()})
        ctx.span_attributes.update(attrs)
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(attrs)


def inject(carrier: MutableMapping[str, str], context: Context | None = None) -> MutableMapping[str, str]:
    """Write ``traceparent``/``tracestate``/``baggage`` (with the request's tags) into outgoing headers.

    ``requests.get(url, headers=inject({}))`` continues the current trace in the callee.
    """
    ctx = _CURRENT.get()
    if ctx is not None and ctx.tags:
        for k, v in ctx.tags.items():
            context = baggage.set_baggage(TAG_PREFIX + k, v, context)
    propagate.inject(carrier, context=context)
    return carrier


class RequestContextSpanProcessor(SpanProcessor):
    """Stamps request id, user id, tags and ``sampling.force_keep`` on every span started in a request.

    ``configure()`` installs it; apps that build their own TracerProvider add it themselves.
    """

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        ctx = _CURRENT.get()
        if ctx is not None and ctx.span_attributes:
            span.set_attributes(ctx.span_attributes)

    def on_end(self, span: ReadableSpan) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
