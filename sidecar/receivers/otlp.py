"""The ``otlp`` receiver: OTLP/gRPC and OTLP/HTTP (protobuf and JSON) in, Export*ServiceRequest out.

Each request is checked (ids of the right length) while its items are counted, in one
pass, and then handed whole to the next stage. The answer tells an OTLP client what to do:

    outcome                              gRPC                               HTTP
    accepted                             OK                                 200 + Export*ServiceResponse
    malformed / not retryable refusal    INVALID_ARGUMENT                   400 + google.rpc.Status
    Refused("memory_limit")              RESOURCE_EXHAUSTED + RetryInfo     429 + Retry-After
    Refused, other retryable             UNAVAILABLE (+ RetryInfo)          503 + Retry-After

Oversized gRPC messages are refused by the handler (RESOURCE_EXHAUSTED, counted ``too_large``) up to
twice ``max_recv_msg_size_mib``; beyond that grpc refuses them itself, before a handler runs and
uncounted (as waitress does for HTTP bodies over twice ``max_request_body_size``).
"""

from __future__ import annotations

import logging
import time
from concurrent import futures
from typing import Callable

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import Counter
from pydantic import Field, field_validator, model_validator

from sidecar import wire
from sidecar.component import Component, Consumer, Kind, Refused
from sidecar.config import ConfigModel, Duration, HostPort, split_host_port
from sidecar.envelope import Envelope
from sidecar.exporters.base import RateLimitedLog
from sidecar.receivers.otlp_http import OTLPHTTPApp
from sidecar.receivers.outcomes import Rejected, classify, retry_info_trailer
from sidecar.receivers.parsing import received_parser
from sidecar.registry import ALL_SIGNALS, CreateSettings, Factory
from sidecar.signals import Request, Signal, count_items

log = logging.getLogger(__name__)

_MIB = 1024 * 1024


# --- config -------------------------------------------------------------------------------------


class GRPCServerConfig(ConfigModel):
    """``protocols.grpc``: the OTLP/gRPC server."""

    endpoint: HostPort = "127.0.0.1:4317"
    #: Largest request accepted, in MiB (after decompression); bigger ones get RESOURCE_EXHAUSTED.
    max_recv_msg_size_mib: int = Field(4, ge=1, le=2047)
    #: HTTP/2 streams per client connection; 0 leaves grpc's default.
    max_concurrent_streams: int = Field(0, ge=0)
    #: Threads running request handlers (the grpcio server's thread pool).
    workers: int = Field(8, ge=1, le=256)


