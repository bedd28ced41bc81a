"""RFC 5424 syslog messages from OTLP log records and spans: pure functions, no I/O.

One message per log record (and per selected span)::

    <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [otel@32473 trace_id="…" span_id="…" …] BOM MSG

The structured-data element carries the ids that join the line to its trace (trace id,
span id, request id, model id and version) and any attributes the config allows.
Header fields keep to PRINTUSASCII and their RFC lengths, SD-PARAM names to the
SD-NAME rules, values are escaped (``"``, ``\\`` and ``]``), and MSG is UTF-8 with a BOM.
A message longer than ``max_message_bytes`` keeps its header, as many SD-PARAMs as fit
(in the order above) and the start of MSG, cut at a character boundary.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple

from contract.attributes import ML_MODEL_ID, ML_MODEL_VERSION, REQUEST_ID, SERVICE_NAME

BOM = b"\xef\xbb\xbf"
NILVALUE = "-"

FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7, "uucp": 8,
    "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12, "security": 13, "console": 14, "solaris-cron": 15,
    **{f"local{i}": 16 + i for i in range(8)},
}

# syslog severities (RFC 5424 table 2)
EMERGENCY, ALERT, CRITICAL, ERROR, WARNING, NOTICE, INFORMATIONAL, DEBUG = range(8)

_BY_TEXT = {"TRACE": DEBUG, "DEBUG": DEBUG, "INFO": INFORMATIONAL, "NOTICE": NOTICE, "WARN": WARNING,
            "WARNING": WARNING, "ERROR": ERROR, "ERR": ERROR, "CRITICAL": CRITICAL, "FATAL": CRITICAL,
            "ALERT": ALERT, "EMERGENCY": EMERGENCY, "EMERG": EMERGENCY}

#: the span status code that marks an error (opentelemetry.proto.trace.v1.Status.STATUS_CODE_ERROR)
_STATUS_ERROR = 2
_STATUS_TEXT = {0: "UNSET", 1: "OK", 2: "ERROR"}

# attribute names shared with the instrumentation (the project-wide contract)
MODEL_ID = ML_MODEL_ID
MODEL_VERSION = ML_MODEL_VERSION

#: an SD-PARAM value longer than this (in UTF-8 bytes, before escaping) is cut: ids and
#: short attributes fit, a stack trace pasted into an attribute does not crowd out MSG
MAX_PARAM_VALUE_BYTES = 256
#: the lengths RFC 5424 section 6 allows for header fields
_HEADER_MAX = {"hostname": 255, "app_name": 48, "procid": 128, "msgid": 32}


def severity(number: int, text: str = "") -> int:
    """The syslog severity of an OTel SeverityNumber (the text decides only when the number is unset).

    TRACE/DEBUG -> debug, INFO -> informational, INFO2..INFO4 -> notice, WARN -> warning,
    ERROR -> error, FATAL -> critical (Python's ``CRITICAL`` arrives as FATAL).
    """
    if number <= 0:
        return _BY_TEXT.get(text.strip().upper(), INFORMATIONAL)
    if number <= 8:
        return DEBUG
    if number == 9:
        return INFORMATIONAL
    if number <= 12:
        return NOTICE
    if number <= 16:
        return WARNING
    if number <= 20:
        return ERROR
    return CRITICAL


def escape_param_value(value: str) -> str:
    """PARAM-VALUE escaping (RFC 5424 6.3.3): a backslash before ``"``, ``\\`` and ``]``."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def sd_name(key: str) -> str:
    """An SD-NAME (1-32 PRINTUSASCII, none of ``= ] "`` or space) made from an attribute key.

    Other characters become ``_``; an empty key becomes ``_``.
    """
    out = "".join(c if 33 <= ord(c) <= 126 and c not in '=]"' else "_" for c in key[:32])
    return out or "_"


def is_sd_name(text: str) -> bool:
    return 1 <= len(text) <= 32 and sd_name(text) == text


def header_field(value: str | None, max_len: int) -> str:
    """A header field: PRINTUSASCII only (others become ``_``), at most ``max_len``; NILVALUE when empty."""
    if not value:
        return NILVALUE
    return "".join(c if 33 <= ord(c) <= 126 else "_" for c in value[:max_len])


def timestamp(unix_nano: int) -> str:
    """RFC 3339 in UTC with microseconds (the most RFC 5424 allows); NILVALUE for an unknown time."""
    if unix_nano <= 0:
        return NILVALUE
    seconds, nanos = divmod(unix_nano, 1_000_000_000)
    t = _dt.datetime.fromtimestamp(seconds, _dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos // 1000:06d}Z"


def frame(message: bytes) -> bytes:
    """Octet counting (RFC 6587 3.4.1, RFC 5425 4.3): ``MSG-LEN SP SYSLOG-MSG``."""
    return b"%d %s" % (len(message), message)


def any_value_text(v) -> str:
    """An OTLP AnyValue as text: strings as they are, other scalars as JSON would write them, maps and lists as JSON."""
    kind = v.WhichOneof("value")
    if kind == "string_value":
        return v.string_value
    if kind is None:
        return ""
    return json.dumps(_any_value_py(v), ensure_ascii=False, separators=(",", ":"))


def _any_value_py(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_any_value_py(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _any_value_py(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind) if kind is not None else None


def _cut_utf8(data: bytes, limit: int) -> bytes:
    """At most ``limit`` bytes of ``data``, never half a character."""
    if len(data) <= limit:
        return data
    return data[:max(0, limit)].decode("utf-8", "ignore").encode("utf-8")


class Message(NamedTuple):
    """One formatted syslog message and whether anything had to be cut to fit."""

    data: bytes
    truncated: bool


def build_message(*, pri: int, ts: str, hostname: str, app_name: str, procid: str, msgid: str,
                  sd_id: str, params: Iterable[tuple[str, str]], msg: str, max_bytes: int) -> Message:
    """Assemble one RFC 5424 message of at most ``max_bytes`` (header fields already made valid)."""
    head = f"<{pri}>1 {ts} {hostname} {app_name} {procid} {msgid} ".encode("ascii")
    budget = max_bytes - len(head)
    truncated = False
    parts = [f"[{sd_id}".encode()]
    used = len(parts[0]) + 1  # the closing ]
    for name, value in params:
        raw = value.encode("utf-8")
        if len(raw) > MAX_PARAM_VALUE_BYTES:
            value = _cut_utf8(raw, MAX_PARAM_VALUE_BYTES).decode("utf-8")
            truncated = True
        part = f' {name}="{escape_param_value(value)}"'.encode("utf-8")
        if used + len(part) > budget:
            truncated = True
            continue
        parts.append(part)
        used += len(part)
    sd = b"".join(parts) + b"]" if len(parts) > 1 else NILVALUE.encode()
    out = head + sd
    if msg:
        room = max_bytes - len(out) - 1 - len(BOM)
        body = msg.encode("utf-8")
        if len(body) > room:
            body = _cut_utf8(body, room)
            truncated = True
        if body:
            out += b" " + BOM + body
    return Message(out, truncated)


IncludeSpans = Literal[False, "errors", "all"]


@dataclass(frozen=True)
class Formatter:
    """What the config decides once; turns whole OTLP requests into messages."""

    facility: int
    sd_id: str
    max_message_bytes: int
    #: the sidecar's own host name: used when neither ``hostname`` nor ``host.name`` says otherwise
    default_hostname: str
    app_name: str | None = None
    hostname: str | None = None
    #: attribute keys copied into structured data after the ids (record/span first, then resource)
    attributes: tuple[str, ...] = ()
    include_spans: IncludeSpans = False

    def log_messages(self, request) -> Iterator[Message]:
        """One message per log record of an ExportLogsServiceRequest."""
        for rl in request.resource_logs:
            res = _attrs(rl.resource.attributes)
            head = self._resource_header(res)
            for sl in rl.scope_logs:
                for rec in sl.log_records:
                    attrs = _attrs(rec.attributes)
                    sev = severity(rec.severity_number, rec.severity_text)
                    msgid = header_field(rec.event_name, _HEADER_MAX["msgid"]) if rec.event_name else "log"
                    yield build_message(
                        pri=self.facility * 8 + sev, ts=timestamp(rec.time_unix_nano or rec.observed_time_unix_nano),
                        msgid=msgid, sd_id=self.sd_id, params=self._params(rec.trace_id, rec.span_id, attrs, res),
                        msg=any_value_text(rec.body), max_bytes=self.max_message_bytes, **head)

    def span_messages(self, request) -> tuple[list[Message], int]:
        """Summaries of the spans ``include_spans`` selects, and how many spans it did not select."""
        out: list[Message] = []
        skipped = 0
        errors_only = self.include_spans != "all"
        for rs in request.resource_spans:
            res = None
            for ss in rs.scope_spans:
                for span in ss.spans:
                    code = span.status.code
                    if not self.include_spans or (errors_only and code != _STATUS_ERROR):
                        skipped += 1
                        continue
                    if res is None:
                        res = _attrs(rs.resource.attributes)
                        head = self._resource_header(res)
                    out.append(self._span_message(span, code, res, head))
        return out, skipped

    def _span_message(self, span, code: int, res: dict, head: dict) -> Message:
        attrs = _attrs(span.attributes)
        duration_ms = max(0, span.end_time_unix_nano - span.start_time_unix_nano) / 1e6
        status = _STATUS_TEXT.get(code, str(code))
        summary = [("name", span.name), ("duration_ms", f"{duration_ms:.3f}"), ("status", status)]
        if span.parent_span_id:
            summary.append(("parent_span_id", span.parent_span_id.hex()))
        text = f"span {span.name!r} {duration_ms:.3f} ms status={status}"
        if span.status.message:
            text += f": {span.status.message}"
        params = self._params(span.trace_id, span.span_id, attrs, res, summary)
        return build_message(pri=self.facility * 8 + (ERROR if code == _STATUS_ERROR else INFORMATIONAL),
                             ts=timestamp(span.end_time_unix_nano or span.start_time_unix_nano), msgid="span",
                             sd_id=self.sd_id, params=params, msg=text, max_bytes=self.max_message_bytes, **head)

    def _resource_header(self, res: dict) -> dict:
        host = self.hostname or _text(res.get("host.name")) or self.default_hostname
        app = self.app_name or _text(res.get(SERVICE_NAME))
        return {"hostname": header_field(host, _HEADER_MAX["hostname"]),
                "app_name": header_field(app, _HEADER_MAX["app_name"]),
                "procid": header_field(_text(res.get("process.pid")), _HEADER_MAX["procid"])}

    def _params(self, trace_id: bytes, span_id: bytes, attrs: dict, res: dict,
                summary: Iterable[tuple[str, str]] = ()) -> Iterator[tuple[str, str]]:
        """The ids first (they must survive truncation), then a span's summary, then the allowed attributes."""
        if any(trace_id):
            yield "trace_id", trace_id.hex()
        if any(span_id):
            yield "span_id", span_id.hex()
        for name, key in (("request_id", REQUEST_ID), ("model_id", MODEL_ID), ("model_version", MODEL_VERSION)):
            v = _lookup(key, attrs, res)
            if v is not None:
                yield name, any_value_text(v)
        yield from summary
        for key in self.attributes:
            v = _lookup(key, attrs, res)
            if v is not None:
                yield sd_name(key), any_value_text(v)


def _attrs(kvs) -> dict:
    return {kv.key: kv.value for kv in kvs}


def _lookup(key: str, attrs: dict, res: dict):
    """The record's (or span's) own attribute, else the resource's."""
    v = attrs.get(key)
    return v if v is not None else res.get(key)


def _text(v) -> str | None:
    return any_value_text(v) if v is not None else None
