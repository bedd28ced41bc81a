"""What the ASGI and WSGI middleware share: reading request identity from headers, once per request."""

from __future__ import annotations

import hashlib
import hmac
import logging
import uuid
from collections.abc import Callable
from typing import Any

from opentelemetry import baggage, trace

from instrumentation._context import TAG_PREFIX, RequestContext

_TRUE = frozenset({"1", "true", "yes", "on"})
#: Logger for unhandled exceptions in requests (ERROR, with exc_info, inside the server span).
error_log = logging.getLogger("instrumentation.http")


def header_key(name: str) -> str:
    return name.strip().lower()


class RequestIdentity:
    """Request options decided once at middleware construction.

    ``user_id_callback`` receives the framework's request object (ASGI ``scope`` or WSGI
    ``environ``) and returns the user id or None. With ``user_id_hmac_key`` the user id
    is replaced by its HMAC-SHA256 (hex), so spans and logs never carry the raw id.
    """

    def __init__(self, *, request_id_header: str = "X-Request-ID", user_id_header: str | None = "X-User-ID",
                 user_id_callback: Callable[[Any], str | None] | None = None,
                 user_id_hmac_key: bytes | str | None = None, debug_header: str | None = "X-Debug-Trace",
                 capture_payloads: bool | None = None, payload_limit: int = 4096) -> None:
        self.request_id_header = header_key(request_id_header)
        self.user_id_header = header_key(user_id_header) if user_id_header else None
        self.user_id_callback = user_id_callback
        self._hmac_key = user_id_hmac_key.encode() if isinstance(user_id_hmac_key, str) else user_id_hmac_key
        self.debug_header = header_key(debug_header) if debug_header else None
        if capture_payloads is None:
            from instrumentation._setup import get_telemetry

            handle = get_telemetry()
            capture_payloads = bool(handle and handle.capture_payloads)
        self.capture_payloads = capture_payloads
        if payload_limit < 0:
            raise ValueError(f"payload_limit: must be >= 0, got {payload_limit}")
        self.payload_limit = payload_limit

    def context(self, request_id: str | None, user_id: str | None, debug: str | None, native: Any) -> RequestContext:
        if not request_id:
            request_id = str(uuid.uuid4())
        if self.user_id_callback is not None:
            user_id = self.user_id_callback(native)
        if user_id and self._hmac_key is not None:
            user_id = hmac.new(self._hmac_key, user_id.encode(), hashlib.sha256).hexdigest()
        force = bool(debug) and debug.strip().lower() in _TRUE
        return RequestContext(request_id=request_id, user_id=user_id or None, force_keep=force)


def adopt_baggage_tags(ctx: RequestContext) -> None:
    """Take ``tag.*`` entries of incoming W3C baggage (extracted by the OTel middleware) as request tags."""
    entries = baggage.get_all()
    if not entries:
        return
    tags = {k[len(TAG_PREFIX):]: str(v) for k, v in entries.items() if k.startswith(TAG_PREFIX)}
    if tags:
        ctx.tags.update(tags)
        attrs = {TAG_PREFIX + k: v for k, v in tags.items()}
        ctx.span_attributes.update(attrs)
        trace.get_current_span().set_attributes(attrs)


def payload_attribute(span: Any, name: str, chunks: list[bytes], size: int, limit: int) -> None:
    """Record a captured body (truncated to ``limit`` bytes) on ``span`` as ``name``."""
    body = b"".join(chunks)[:limit]
    span.set_attribute(name, body.decode("utf-8", "replace"))
    if size > limit:
        span.set_attribute(name + ".truncated", True)
