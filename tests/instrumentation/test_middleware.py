"""Middleware options in-process (ASGI via httpx's ASGI transport, WSGI via a direct call)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io

import httpx

from instrumentation import ASGIMiddleware, WSGIMiddleware, set_tags


async def echo_app(scope, receive, send):
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    set_tags(intent="echo")
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body[::-1]})


def call_asgi(app, headers=None, body=b""):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post("/x", headers=headers or {}, content=body)

    return asyncio.run(go())


def server_span(spans):
    return [s for s in spans.finished() if s.kind.name == "SERVER"][0]


def test_asgi_user_id_is_hmac_hashed_and_payloads_captured_with_limit(spans):
    app = ASGIMiddleware(echo_app, tracer_provider=spans.provider, user_id_header="X-User",
                         user_id_hmac_key=b"k", capture_payloads=True, payload_limit=5)
    resp = call_asgi(app, {"X-User": "alice", "baggage": "tag.tenant=acme"}, body=b"hello world")
    assert resp.text == "dlrow olleh"
    a = server_span(spans).attributes
    assert a["user.id"] == hmac.new(b"k", b"alice", hashlib.sha256).hexdigest()
    assert a["http.request.body"] == "hello" and a["http.request.body.truncated"] is True
    assert a["http.response.body"] == "dlrow"
    assert a["tag.intent"] == "echo" and a["tag.tenant"] == "acme"
    assert resp.headers["x-request-id"] == a["request.id"]


def test_asgi_payloads_are_not_captured_by_default(spans):
    call_asgi(ASGIMiddleware(echo_app, tracer_provider=spans.provider), body=b"secret")
    assert not any(k.startswith("http.request.body") for k in server_span(spans).attributes)


def test_asgi_user_id_callback(spans):
    app = ASGIMiddleware(echo_app, tracer_provider=spans.provider,
                         user_id_callback=lambda scope: "from-" + scope["path"])
    call_asgi(app)
    assert server_span(spans).attributes["user.id"] == "from-/x"


def test_wsgi_request_id_debug_header_and_payload(spans):
    def app(environ, start_response):
        data = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [data.upper()]

    mw = WSGIMiddleware(app, tracer_provider=spans.provider, capture_payloads=True)
    captured = {}

    def start_response(status, headers, exc_info=None):
        captured["headers"] = dict(headers)

    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/p", "SERVER_NAME": "t", "SERVER_PORT": "80",
               "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(b"ping"), "CONTENT_LENGTH": "4",
               "HTTP_X_REQUEST_ID": "abc", "HTTP_X_DEBUG_TRACE": "1"}
    body = b"".join(mw(environ, start_response))
    assert body == b"PING" and captured["headers"]["x-request-id"] == "abc"
    a = server_span(spans).attributes
    assert a["request.id"] == "abc" and a["sampling.force_keep"] is True
    assert a["http.request.body"] == "ping" and a["http.response.body"] == "PING"


def test_debug_requests_are_sampled_even_when_head_sampling_drops_everything():
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    from instrumentation import ForceKeepSampler, RequestContext, request_context

    tracer = TracerProvider(sampler=ForceKeepSampler(ALWAYS_OFF)).get_tracer("t")
    with tracer.start_as_current_span("normal") as normal:
        pass
    with request_context(RequestContext(request_id="r", force_keep=True)):
        with tracer.start_as_current_span("debug") as debug:
            pass
    assert not normal.get_span_context().trace_flags.sampled
    assert debug.get_span_context().trace_flags.sampled and debug.attributes["sampling.force_keep"] is True


def test_asgi_exception_without_a_response_is_recorded_once_and_reraised(spans):
    import pytest

    async def broken(scope, receive, send):
        raise RuntimeError("no response at all")

    app = ASGIMiddleware(broken, tracer_provider=spans.provider)

    async def go():
        await app({"type": "http", "method": "GET", "path": "/b", "headers": [], "query_string": b"",
                   "server": ("t", 80), "scheme": "http", "http_version": "1.1"}, None, None)

    with pytest.raises(RuntimeError):
        asyncio.run(go())
    events = [e for e in server_span(spans).events if e.name == "exception"]
    assert len(events) == 1 and "no response at all" in events[0].attributes["exception.stacktrace"]
