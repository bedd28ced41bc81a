"""``otlp``: OTLP over gRPC to Jaeger, Tempo, an OpenTelemetry Collector gateway, any OTLP endpoint.

Errors are classified once, here, as the OTLP specification says: CANCELLED,
DEADLINE_EXCEEDED, ABORTED, OUT_OF_RANGE, UNAVAILABLE and DATA_LOSS are retryable;
RESOURCE_EXHAUSTED only when the server says when to come back (``google.rpc.RetryInfo``
in ``grpc-status-details-bin``); everything else is permanent. A partial success is
an export whose rejected items are counted dropped (``rejected_by_backend``).
"""

from __future__ import annotations

import re
from pathlib import Path

import grpc
from google.rpc import error_details_pb2, status_pb2
from pydantic import Field, field_validator, model_validator

from sidecar.component import ExportError, Kind, PermanentError, RetryableError
from sidecar.config import ConfigModel, parse_endpoint
from sidecar.exporters.base import BaseExporter, Compression, ExporterConfig, partial_success
from sidecar.registry import CreateSettings, Factory
from sidecar.envelope import Envelope
from sidecar.signals import Signal

_SCHEME = re.compile(r"^(https?)://")


class GRPCClientTLSConfig(ConfigModel):
    """``tls``: as otelcol's configtls. A plaintext connection must be asked for with ``insecure: true``."""

    insecure: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure_skip_verify: bool = False

    @field_validator("insecure_skip_verify")
    @classmethod
    def _skip(cls, v: bool) -> bool:
        if v:
            raise ValueError("not supported by the gRPC exporter (gRPC Python always verifies the server); "
                             "set ca_file to the CA that signed the server's certificate")
        return v

    @model_validator(mode="after")
    def _pair(self) -> "GRPCClientTLSConfig":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be set together (client certificate and its key)")
        return self


class OTLPExporterConfig(ExporterConfig):
    #: host:port; ``http://host:port`` means plaintext, ``https://host:port`` means TLS
    endpoint: str
    tls: GRPCClientTLSConfig = Field(default_factory=GRPCClientTLSConfig)
    #: sent as gRPC metadata with every export (keys are lower-cased, as gRPC requires)
    headers: dict[str, str] = Field(default_factory=dict)
    compression: Compression = "gzip"

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        parse_endpoint(_SCHEME.sub("", v.rstrip("/")))
        return v


def _target(cfg: OTLPExporterConfig) -> tuple[str, bool]:
    """(host:port, use TLS) from the endpoint's scheme, else from ``tls.insecure``."""
    m = _SCHEME.match(cfg.endpoint)
    target = _SCHEME.sub("", cfg.endpoint.rstrip("/"))
    if m:
        return target, m.group(1) == "https"
    return target, not cfg.tls.insecure


# --- classification ---------------------------------------------------------------------------

_RETRYABLE = frozenset({
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS,
})


def retry_delay(trailing_metadata) -> float | None:
    """The server's ``google.rpc.RetryInfo.retry_delay`` in seconds, if its status details carry one."""
    for key, value in trailing_metadata or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
        except Exception:  # noqa: BLE001 - a garbled detail is no RetryInfo
            return None
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


def classify(code: grpc.StatusCode, message: str, trailing_metadata=None) -> ExportError:
    """One gRPC failure -> RetryableError (with the server's delay) or PermanentError."""
    text = f"gRPC {code.name}: {message}"
    delay = retry_delay(trailing_metadata)
    if code in _RETRYABLE:
        return RetryableError(text, retry_after=delay, reason=code.name.lower())
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and delay is not None:
        return RetryableError(text, retry_after=delay, reason="throttled")
    return PermanentError(text, reason=code.name.lower())


# --- the exporter -----------------------------------------------------------------------------

_METHODS = {
    Signal.TRACES: "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
    Signal.LOGS: "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
    Signal.METRICS: "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
}

#: The sidecar retries on its own schedule; the channel should not sit in a long reconnect
#: backoff (gRPC's default grows to 120 s) after the backend is back.
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 5000),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
)


class OTLPExporter(BaseExporter):
    def __init__(self, settings: CreateSettings, cfg: OTLPExporterConfig):
        super().__init__(settings, timeout=cfg.timeout, queue=cfg.sending_queue, retry=cfg.retry_on_failure)
        self.cfg = cfg
        self._metadata = tuple((k.lower(), v) for k, v in cfg.headers.items())
        self._channel: grpc.Channel | None = None
        self._export: dict[Signal, object] = {}

    def _open(self) -> None:
        target, secure = _target(self.cfg)
        compression = grpc.Compression.Gzip if self.cfg.compression == "gzip" else grpc.Compression.NoCompression
        if secure:
            channel = grpc.secure_channel(target, self._credentials(), options=_CHANNEL_OPTIONS,
                                          compression=compression)
        else:
            channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS, compression=compression)
        self._channel = channel
        # requests go on the wire as bytes we encode: a batch of queued requests is the
        # concatenation of their encodings (repeated top-level fields merge), with no copy
        self._export = {s: channel.unary_unary(path, request_serializer=None,
                                               response_deserializer=s.response_type.FromString)
                        for s, path in _METHODS.items()}

    def _credentials(self) -> grpc.ChannelCredentials:
        tls = self.cfg.tls

        def read(key: str, path: str | None) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as e:
                raise ValueError(f"exporters.{self.id}.tls.{key}: cannot read {path}: {e.strerror}") from None

        return grpc.ssl_channel_credentials(root_certificates=read("ca_file", tls.ca_file),
                                            private_key=read("key_file", tls.key_file),
                                            certificate_chain=read("cert_file", tls.cert_file))

    def _close(self) -> None:
        if self._channel is not None:
            self._channel.close()

    def push(self, envelope: Envelope, timeout: float) -> int:
        """Send the envelope's encoding as it is (received bytes, or queued encodings concatenated)."""
        signal = envelope.signal
        try:
            response = self._export[signal](envelope.encoded, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise classify(e.code(), e.details() or "", e.trailing_metadata()) from None
        except ValueError:
            if self._abort.is_set():  # the channel was closed under a straggler at the shutdown deadline
                raise RetryableError("exporter shut down", reason="shutdown") from None
            raise
        rejected, message = partial_success(signal, response)
        if rejected:
            self.log_partial_success(signal, rejected, message)
        return rejected


FACTORY = Factory(type="otlp", kind=Kind.EXPORTER, config_model=OTLPExporterConfig,
                  create=lambda settings, cfg, _next: OTLPExporter(settings, cfg))