class HTTPServerConfig(ConfigModel):
    """``protocols.http``: the OTLP/HTTP server (protobuf and JSON bodies).

    The limits keep one client from blinding the receiver: slow or lying clients (slowloris, a
    ``Content-Length`` larger than the body) are cut off by the read timeouts and counted in
    ``sidecar_receiver_requests_refused_total{reason="read_header_timeout"|"read_timeout"}``;
    a gzip bomb by the decompressed-size and member limits (``reason="too_large"`` / ``"invalid"``).
    """

    endpoint: HostPort = "127.0.0.1:4318"
    #: Largest body accepted as received, in bytes (bigger: 413).
    max_request_body_size: int = Field(20 * _MIB, ge=1)
    #: Largest body after gzip decompression, in bytes (bigger: 413); default: ``max_request_body_size``.
    max_decompressed_body_size: int | None = Field(None, ge=1)
    #: Most gzip members one body may hold (decompression work per request); OTLP clients send one.
    max_gzip_members: int = Field(64, ge=1)
    #: Open connections at most; more wait in the listen backlog until one closes.
    max_connections: int = Field(512, ge=1, le=65536)
    #: Time from a request's first byte until its headers are in (otelcol confighttp's name).
    read_header_timeout: Duration = 10.0
    #: Time from a request's first byte until its whole body is in.
    read_timeout: Duration = 30.0
    #: A keep-alive connection with no request for this long is closed.
    idle_timeout: Duration = 60.0
    traces_url_path: str = "/v1/traces"
    logs_url_path: str = "/v1/logs"
    metrics_url_path: str = "/v1/metrics"
    #: Threads running requests (waitress).
    workers: int = Field(4, ge=1, le=256)

    @field_validator("traces_url_path", "logs_url_path", "metrics_url_path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"must start with '/', got {v!r}")
        return v

    @field_validator("read_header_timeout", "read_timeout", "idle_timeout")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be > 0")
        return v

    @model_validator(mode="after")
    def _distinct(self) -> "HTTPServerConfig":
        paths = (self.traces_url_path, self.logs_url_path, self.metrics_url_path)
        if len(set(paths)) != 3:
            raise ValueError("traces_url_path, logs_url_path and metrics_url_path must differ")
        return self


class ProtocolsConfig(ConfigModel):
    """A protocol left out is disabled; an empty mapping (``grpc:``) enables it with defaults."""

    grpc: GRPCServerConfig | None = None
    http: HTTPServerConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _empty_means_defaults(cls, data):
        if isinstance(data, dict):
            return {k: {} if v is None and k in ("grpc", "http") else v for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _at_least_one(self) -> "ProtocolsConfig":
        if self.grpc is None and self.http is None:
            raise ValueError("at least one of grpc or http must be configured (an empty `grpc:` means defaults)")
        return self


class OTLPReceiverConfig(ConfigModel):
    protocols: ProtocolsConfig = Field(default={}, validate_default=True)

    @field_validator("protocols", mode="before")
    @classmethod
    def _none_is_empty(cls, v):
        return {} if v is None else v


# --- checking requests: ids of the right length, counted in the same pass -------------------------


def _check_traces(req) -> int:
    """Spans in the request, or -1 if a span's own ids have the wrong length.

    Span links are not checked: reading ``span.links`` costs as much as the three id checks together.
    """
    n = 0
    for rs in req.resource_spans:
        for ss in rs.scope_spans:
            spans = ss.spans
            n += len(spans)
            for span in spans:
                if len(span.trace_id) != 16 or len(span.span_id) != 8:
                    return -1
                parent = len(span.parent_span_id)
                if parent and parent != 8:
                    return -1
    return n


def _check_logs(req) -> int:
    """Log records in the request, or -1 if a trace or span id has the wrong length."""
    n = 0
    for rl in req.resource_logs:
        for sl in rl.scope_logs:
            records = sl.log_records
            n += len(records)
            for rec in records:
                t = len(rec.trace_id)
                s = len(rec.span_id)
                if (t and t != 16) or (s and s != 8):
                    return -1
    return n


def _check_metrics(req) -> int:
    """Data points in the request, or -1 if an exemplar id has the wrong length."""
    n = 0
    for rm in req.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                if kind is None:
                    continue
                points = getattr(m, kind).data_points
                n += len(points)
                if kind == "summary":  # summary points carry no exemplars
                    continue
                for dp in points:
                    if dp.exemplars:
                        for ex in dp.exemplars:
                            t = len(ex.trace_id)
                            s = len(ex.span_id)
                            if (t and t != 16) or (s and s != 8):
                                return -1
    return n


_CHECKERS: dict[Signal, Callable[[Request], int]] = {
    Signal.TRACES: _check_traces, Signal.LOGS: _check_logs, Signal.METRICS: _check_metrics,
}

def _check(signal: Signal, request: Request | None, raw: bytes | None) -> int:
    """Items in the request, or -1 when an id has the wrong length: the wire scanner checks the received
    protobuf (the same rules), the message is checked for JSON input and metrics."""
    if raw is not None and signal is not Signal.METRICS:
        return wire.check_ids(raw, signal is Signal.LOGS)
    return _CHECKERS[signal](request)


def _id_problem(value: bytes, want: int, may_be_empty: bool) -> str | None:
    got = len(value)
    if got == want or (may_be_empty and got == 0):
        return None
    return f"must be {'empty or ' if may_be_empty else ''}{want} bytes, got {got}"


def describe_bad_id(signal: Signal, req: Request) -> str:
    """The first wrong-length id as ``path.to.field: must be 16 bytes, got 5`` (the slow path, on rejection)."""
    def first(checks):
        for path, value, want, may_be_empty in checks:
            problem = _id_problem(value, want, may_be_empty)
            if problem:
                return f"{path}: {problem}"
        return "invalid id"

    def traces():
        for i, rs in enumerate(req.resource_spans):
            for j, ss in enumerate(rs.scope_spans):
                for k, span in enumerate(ss.spans):
                    p = f"resource_spans[{i}].scope_spans[{j}].spans[{k}]"
                    yield f"{p}.trace_id", span.trace_id, 16, False
                    yield f"{p}.span_id", span.span_id, 8, False
                    yield f"{p}.parent_span_id", span.parent_span_id, 8, True

    def logs():
        for i, rl in enumerate(req.resource_logs):
            for j, sl in enumerate(rl.scope_logs):
                for k, rec in enumerate(sl.log_records):
                    p = f"resource_logs[{i}].scope_logs[{j}].log_records[{k}]"
                    yield f"{p}.trace_id", rec.trace_id, 16, True
                    yield f"{p}.span_id", rec.span_id, 8, True

    def metrics():
        for i, rm in enumerate(req.resource_metrics):
            for j, sm in enumerate(rm.scope_metrics):
                for k, m in enumerate(sm.metrics):
                    kind = m.WhichOneof("data")
                    if kind is None or kind == "summary":
                        continue
                    for d, dp in enumerate(getattr(m, kind).data_points):
                        for e, ex in enumerate(dp.exemplars):
                            p = (f"resource_metrics[{i}].scope_metrics[{j}].metrics[{k}]"
                                 f".{kind}.data_points[{d}].exemplars[{e}]")
                            yield f"{p}.trace_id", ex.trace_id, 16, True
                            yield f"{p}.span_id", ex.span_id, 8, True

    return first({Signal.TRACES: traces, Signal.LOGS: logs, Signal.METRICS: metrics}[signal]())


# --- the receiver -----------------------------------------------------------------------------------


def _answer(rej: Rejected, protocol: str) -> str:
    return str(rej.http_status) if protocol == "http" else rej.grpc_code.name


class OTLPReceiver(Component):
    def __init__(self, settings: CreateSettings, config: OTLPReceiverConfig, next_consumer: Consumer):
        self.id = str(settings.id)
        self.config = config
        self._next = next_consumer
        self._telemetry = settings.telemetry
        self._requests_refused: Counter = settings.telemetry.root.family(
            Counter, "sidecar_receiver_requests_refused",
            "Requests a receiver answered with an error, by protocol and reason (malformed ones carry no items).",
            ("component", "protocol", "reason"))
        self._refused_children: dict[tuple[str, str], object] = {}
        self._log = RateLimitedLog(log, interval=10.0)
        self._admission: list = []  # host.admission: asked before parsing (the memory limiter's budget)
        self._grpc_server: grpc.Server | None = None
        self._http_server = None
        self.grpc_port: int | None = None
        self.http_port: int | None = None
        self._http_app: OTLPHTTPApp | None = None

    # the one path every request takes, whatever its protocol
    def ingest(self, signal: Signal, request: Request | None, protocol: str, raw: bytes | None = None) -> None:
        """Check ``request``, put it in an envelope and hand it down; raise :class:`Rejected` otherwise.

        ``raw`` is the protobuf the request was parsed from, or (``request`` None) checked as the parser
        would by :func:`received_parser`: it travels in the envelope, so stages that need the encoding
        reuse it, and the message is parsed only if a stage reads it. Items are counted here, once, for
        every stage after.
        The pipeline's edge out of this receiver counts received / accepted / refused.
        """
        try:
            n = _check(signal, request, raw)
        except Exception as e:  # whatever the client's bytes make the checker raise is the client's error
            raise self.reject(protocol, Rejected(
                "invalid", f"invalid OTLP {signal.value} request: {type(e).__name__}: {e}"[:300],
                grpc.StatusCode.INVALID_ARGUMENT, 400)) from None
        if n < 0:
            if request is None:
                request = signal.request_type.FromString(raw)  # checked: the slow path of a rejection
            n = count_items(signal, request)
            self._telemetry.received(signal, n)
            self._telemetry.refused(signal, n, "invalid")  # refused here, at its source
            raise self.reject(protocol, Rejected(
                "invalid", describe_bad_id(signal, request), grpc.StatusCode.INVALID_ARGUMENT, 400))
        if n == 0:
            return  # nothing to deliver
        try:
            self._next.consume(Envelope(signal, request, encoded=raw, items=n))
        except Refused as e:
            raise self.reject(protocol, classify(e)) from None
        except Exception as e:  # a bug downstream must not take the server down; its traceback now and then
            self._log.log(logging.ERROR, ("internal", signal), "%s: the pipeline failed on a %s request",
                          self.id, signal.value, exc_info=True)
            raise self.reject(protocol, Rejected(
                "internal", f"internal error: {type(e).__name__}", grpc.StatusCode.INTERNAL, 500)) from None

    def admit(self, nbytes: int, protocol: str) -> int:
        """Before parsing ``nbytes``: raise the rejection (retryable) when the memory budget has no room;
        else return what to hand to :meth:`admitted` once the request has been handed on."""
        for i, budget in enumerate(self._admission):
            refused = budget.admit(nbytes)
            if refused is not None:
                for earlier in self._admission[:i]:
                    earlier.admitted(nbytes)
                raise self.reject(protocol, classify(refused))
        return nbytes

    def admitted(self, nbytes: int) -> None:
        for budget in self._admission:
            budget.admitted(nbytes)

    def reject(self, protocol: str, rej: Rejected) -> Rejected:
        """Count a refused request (``sidecar_receiver_requests_refused``), log a one-line summary at most
        every few seconds per (protocol, reason), and return the rejection to raise."""
        key = (protocol, rej.reason)
        child = self._refused_children.get(key)
        if child is None:
            child = self._refused_children[key] = self._requests_refused.labels(self.id, protocol, rej.reason)
        child.inc()
        if rej.reason != "internal":  # logged with its traceback where it happened
            self._log.log(logging.INFO if rej.retry_after is not None else logging.WARNING, key,
                          "%s: refused an OTLP/%s request (%s, %s): %s", self.id, protocol.upper() if protocol == "http"
                          else "gRPC", rej.reason, _answer(rej, protocol), rej.message[:200].replace("\n", " "))
        return rej

    def _http_timed_out(self, reason: str) -> None:
        """A slow or lying HTTP client was cut off (on the server's event loop: count, log at most now and then)."""
        self.reject("http", Rejected(reason, "connection closed: request too slow", grpc.StatusCode.DEADLINE_EXCEEDED,
                                     408))

    # lifecycle
    def start(self, host) -> None:
        self._admission = getattr(host, "admission", None) or []
        try:
            if self.config.protocols.grpc is not None:
                self._start_grpc(self.config.protocols.grpc)
            if self.config.protocols.http is not None:
                self._start_http(self.config.protocols.http)
        except Exception:
            self.shutdown(time.monotonic())
            raise

    def _start_grpc(self, cfg: GRPCServerConfig) -> None:
        # grpc itself refuses (uncounted) only past twice the limit; the handler refuses and counts the rest
        options = [("grpc.max_receive_message_length", min(2 * cfg.max_recv_msg_size_mib * _MIB, 2**31 - 1)),
                   ("grpc.so_reuseport", 0)]  # a port already in use must fail start-up, not be shared
        if cfg.max_concurrent_streams:
            options.append(("grpc.max_concurrent_streams", cfg.max_concurrent_streams))
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix=f"{self.id}-grpc"),
                             options=options)
        limit = cfg.max_recv_msg_size_mib * _MIB
        server.add_generic_rpc_handlers([_GRPCService(self, signal, limit).handler() for signal in Signal])
        try:
            port = server.add_insecure_port(cfg.endpoint)
        except RuntimeError:  # grpcio >= 1.60 raises; older versions return 0
            port = 0
        if not port:
            raise OSError(f"receivers.{self.id}: cannot listen for OTLP/gRPC on {cfg.endpoint}: "
                          "the address is in use or cannot be bound")
        server.start()
        self._grpc_server = server
        self.grpc_port = port
        log.info("%s: OTLP/gRPC on %s", self.id, cfg.endpoint)

    def _start_http(self, cfg: HTTPServerConfig) -> None:
        from sidecar.httpserver import BackgroundHTTPServer

        app = OTLPHTTPApp(self, cfg)
        host, port = split_host_port(cfg.endpoint)
        try:
            # Waitress refuses bodies over twice the limit before buffering them; the app answers the
            # rest itself, so most oversized requests are counted.
            server = BackgroundHTTPServer(app, host, port, name=f"{self.id}-http", threads=cfg.workers,
                                          max_request_body_size=2 * cfg.max_request_body_size,
                                          asyncore_use_poll=True, max_connections=cfg.max_connections,
                                          read_header_timeout=cfg.read_header_timeout,
                                          read_timeout=cfg.read_timeout, idle_timeout=cfg.idle_timeout,
                                          on_timeout=self._http_timed_out)
        except OSError as e:
            raise OSError(f"receivers.{self.id}: cannot listen for OTLP/HTTP on {cfg.endpoint}: "
                          f"{e.strerror or e}") from None
        server.start()
        self._http_app = app
        self._http_server = server
        self.http_port = server.port
        log.info("%s: OTLP/HTTP on %s", self.id, cfg.endpoint)

    def shutdown(self, deadline: float) -> None:
        """Refuse new requests, let in-flight ones finish before ``deadline``, then close the sockets."""
        grace = max(0.0, deadline - time.monotonic())
        stopped = self._grpc_server.stop(grace) if self._grpc_server is not None else None
        if self._http_server is not None:
            self._http_app.drain(deadline)
            self._http_server.stop(timeout=max(0.5, deadline - time.monotonic()))
            self._http_server = None
        if stopped is not None:
            stopped.wait(max(0.0, deadline - time.monotonic()) + 0.5)
            self._grpc_server = None


