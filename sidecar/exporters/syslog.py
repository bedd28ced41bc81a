"""``syslog``: log records (and optionally span summaries) as RFC 5424 messages over UDP, TCP or TLS.

Many shops centralise logs through syslog (rsyslog, syslog-ng, a SIEM). Each log record
becomes one message whose structured data carries the trace id, span id, request id and
model id/version (see :mod:`sidecar.exporters._rfc5424` for the format); with
``include_spans`` error spans (or all spans) become one-line summaries as well.

Transports: UDP (RFC 5426, one datagram per message), TCP with octet counting
(RFC 6587) and TLS (RFC 5425, same framing). Stream connections are pooled, one per
worker at most, opened lazily and re-opened after a failure; an idle connection the
server has closed is noticed before it is reused (a syslog server never writes back, so
a readable socket means it is gone). Connection errors and timeouts are retryable; a
server certificate the client cannot verify, or a server that refuses the client's
certificate, is permanent. Delivery is at least once: syslog has no acknowledgement, so
a retry after a failure part-way through a request re-sends it.
Metrics are not a syslog thing: the exporter serves logs and traces pipelines.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Literal

from prometheus_client import Counter
from pydantic import Field, field_validator, model_validator

from sidecar.component import Kind, PermanentError, RetryableError
from sidecar.config import ConfigModel, HostPort, split_host_port
from sidecar.envelope import Envelope
from sidecar.exporters import _rfc5424 as rfc
from sidecar.exporters.base import BaseExporter, ExporterConfig
from sidecar.exporters.senders import Delivery
from sidecar.registry import CreateSettings, Factory
from sidecar.signals import Signal

log = logging.getLogger(__name__)

#: the largest UDP payload over IPv4
_UDP_MAX = 65507
#: longest wait after a TLS 1.3 handshake for a server refusing the client's certificate (once per connection)
_TLS13_PROBE = 0.2


class SyslogTLSConfig(ConfigModel):
    """``tls`` (with ``network: tls``): how the server is verified and, optionally, how the client proves itself."""

    #: CA bundle that signed the server's certificate; the system's trust store when unset
    ca_file: str | None = None
    #: client certificate and key, for servers that require mutual TLS
    cert_file: str | None = None
    key_file: str | None = None
    #: do not verify the server's certificate (testing only: anyone in the path can read the logs)
    insecure_skip_verify: bool = False
    #: the name the server's certificate must carry when it is not the endpoint's host
    server_name_override: str | None = None
    min_version: Literal["1.2", "1.3"] = "1.2"

    @model_validator(mode="after")
    def _pair(self) -> "SyslogTLSConfig":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be set together (client certificate and its key)")
        return self


class SyslogExporterConfig(ExporterConfig):
    #: host:port of the syslog server (514 for UDP/TCP, 6514 for TLS by convention)
    endpoint: HostPort
    network: Literal["udp", "tcp", "tls"] = "tcp"
    tls: SyslogTLSConfig = Field(default_factory=SyslogTLSConfig)
    #: APP-NAME; the resource's ``service.name`` when unset
    app_name: str | None = None
    #: HOSTNAME; the resource's ``host.name`` when unset, else this machine's name
    hostname: str | None = None
    #: a facility name (user, daemon, local0 ... local7, ...) or its number 0-23
    facility: str | int = Field("user", validate_default=True)
    #: SD-ID of the element carrying the ids: ``name@<private enterprise number>``
    structured_data_id: str = "otel@32473"
    #: attribute keys (of the record or span, else of its resource) copied into structured data
    attributes: list[str] = Field(default_factory=lambda: ["exception.type"])
    #: longest message sent, header included; longer ones keep the ids and the start of MSG
    max_message_bytes: int = Field(8192, ge=1024, le=1 << 20)
    #: span summaries: ``false`` (logs only), ``errors`` (spans with status ERROR) or ``all``
    include_spans: rfc.IncludeSpans = False

    @field_validator("facility")
    @classmethod
    def _facility(cls, v: str | int) -> int:
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 23:
            return v
        if isinstance(v, str) and v.lower() in rfc.FACILITIES:
            return rfc.FACILITIES[v.lower()]
        raise ValueError(f"unknown facility {v!r}: expected 0-23 or one of {', '.join(rfc.FACILITIES)}")

    @field_validator("app_name", "hostname")
    @classmethod
    def _header(cls, v: str | None, info) -> str | None:
        limit = 48 if info.field_name == "app_name" else 255
        if v is not None and (not v or len(v) > limit or any(not 33 <= ord(c) <= 126 for c in v)):
            raise ValueError(f"must be 1-{limit} printable ASCII characters without spaces, got {v!r}")
        return v

    @field_validator("structured_data_id")
    @classmethod
    def _sd_id(cls, v: str) -> str:
        name, at, number = v.partition("@")
        if not rfc.is_sd_name(v) or not at or not name or not number.isdigit():
            raise ValueError(f"expected name@<private enterprise number> (at most 32 characters, no space, "
                             f"'=', ']' or '\"'), such as otel@32473, got {v!r}")
        return v

    @field_validator("include_spans", mode="before")
    @classmethod
    def _include_spans(cls, v):
        return False if v in ("false", "none", None) else v

    @model_validator(mode="after")
    def _network(self) -> "SyslogExporterConfig":
        if self.network == "udp" and self.max_message_bytes > _UDP_MAX:
            raise ValueError(f"max_message_bytes: at most {_UDP_MAX} with network: udp (one datagram per message)")
        if self.network != "tls" and "tls" in self.model_fields_set:
            raise ValueError(f"tls: only used with network: tls (network is {self.network})")
        return self


class _UDP:
    """One connected datagram socket shared by every worker (sendto is atomic per datagram)."""

    def __init__(self, host: str, port: int):
        self._addr = (host, port)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def send(self, messages: list[bytes], timeout: float) -> None:
        with self._lock:
            if self._sock is None:
                self._sock = _connect_udp(self._addr)
            sock = self._sock
        try:
            for m in messages:
                sock.send(m)
        except OSError as e:  # ECONNREFUSED from an earlier ICMP port unreachable, no route, ...
            self._reset(sock)
            raise RetryableError(f"udp {_where(self._addr)}: {e.strerror or e}", reason="connection") from None

    def _reset(self, sock: socket.socket) -> None:
        with self._lock:
            if self._sock is sock:
                self._sock = None
        sock.close()

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _connect_udp(addr: tuple[str, int]) -> socket.socket:
    try:
        family, type_, proto, _, sockaddr = socket.getaddrinfo(*addr, type=socket.SOCK_DGRAM)[0]
        sock = socket.socket(family, type_, proto)
        sock.connect(sockaddr)  # errors (port unreachable) then reach this socket
        return sock
    except OSError as e:
        raise RetryableError(f"udp {_where(addr)}: {e.strerror or e}", reason="connection") from None


class _Stream:
    """TCP or TLS connections with octet-counting frames; an idle pool with one connection per busy worker."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext | None, server_name: str | None):
        self._addr = (host, port)
        self._context = context
        self._server_name = server_name or host
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self._scheme = "tls" if context is not None else "tcp"

    def send(self, messages: list[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        data = b"".join([rfc.frame(m) for m in messages])
        sock = self._take(timeout)
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.sendall(data)
        except OSError as e:
            sock.close()
            raise RetryableError(f"{self._scheme} {_where(self._addr)}: {_describe(e)}", reason="connection") from None
        with self._lock:
            if self._closed:
                sock.close()
            else:
                self._idle.append(sock)

    def _take(self, timeout: float) -> socket.socket:
        while True:
            with self._lock:
                sock = self._idle.pop() if self._idle else None
            if sock is None:
                return self._connect(timeout)
            if _alive(sock):
                return sock
            sock.close()  # the server closed it while idle: open a fresh one

    def _connect(self, timeout: float) -> socket.socket:
        where = f"{self._scheme} {_where(self._addr)}"
        try:
            sock = socket.create_connection(self._addr, timeout=timeout)
        except OSError as e:
            raise RetryableError(f"{where}: {_describe(e)}", reason="connection") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if self._context is None:
            return sock
        try:
            tls = self._context.wrap_socket(sock, server_hostname=self._server_name)
        except ssl.SSLCertVerificationError as e:
            sock.close()
            raise PermanentError(f"{where}: server certificate not trusted: {e.verify_message}",
                                 reason="tls_verify") from None
        except OSError as e:
            sock.close()
            raise RetryableError(f"{where}: TLS handshake failed: {_describe(e)}", reason="connection") from None
        # With TLS 1.3 the client's handshake ends before the server has judged the client's
        # certificate: a server that refuses it closes the connection a round trip later, and
        # whatever was written by then is lost without an error. Wait that round trip (bounded)
        # before the first write; session tickets arriving instead mean the server accepted us.
        if tls.version() == "TLSv1.3" and not _alive(tls, wait=min(_TLS13_PROBE, timeout / 2)):
            tls.close()
            raise PermanentError(f"{where}: the server closed the connection right after the TLS handshake: it "
                                 "requires a client certificate (tls.cert_file, tls.key_file) it did not get "
                                 "or does not trust", reason="tls_client_rejected")
        return tls

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for sock in idle:
            _close(sock)


def _close(sock: socket.socket) -> None:
    """Close, with a TLS close_notify first so the server logs an orderly end rather than an error."""
    if isinstance(sock, ssl.SSLSocket):
        try:
            sock.settimeout(0.5)
            sock = sock.unwrap()
        except (OSError, ValueError):
            pass
    sock.close()


def _alive(sock: socket.socket, wait: float = 0.0) -> bool:
    """Whether the server still takes data on ``sock``: a syslog server never writes to the client, so
    anything readable is the end (EOF, RST, a TLS alert), except TLS session tickets, which are read here."""
    try:
        readable, _, _ = select.select([sock], [], [], wait)
        if not readable:
            return True
        if not isinstance(sock, ssl.SSLSocket):
            return False
        timeout = sock.gettimeout()
        sock.setblocking(False)
        try:
            sock.recv(1)  # application data or b"" (closed): not a usable syslog connection
            return False
        except ssl.SSLWantReadError:
            return True  # only TLS records of its own (session tickets) were waiting
        finally:
            sock.settimeout(timeout)
    except (OSError, ValueError):
        return False


def _where(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


def _describe(e: OSError) -> str:
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timed out"
    return e.strerror or str(e) or type(e).__name__


def tls_context(cfg: SyslogTLSConfig, where: str) -> ssl.SSLContext:
    """The client context for ``network: tls``; a file that cannot be read is a start-up error naming its key."""
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(cfg, key)
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{where}.tls.{key}: {path} does not exist or is not a file")
    try:
        ctx = ssl.create_default_context(cafile=cfg.ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if cfg.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
        if cfg.cert_file:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    except (ssl.SSLError, OSError) as e:
        raise ValueError(f"{where}.tls: cannot load the certificates: {e}") from None
    if cfg.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class SyslogExporter(BaseExporter):
    def __init__(self, settings: CreateSettings, cfg: SyslogExporterConfig):
        super().__init__(settings, timeout=cfg.timeout, queue=cfg.sending_queue, retry=cfg.retry_on_failure)
        self.cfg = cfg
        self.formatter = rfc.Formatter(
            facility=cfg.facility, sd_id=cfg.structured_data_id, max_message_bytes=cfg.max_message_bytes,
            default_hostname=socket.gethostname(), app_name=cfg.app_name, hostname=cfg.hostname,
            attributes=tuple(cfg.attributes), include_spans=cfg.include_spans)
        self._transport: _UDP | _Stream | None = None
        self._truncated = self.telemetry.root.family(
            Counter, "sidecar_syslog_messages_truncated", "Syslog messages cut to max_message_bytes.",
            ("component",)).labels(self.id)

    def _open(self) -> None:
        host, port = split_host_port(self.cfg.endpoint)
        if self.cfg.network == "udp":
            self._transport = _UDP(host, port)
            return
        context = None
        if self.cfg.network == "tls":
            tls = self.cfg.tls
            context = tls_context(tls, f"exporters.{self.id}")
            if tls.insecure_skip_verify:
                log.warning("%s: tls.insecure_skip_verify is set: the server's certificate is not checked", self.id)
        self._transport = _Stream(host, port, context, self.cfg.tls.server_name_override)

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def push(self, envelope: Envelope, timeout: float) -> Delivery:
        signal, request = envelope.signal, envelope.message
        skipped = 0
        if signal is Signal.LOGS:
            messages = list(self.formatter.log_messages(request))
        elif signal is Signal.TRACES:
            messages, skipped = self.formatter.span_messages(request)
        else:
            raise PermanentError(f"syslog does not export {signal.value}", reason="unsupported_signal")
        if messages:
            self._transport.send([m.data for m in messages], timeout)
            cut = sum(m.truncated for m in messages)
            if cut:
                self._truncated.inc(cut)
        # spans include_spans did not select are filtered by design, not rejected by the server
        return Delivery(filtered=skipped)


FACTORY = Factory(type="syslog", kind=Kind.EXPORTER, config_model=SyslogExporterConfig,
                  create=lambda settings, cfg, _next: SyslogExporter(settings, cfg),
                  signals=frozenset({Signal.LOGS, Signal.TRACES}),
                  telemetry=frozenset({"sidecar_syslog_messages_truncated"}))
