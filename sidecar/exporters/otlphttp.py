"""``otlphttp``: OTLP over HTTP (protobuf or JSON) to any OTLP/HTTP endpoint (Loki, Tempo, a gateway).

Retryable: 429, 502, 503, 504 (honouring ``Retry-After`` in seconds or as an HTTP date)
and connection errors or timeouts; any other non-2xx status is permanent and its
message carries the status and the start of the body. One thread-safe keep-alive
connection pool serves every worker.
"""

from __future__ import annotations

import email.utils
import gzip
import logging
import time
from typing import Callable, Literal

import urllib3
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from pydantic import Field, field_validator, model_validator

from sidecar import otlp_json
from sidecar.component import ExportError, Kind, PermanentError, RetryableError
from sidecar.config import ConfigModel
from sidecar.exporters.base import BaseExporter, Compression, ExporterConfig, partial_success
from sidecar.registry import CreateSettings, Factory
from sidecar.envelope import Envelope
from sidecar.signals import Signal

log = logging.getLogger(__name__)

_PATHS = {Signal.TRACES: "/v1/traces", Signal.LOGS: "/v1/logs", Signal.METRICS: "/v1/metrics"}
_RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
_CONTENT_TYPE = {"proto": "application/x-protobuf", "json": "application/json"}


class HTTPClientTLSConfig(ConfigModel):
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    #: do not verify the server's certificate (testing only: anyone in the path can read the data)
    insecure_skip_verify: bool = False

    @model_validator(mode="after")
    def _pair(self) -> "HTTPClientTLSConfig":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be set together (client certificate and its key)")
        return self


class OTLPHTTPExporterConfig(ExporterConfig):
    #: base URL; /v1/traces, /v1/logs and /v1/metrics are appended
    endpoint: str | None = None
    #: full URLs that override ``endpoint`` for one signal
    traces_endpoint: str | None = None
    logs_endpoint: str | None = None
    metrics_endpoint: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    compression: Compression = "gzip"
    encoding: Literal["proto", "json"] = "proto"
    tls: HTTPClientTLSConfig = Field(default_factory=HTTPClientTLSConfig)

    @field_validator("endpoint", "traces_endpoint", "logs_endpoint", "metrics_endpoint")
    @classmethod
    def _check_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"expected a URL starting with http:// or https://, got {v!r}")
        return v

    @model_validator(mode="after")
    def _some_endpoint(self) -> "OTLPHTTPExporterConfig":
        if self.endpoint is None and not (self.traces_endpoint or self.logs_endpoint or self.metrics_endpoint):
            raise ValueError("endpoint: required (or traces_endpoint / logs_endpoint / metrics_endpoint)")
        return self

    def url(self, signal: Signal) -> str | None:
        own = getattr(self, f"{signal.value}_endpoint")
        if own:
            return own
        return self.endpoint.rstrip("/") + _PATHS[signal] if self.endpoint else None


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """``Retry-After`` as delay-seconds or an HTTP-date -> seconds from now (None when absent or invalid)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - now())


def classify_status(status: int, body: bytes, retry_after: str | None, url: str) -> ExportError:
    snippet = body[:256].decode("utf-8", "replace").strip()
    text = f"POST {url}: HTTP {status}" + (f": {snippet}" if snippet else "")
    if status in _RETRYABLE_STATUS:
        return RetryableError(text, retry_after=parse_retry_after(retry_after), reason=f"http_{status}")
    return PermanentError(text, reason=f"http_{status}")


class OTLPHTTPExporter(BaseExporter):
    def __init__(self, settings: CreateSettings, cfg: OTLPHTTPExporterConfig):
        super().__init__(settings, timeout=cfg.timeout, queue=cfg.sending_queue, retry=cfg.retry_on_failure)
        self.cfg = cfg
        self._urls = {s: cfg.url(s) for s in Signal}
        self._headers = {**cfg.headers, "Content-Type": _CONTENT_TYPE[cfg.encoding],
                         "User-Agent": "torch-otel-sidecar"}
        if cfg.compression == "gzip":
            self._headers["Content-Encoding"] = "gzip"
        self._gzip = cfg.compression == "gzip"
        self._json = cfg.encoding == "json"
        self._pool: urllib3.PoolManager | None = None

    def _open(self) -> None:
        tls = self.cfg.tls
        kwargs: dict = {"ca_certs": tls.ca_file, "cert_file": tls.cert_file, "key_file": tls.key_file}
        if tls.insecure_skip_verify:
            log.warning("%s: tls.insecure_skip_verify is set: the server's certificate is not checked", self.id)
            kwargs.update(cert_reqs="CERT_NONE", assert_hostname=False)
        self._pool = urllib3.PoolManager(num_pools=3, maxsize=max(1, self.cfg.sending_queue.num_consumers),
                                         retries=False, **kwargs)

    def _close(self) -> None:
        if self._pool is not None:
            self._pool.clear()

    def push(self, envelope: Envelope, timeout: float) -> int:
        """protobuf: the encoding as it is (received, or queued encodings concatenated); json: the message."""
        signal = envelope.signal
        if self._json:
            return self._post(signal, otlp_json.to_json(signal, envelope.message).encode(), timeout)
        return self._post(signal, envelope.encoded, timeout)

    def _post(self, signal: Signal, body: bytes, timeout: float) -> int:
        url = self._urls[signal]
        if url is None:
            raise PermanentError(f"no endpoint for {signal.value}: set endpoint or {signal.value}_endpoint")
        if self._gzip:
            body = gzip.compress(body, compresslevel=6)
        try:
            r = self._pool.request("POST", url, body=body, headers=self._headers,
                                   timeout=urllib3.Timeout(total=timeout), retries=False, redirect=False)
        except urllib3.exceptions.HTTPError as e:
            raise RetryableError(f"POST {url}: {e}", reason="connection") from None
        try:
            data = r.data
        finally:
            r.release_conn()  # back to the pool for keep-alive, or closed by _close
        if not 200 <= r.status < 300:
            raise classify_status(r.status, data, r.headers.get("Retry-After"), url)
        rejected, message = self._partial_success(signal, data, r.headers.get("Content-Type") or "")
        if rejected:
            self.log_partial_success(signal, rejected, message)
        return rejected

    @staticmethod
    def _partial_success(signal: Signal, data: bytes, content_type: str) -> tuple[int, str]:
        if not data:
            return 0, ""
        response = signal.response_type()
        try:
            if "json" in content_type:
                json_format.Parse(data, response, ignore_unknown_fields=True)
            else:
                response.ParseFromString(data)
        except (DecodeError, json_format.ParseError, UnicodeDecodeError):
            return 0, ""  # delivered; a body we cannot read says nothing about rejections
        return partial_success(signal, response)


FACTORY = Factory(type="otlphttp", kind=Kind.EXPORTER, config_model=OTLPHTTPExporterConfig,
                  create=lambda settings, cfg, _next: OTLPHTTPExporter(settings, cfg))