_GRPC_SERVICES = {
    Signal.TRACES: "opentelemetry.proto.collector.trace.v1.TraceService",
    Signal.LOGS: "opentelemetry.proto.collector.logs.v1.LogsService",
    Signal.METRICS: "opentelemetry.proto.collector.metrics.v1.MetricsService",
}


class _GRPCService:
    """The Export method of one OTLP gRPC service.

    It takes the request as bytes and checks it itself (what grpc's deserializer would do, see
    :func:`received_parser`), so a malformed message is answered INVALID_ARGUMENT with the reason
    and the received encoding can travel with the request.
    """

    def __init__(self, receiver: OTLPReceiver, signal: Signal, max_bytes: int):
        self._receiver = receiver
        self._max_bytes = max_bytes
        self._ingest = receiver.ingest
        self._signal = signal
        self._parse = received_parser(signal)
        self._ok = signal.response_type()  # empty and never mutated: safe to share

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.unary_unary_rpc_method_handler(
            self.Export, request_deserializer=None, response_serializer=self._signal.response_type.SerializeToString)
        return grpc.method_handlers_generic_handler(_GRPC_SERVICES[self._signal], {"Export": method})

    def Export(self, raw: bytes, context):  # noqa: N802 - gRPC method name
        try:
            if len(raw) > self._max_bytes:
                raise self._receiver.reject("grpc", Rejected(
                    "too_large", f"message of {len(raw)} bytes exceeds max_recv_msg_size_mib "
                    f"({self._max_bytes // _MIB} MiB)", grpc.StatusCode.RESOURCE_EXHAUSTED, 413))
            admitted = self._receiver.admit(len(raw), "grpc")
            try:
                try:
                    request = self._parse(raw)
                except Exception as e:  # DecodeError, or whatever else hostile bytes make the parser raise
                    raise self._receiver.reject("grpc", Rejected(
                        "invalid", f"invalid OTLP protobuf {self._signal.value} request: {e}"[:300],
                        grpc.StatusCode.INVALID_ARGUMENT, 400)) from None
                self._ingest(self._signal, request, "grpc", raw)
            finally:
                self._receiver.admitted(admitted)
        except Rejected as rej:
            if rej.retry_after is not None:
                context.set_trailing_metadata(retry_info_trailer(rej))
            context.abort(rej.grpc_code, rej.message)
        return self._ok


FACTORY = Factory(
    type="otlp",
    kind=Kind.RECEIVER,
    config_model=OTLPReceiverConfig,
    create=lambda settings, cfg, next_consumer: OTLPReceiver(settings, cfg, next_consumer),
    signals=ALL_SIGNALS,
    telemetry=frozenset({"sidecar_receiver_requests_refused"}),
)
