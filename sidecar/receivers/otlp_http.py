"""The OTLP/HTTP side of the ``otlp`` receiver: a WSGI app taking protobuf or JSON, optionally gzip.

Every request it parses goes to :meth:`OTLPReceiver.ingest`, the one path gRPC requests take
too; every answer that is not 200 is a :class:`~sidecar.receivers.outcomes.Rejected`.
"""

from __future__ import annotations

import json
import math
import threading
import time
from http import HTTPStatus
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from sidecar.otlp_json import OTLPJSONError, from_json
from sidecar.receivers.gzip_body import GzipError, gunzip
from sidecar.receivers.outcomes import Rejected
from sidecar.receivers.parsing import received_parser
from sidecar.signals import Signal

if TYPE_CHECKING:
    from sidecar.receivers.otlp import HTTPServerConfig, OTLPReceiver

_PROTOBUF = "application/x-protobuf"
_JSON = "application/json"


def _status_line(code: int) -> str:
    return f"{code} {HTTPStatus(code).phrase}"


class OTLPHTTPApp:
    """The WSGI app behind OTLP/HTTP: POST protobuf or JSON, optionally gzip, to one path per signal."""

    def __init__(self, receiver: "OTLPReceiver", cfg: "HTTPServerConfig"):
        self._receiver = receiver
        self._limit = cfg.max_request_body_size
        self._inflated_limit = cfg.max_decompressed_body_size or cfg.max_request_body_size
        self._inflated_key = "max_decompressed_body_size" if cfg.max_decompressed_body_size else "max_request_body_size"
        self._max_members = cfg.max_gzip_members
        self._paths = {cfg.traces_url_path: Signal.TRACES, cfg.logs_url_path: Signal.LOGS,
                       cfg.metrics_url_path: Signal.METRICS}
        self._ok = {(s, False): s.response_type().SerializeToString() for s in Signal}
        self._ok.update({(s, True): b"{}" for s in Signal})
        self._parsers = {s: received_parser(s) for s in Signal}
        self._inflight = 0
        self._idle = threading.Condition()
        self._draining = False

    def drain(self, deadline: float) -> None:
        """Answer new requests with 503 and wait for those in flight, until ``deadline``."""
        with self._idle:
            self._draining = True
            while self._inflight and time.monotonic() < deadline:
                self._idle.wait(max(0.0, deadline - time.monotonic()))

    def __call__(self, environ, start_response):
        with self._idle:
            self._inflight += 1
        try:
            return self._handle(environ, start_response)
        finally:
            with self._idle:
                self._inflight -= 1
                if not self._inflight:
                    self._idle.notify_all()

    def _handle(self, environ, start_response):
        media = environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower()
        as_json = media != _PROTOBUF  # errors for unknown types are answered in JSON, the readable one
        signal = self._paths.get(environ.get("PATH_INFO", ""))
        try:
            if signal is None:
                raise self._rejected(None, "not_found", f"no OTLP signal at {environ.get('PATH_INFO')!r}", 404)
            if environ["REQUEST_METHOD"] != "POST":
                raise self._rejected(signal, "method_not_allowed", "only POST is allowed", 405)
            if self._draining:
                raise self._rejected(signal, "shutting_down", "the receiver is shutting down", 503,
                                     grpc.StatusCode.UNAVAILABLE, retry_after=1.0)
            if media != _PROTOBUF and media != _JSON:
                raise self._rejected(signal, "unsupported_media_type",
                                     f"unsupported Content-Type {media or '(none)'!r}; use {_PROTOBUF} or {_JSON}", 415)
            body = self._read_body(signal, environ)
            admitted = self._receiver.admit(len(body), "http")  # before parsing: is there memory for it?
            try:
                try:
                    if as_json:
                        request = from_json(signal, body)
                    else:
                        request = self._parsers[signal](body)
                except OTLPJSONError as e:
                    raise self._rejected(signal, "invalid", f"invalid OTLP/JSON {signal.value} request: {e}",
                                         400) from None
                except (DecodeError, RecursionError, ValueError) as e:  # hostile bytes: the client's error
                    raise self._rejected(signal, "invalid", f"invalid OTLP {'JSON' if as_json else 'protobuf'} "
                                         f"{signal.value} request: {e}"[:300], 400) from None
                self._receiver.ingest(signal, request, "http", None if as_json else body)
            finally:
                self._receiver.admitted(admitted)
        except Rejected as rej:
            return self._error(start_response, rej, as_json, signal)
        body = self._ok[(signal, as_json)]
        start_response("200 OK", [("Content-Type", _JSON if as_json else _PROTOBUF),
                                  ("Content-Length", str(len(body)))])
        return [body]

    def _read_body(self, signal: Signal, environ) -> bytes:
        encoding = environ.get("HTTP_CONTENT_ENCODING", "").strip().lower()
        if encoding not in ("", "identity", "gzip"):
            raise self._rejected(signal, "unsupported_media_type",
                                 f"unsupported Content-Encoding {encoding!r}; use gzip or none", 415)
        limit = self._limit
        declared = environ.get("CONTENT_LENGTH") or ""
        try:
            length = int(declared) if declared else -1
        except ValueError:
            raise self._rejected(signal, "invalid", f"invalid Content-Length {declared!r}", 400) from None
        if length > limit:
            raise self._too_large(signal, f"body of {length} bytes")
        body = environ["wsgi.input"].read(length if length >= 0 else limit + 1)
        if len(body) > limit:
            raise self._too_large(signal, "body")
        if encoding == "gzip":
            body = self._gunzip(signal, body)
        return body

    def _gunzip(self, signal: Signal, body: bytes) -> bytes:
        """Decompress at most ``limit`` bytes, in linear time: a small body that inflates without bound is refused early."""
        try:
            return gunzip(body, self._inflated_limit, self._max_members)
        except GzipError as e:
            if e.too_large:
                raise self._rejected(signal, "too_large", f"decompressed body exceeds {self._inflated_key} "
                                     f"({self._inflated_limit} bytes)", 413,
                                     grpc.StatusCode.RESOURCE_EXHAUSTED) from None
            raise self._rejected(signal, "invalid", f"invalid gzip body: {e}", 400) from None

    def _too_large(self, signal: Signal, what: str) -> Rejected:
        return self._rejected(signal, "too_large", f"{what} exceeds max_request_body_size ({self._limit} bytes)", 413,
                              grpc.StatusCode.RESOURCE_EXHAUSTED)

    def _rejected(self, signal: Signal | None, reason: str, message: str, http_status: int,
                  grpc_code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT,
                  retry_after: float | None = None) -> Rejected:
        return self._receiver.reject("http", Rejected(reason, message, grpc_code, http_status, retry_after))

    def _error(self, start_response, rej: Rejected, as_json: bool, signal: Signal | None):
        code = rej.grpc_code.value[0]
        if as_json:
            body = json.dumps({"code": code, "message": rej.message}).encode()
        else:
            body = status_pb2.Status(code=code, message=rej.message).SerializeToString()
        headers = [("Content-Type", _JSON if as_json else _PROTOBUF), ("Content-Length", str(len(body)))]
        if rej.http_status == 405:
            headers.append(("Allow", "POST"))
        if rej.retry_after is not None and rej.http_status in (429, 503):
            headers.append(("Retry-After", str(max(1, math.ceil(rej.retry_after)))))
        start_response(_status_line(rej.http_status), headers)
        return [body]
