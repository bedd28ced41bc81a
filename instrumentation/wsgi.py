"""WSGI (Flask) middleware: the official OTel WSGI middleware plus request identity.

``instrument_flask(app)`` wraps ``app.wsgi_app`` and records the exceptions Flask turns
into 500 responses on the server span (Flask logs them itself, at ERROR with
``exc_info``, which the logging bridge exports in the same trace). For any other WSGI
app: ``app = WSGIMiddleware(app)``; unhandled exceptions are recorded on the span and
logged at ERROR.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware
from opentelemetry.trace import Status, StatusCode

from instrumentation._context import _CURRENT
from instrumentation._http import RequestIdentity, adopt_baggage_tags, error_log, payload_attribute

WSGIApp = Callable[[dict, Callable[..., Any]], Iterable[bytes]]


def _environ_key(header: str) -> str:
    return "HTTP_" + header.upper().replace("-", "_")


class _TeeInput:
    """``wsgi.input`` that keeps the first ``limit`` bytes read for payload capture."""

    def __init__(self, stream: Any, limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self.chunks: list[bytes] = []
        self.size = 0

    def _keep(self, data: bytes) -> bytes:
        if self.size < self._limit:
            self.chunks.append(data[: self._limit - self.size])
        self.size += len(data)
        return data

    def read(self, *args: Any) -> bytes:
        return self._keep(self._stream.read(*args))

    def readline(self, *args: Any) -> bytes:
        return self._keep(self._stream.readline(*args))

    def readlines(self, *args: Any) -> list[bytes]:
        return [self._keep(line) for line in self._stream.readlines(*args)]

    def __iter__(self) -> Iterator[bytes]:
        for line in self._stream:
            yield self._keep(line)


class _InSpan:
    """Runs inside the server span: tags from baggage, payload capture, the ERROR log."""

    def __init__(self, app: WSGIApp, identity: RequestIdentity) -> None:
        self.app = app
        self.capture = identity.capture_payloads
        self.limit = identity.payload_limit

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        ctx = _CURRENT.get()
        if ctx is not None:
            adopt_baggage_tags(ctx)
        span = trace.get_current_span()
        tee = None
        if self.capture and span.is_recording():
            tee = environ["wsgi.input"] = _TeeInput(environ["wsgi.input"], self.limit)
        try:
            body = self.app(environ, start_response)
        except Exception:
            error_log.error("unhandled exception in %s %s", environ.get("REQUEST_METHOD"),
                            environ.get("PATH_INFO"), exc_info=True)
            raise
        if tee is not None:
            payload_attribute(span, "http.request.body", tee.chunks, tee.size, self.limit)
            return self._capture_response(span, body)
        return body

    def _capture_response(self, span: Any, body: Iterable[bytes]) -> Iterator[bytes]:
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in body:
                if size < self.limit:
                    chunks.append(chunk[: self.limit - size])
                size += len(chunk)
                yield chunk
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
            payload_attribute(span, "http.response.body", chunks, size, self.limit)


#: Environ key set by the outermost WSGIMiddleware, so a second one passes the request through.
_TRACED = "instrumentation.traced"


class WSGIMiddleware:
    """Traces every request and gives it an identity shared by its spans and logs.

    Keyword options are those of :class:`instrumentation._http.RequestIdentity` plus
    ``tracer_provider`` and ``meter_provider``.
    """

    def __init__(self, app: WSGIApp, *, tracer_provider: Any = None, meter_provider: Any = None,
                 **identity: Any) -> None:
        self.identity = RequestIdentity(**identity)
        self._rid_key = _environ_key(self.identity.request_id_header)
        self._uid_key = _environ_key(self.identity.user_id_header) if self.identity.user_id_header else None
        self._debug_key = _environ_key(self.identity.debug_header) if self.identity.debug_header else None
        self._rid_header = self.identity.request_id_header
        self._inner = app
        self.app = OpenTelemetryMiddleware(_InSpan(app, self.identity), tracer_provider=tracer_provider,
                                           meter_provider=meter_provider)

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        if _TRACED in environ:  # an outer WSGIMiddleware (the app's own, or auto-instrumentation's) has it
            return self._inner(environ, start_response)
        environ[_TRACED] = True
        get = environ.get
        ctx = self.identity.context(get(self._rid_key), get(self._uid_key) if self._uid_key else None,
                                   get(self._debug_key) if self._debug_key else None, environ)
        echo = (self._rid_header, ctx.request_id)

        def start_response_with_id(status: str, headers: list, exc_info: Any = None) -> Any:
            headers.append(echo)
            return start_response(status, headers, exc_info)

        token = _CURRENT.set(ctx)
        try:
            return self.app(environ, start_response_with_id)
        finally:
            _CURRENT.reset(token)


def record_exception(exc: BaseException) -> None:
    """Put ``exc`` (with its stack trace) on the current span and mark it ERROR."""
    span = trace.get_current_span()
    if span.is_recording():
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


def instrument_flask(app: Any, **options: Any) -> Any:
    """Wrap a Flask app's ``wsgi_app`` with :class:`WSGIMiddleware` and record its handled 500s on the span."""
    from flask import got_request_exception

    app.wsgi_app = WSGIMiddleware(app.wsgi_app, **options)

    def on_exception(_sender: Any, exception: BaseException, **_kw: Any) -> None:
        record_exception(exception)

    got_request_exception.connect(on_exception, app, weak=False)
    return app
