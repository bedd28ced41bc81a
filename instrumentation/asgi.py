"""ASGI (FastAPI/Starlette) middleware: the official OTel ASGI middleware plus request identity.

Wrap the whole app: ``uvicorn.run(ASGIMiddleware(app, user_id_header="X-User"))``. Being
outermost matters: Starlette's error middleware writes its 500 response outside any
``app.add_middleware`` layer, and that response should carry ``X-Request-ID`` too.
Layers, outside in: request identity (``X-Request-ID`` honoured or a UUID4, echoed in
the response; user id; ``X-Debug-Trace`` -> ``sampling.force_keep``) -> OTel's
``OpenTelemetryMiddleware`` (server span, W3C traceparent/baggage extraction) ->
request-scoped work inside the server span (baggage tags, payload capture, exception
event and ERROR log with stack trace for unhandled exceptions) -> the app. An exception
the app's error handler already answered with a complete 500 is recorded and logged
here and not re-raised (the server would only log it a second time).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.trace import Status, StatusCode

from instrumentation._context import _CURRENT
from instrumentation._http import RequestIdentity, adopt_baggage_tags, error_log, payload_attribute

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _InSpan:
    """Runs inside the server span: tags from baggage, payload capture, the ERROR log."""

    def __init__(self, app: ASGIApp, identity: RequestIdentity) -> None:
        self.app = app
        self.capture = identity.capture_payloads
        self.limit = identity.payload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = _CURRENT.get()
        if ctx is not None:
            adopt_baggage_tags(ctx)
        span = trace.get_current_span()
        if self.capture and span.is_recording():
            receive, send = self._capturing(span, receive, send)
        # A 5xx response is held back until the app returns: OTel ends the server span when the
        # last body chunk is sent, and an exception raised after that could no longer be recorded.
        held: list[Message] = []

        async def holding_send(message: Message) -> None:
            if held or (message["type"] == "http.response.start" and message.get("status", 200) >= 500):
                held.append(message)
            else:
                await send(message)

        try:
            await self.app(scope, receive, holding_send)
        except Exception as e:
            error_log.error("unhandled exception in %s %s", scope.get("method"), scope.get("path"), exc_info=True)
            if not _complete(held):
                raise  # no complete response: the server answers 500 and OTel records the exception
            # The app's error handler already produced the 500: record the exception while the span is
            # open, then send the response; not re-raised, or the server would log it a second time.
            span.record_exception(e)
            span.set_status(Status(StatusCode.ERROR, f"{type(e).__name__}: {e}"))
        for message in held:
            await send(message)

    def _capturing(self, span: Any, receive: Receive, send: Send) -> tuple[Receive, Send]:
        request = _CappedBody(span, "http.request.body", self.limit)
        response = _CappedBody(span, "http.response.body", self.limit)

        async def capture_receive() -> Message:
            message = await receive()
            if message.get("type") == "http.request":
                request.add(message)
            return message

        async def capture_send(message: Message) -> None:
            if message.get("type") == "http.response.body":
                response.add(message)
            await send(message)

        return capture_receive, capture_send


class _CappedBody:
    """The first ``limit`` bytes of a streamed body; set on the span once the last chunk has passed."""

    def __init__(self, span: Any, attribute: str, limit: int) -> None:
        self.span, self.attribute, self.limit = span, attribute, limit
        self.chunks: list[bytes] = []
        self.size = 0

    def add(self, message: Message) -> None:
        body = message.get("body", b"")
        if self.size < self.limit:
            self.chunks.append(body[: self.limit - self.size])
        self.size += len(body)
        if not message.get("more_body"):
            payload_attribute(self.span, self.attribute, self.chunks, self.size, self.limit)


def _complete(messages: list[Message]) -> bool:
    return bool(messages) and messages[-1]["type"] == "http.response.body" and not messages[-1].get("more_body")


def _flush_before_shutdown_complete(send: Send) -> Send:
    """Flush telemetry when the server shuts down, before it says it is done.

    Servers such as uvicorn end the process by re-raising SIGTERM after a graceful shutdown,
    so ``atexit`` never runs: the lifespan shutdown is the last moment the app's spans and
    logs can still leave. It is the telemetry's shutdown, run off the event loop, so the one
    deadline (``configure(shutdown_timeout_millis=...)``) bounds it and the SIGTERM that
    follows finds nothing left to wait for.
    """

    async def wrapped(message: Message) -> None:
        if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            from instrumentation._setup import get_telemetry

            handle = get_telemetry()
            if handle is not None:
                import asyncio

                await asyncio.get_running_loop().run_in_executor(None, handle.shutdown)
        await send(message)

    return wrapped


#: Scope key set by the outermost ASGIMiddleware, so a second one (say, the app's own inside an
#: auto-instrumented stack) passes the request through instead of tracing it twice.
_TRACED = "instrumentation.traced"


class ASGIMiddleware:
    """Traces every HTTP request and gives it an identity shared by its spans and logs.

    Keyword options are those of :class:`instrumentation._http.RequestIdentity` plus
    ``tracer_provider``/``meter_provider``, ``excluded_urls`` and ``exclude_spans``
    (OTel's per-message ``receive``/``send`` spans; excluded by default).
    """

    def __init__(self, app: ASGIApp, *, tracer_provider: Any = None, meter_provider: Any = None,
                 excluded_urls: str | None = None, exclude_spans: list[str] | None = None,
                 **identity: Any) -> None:
        self.identity = RequestIdentity(**identity)
        self._rid_header = self.identity.request_id_header.encode("latin-1")
        self._uid_header = self.identity.user_id_header.encode("latin-1") if self.identity.user_id_header else None
        self._debug_header = self.identity.debug_header.encode("latin-1") if self.identity.debug_header else None
        self._inner = app
        self.app = OpenTelemetryMiddleware(
            _InSpan(app, self.identity), excluded_urls=excluded_urls, tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            exclude_spans=["receive", "send"] if exclude_spans is None else exclude_spans)  # type: ignore[arg-type]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, _flush_before_shutdown_complete(send))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _TRACED in scope:  # an outer ASGIMiddleware (the app's own, or auto-instrumentation's) has it
            await self._inner(scope, receive, send)
            return
        scope[_TRACED] = True
        rid = uid = debug = None
        rid_h, uid_h, debug_h = self._rid_header, self._uid_header, self._debug_header
        for name, value in scope.get("headers") or ():
            if name == rid_h:
                rid = value.decode("latin-1")
            elif name == uid_h:
                uid = value.decode("latin-1")
            elif name == debug_h:
                debug = value.decode("latin-1")
        ctx = self.identity.context(rid, uid, debug, scope)
        echo = (self._rid_header, ctx.request_id.encode("latin-1"))  # type: ignore[union-attr]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), echo]
            await send(message)

        # FastAPI's native telemetry would open a second server span parented on the raw headers,
        # i.e. in another trace; this key (its own nesting marker) says the request is traced already.
        scope.setdefault("fastapi.telemetry", None)
        token = _CURRENT.set(ctx)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _CURRENT.reset(token)
