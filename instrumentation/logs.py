"""Python ``logging`` joined to traces: an OTel log bridge and a JSON formatter for stdout.

:class:`LoggingBridge` turns each ``LogRecord`` into an OTel log record carrying the
current trace and span id, the request's identity and ``extra={...}`` fields, and
hands it to the SDK's batch processor (a deque append: logging never waits on the
network). :class:`JSONFormatter` writes one JSON object per line with the same ids,
so ``kubectl logs`` output joins the traces in the backend.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import traceback
from typing import Any

from opentelemetry import trace
from opentelemetry._logs import LoggerProvider as APILoggerProvider
from opentelemetry._logs import SeverityNumber, get_logger_provider
from opentelemetry.context import get_current

from contract.attributes import ML_MODEL_ID, ML_MODEL_VERSION
from instrumentation._context import REQUEST_ID, TAG_PREFIX, USER_ID, current_request

#: Attributes every LogRecord has; anything else on a record came from ``extra={...}``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
_PRIMITIVE = (str, bool, int, float)

_SEVERITY = {
    logging.DEBUG: (SeverityNumber.DEBUG, "DEBUG"),
    logging.INFO: (SeverityNumber.INFO, "INFO"),
    logging.WARNING: (SeverityNumber.WARN, "WARN"),
    logging.ERROR: (SeverityNumber.ERROR, "ERROR"),
    logging.CRITICAL: (SeverityNumber.FATAL, "FATAL"),
}


def _severity(levelno: int) -> tuple[SeverityNumber, str]:
    found = _SEVERITY.get(levelno)
    if found is not None:
        return found
    # custom levels: the nearest standard one below, offset inside its OTel range (max +3)
    base = max((lvl for lvl in _SEVERITY if lvl <= levelno), default=logging.DEBUG)
    number, text = _SEVERITY[base]
    return SeverityNumber(min(number.value + min(levelno - base, 3), 24)), text


def _attr_value(value: Any) -> Any:
    if isinstance(value, _PRIMITIVE):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, _PRIMITIVE) for v in value):
        return list(value)
    return str(value)


def exception_attributes(exc_info: Any) -> dict[str, str]:
    """OTel ``exception.*`` attributes (type, message, full stack trace) from a ``sys.exc_info()`` triple."""
    etype, value, tb = exc_info
    out = {}
    if etype is not None:
        out["exception.type"] = etype.__qualname__
    if value is not None:
        out["exception.message"] = str(value)
    out["exception.stacktrace"] = "".join(traceback.format_exception(etype, value, tb))
    return out


class LoggingBridge(logging.Handler):
    """A ``logging.Handler`` that emits OTel log records correlated with the current span.

    Records from the OTel SDK's own loggers are skipped so exporter complaints about an
    unreachable sidecar do not feed back into the export queue.
    """

    def __init__(self, level: int = logging.NOTSET, logger_provider: APILoggerProvider | None = None) -> None:
        super().__init__(level)
        self._provider = logger_provider or get_logger_provider()
        self._loggers: dict[str, Any] = {}

    def _logger(self, name: str) -> Any:
        logger = self._loggers.get(name)
        if logger is None:
            logger = self._loggers[name] = self._provider.get_logger(name)
        return logger

    def emit(self, record: logging.LogRecord) -> None:
        name = record.name
        if name.startswith("opentelemetry"):
            return
        try:
            attributes: dict[str, Any] = {k: _attr_value(v) for k, v in record.__dict__.items() if k not in _STANDARD}
            ctx = current_request()
            if ctx is not None:
                if ctx.request_id:
                    attributes[REQUEST_ID] = ctx.request_id
                if ctx.user_id:
                    attributes[USER_ID] = ctx.user_id
                for k, v in ctx.tags.items():
                    attributes[TAG_PREFIX + k] = v
                if ctx.model_id and ML_MODEL_ID not in attributes:
                    attributes[ML_MODEL_ID] = ctx.model_id
                    if ctx.model_version:
                        attributes[ML_MODEL_VERSION] = ctx.model_version
            if record.exc_info and record.exc_info[0] is not None:
                attributes.update(exception_attributes(record.exc_info))
            attributes["code.function.name"] = record.funcName
            attributes["code.file.path"] = record.pathname
            attributes["code.line.number"] = record.lineno
            number, text = _severity(record.levelno)
            self._logger(name).emit(timestamp=int(record.created * 1e9), context=get_current(),
                                    severity_number=number, severity_text=text,
                                    body=record.getMessage(), attributes=attributes)
        except Exception:  # noqa: BLE001 - logging must never raise into the app
            self.handleError(record)

    def flush(self) -> None:
        """No-op: flushing would wait on the network; ``shutdown()`` flushes at exit."""


def _rfc3339(created: float) -> str:
    return _dt.datetime.fromtimestamp(created, _dt.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


class JSONFormatter(logging.Formatter):
    """One JSON object per line with the fields log pipelines expect; ``extra`` fields are merged in.

    Fixed keys (always present, null when unknown): timestamp, level, logger, message,
    trace_id, span_id, request_id, user_id, model_id, model_version, execution_time_ms,
    error_code; an ``extra`` of the same name fills a fixed key. ``exception`` holds the
    formatted stack trace when there is one.

    stdout is a way out of the pod too: when ``configure()`` set up redaction (the default),
    every line goes through the same rules before it is written (``redact=False`` opts out).
    """

    def __init__(self, *args: Any, redact: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        span_ctx = trace.get_current_span().get_span_context()
        ctx = current_request()
        out: dict[str, Any] = {
            "timestamp": _rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "trace_id": format(span_ctx.trace_id, "032x") if span_ctx.is_valid else None,
            "span_id": format(span_ctx.span_id, "016x") if span_ctx.is_valid else None,
            "request_id": ctx.request_id if ctx else None,
            "user_id": ctx.user_id if ctx else None,
            "model_id": ctx.model_id if ctx else None,
            "model_version": ctx.model_version if ctx else None,
            "execution_time_ms": None,
            "error_code": None,
        }
        if ctx is not None and ctx.tags:
            out["tags"] = dict(ctx.tags)
        for k, v in record.__dict__.items():
            if k not in _STANDARD:
                out[k] = v
        if record.exc_info and record.exc_info[0] is not None:
            out["exception"] = self.formatException(record.exc_info)
            out.setdefault("error_type", record.exc_info[0].__qualname__)
        if record.stack_info:
            out["stack_info"] = record.stack_info
        if self._redact:
            out = _redacted(out)
        return json.dumps(out, default=str, ensure_ascii=False)


def _redacted(line: dict[str, Any]) -> dict[str, Any]:
    """The line with the configured in-process redaction rules applied (unchanged when none are set)."""
    from instrumentation._setup import get_telemetry

    handle = get_telemetry()
    engine = getattr(handle, "redaction_engine", None)
    if engine is None:
        return line
    from redaction.values import redact_roots

    tally: dict = {}
    result = redact_roots(engine, [line], [None], tally)
    if tally:
        engine.stats.merge(tally)
    return line if result is None else result.roots[0]


class ConsoleFallback(logging.StreamHandler):
    """What Python's last-resort handler did before ``configure()`` gave the root logger a handler.

    A record reaches stderr only when no other handler (the bridge aside) would have shown it:
    the app's ``log.error`` and the 500 tracebacks stay visible to a developer running locally,
    and nothing is printed twice once the app sets up its own logging. The SDK's own records
    are left out: export failures have their own rate-limited line.
    """

    def __init__(self, bridge: logging.Handler) -> None:
        super().__init__()  # sys.stderr, looked up per record as the last-resort handler does
        self.setLevel(logging.WARNING)
        self.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
        self._ours = (bridge, self)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        import sys

        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("opentelemetry"):
            return False
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            if any(h not in self._ours for h in logger.handlers):
                return False  # the app has a handler for this record: it prints it, not us
            if not logger.propagate:
                break
            logger = logger.parent  # type: ignore[assignment]
        return super().filter(record)


def take_over_root_logging(bridge: logging.Handler, level: int | None = None) -> logging.Handler | None:
    """Attach ``bridge`` to the root logger; returns the console fallback handler if one was needed.

    An SDK ``LoggingHandler`` already on the root logger (``opentelemetry-instrument`` with
    logging auto-instrumentation) is replaced: the bridge carries the same trace context plus
    the request identity, and two handlers would export every record twice. When the root
    logger had no handler and Python's default WARNING level, the level is lowered to INFO so
    INFO records are exported (stderr still shows WARNING and above, as before).
    """
    from opentelemetry.sdk._logs import LoggingHandler

    root = logging.getLogger()
    untouched = not root.handlers and root.level == logging.WARNING
    for h in list(root.handlers):
        if isinstance(h, (LoggingHandler, LoggingBridge)):
            root.removeHandler(h)
    console = None
    if not any(h.level <= logging.CRITICAL for h in root.handlers):
        console = ConsoleFallback(bridge)
        root.addHandler(console)
    root.addHandler(bridge)
    if level is not None:
        root.setLevel(level)
    elif untouched:
        root.setLevel(logging.INFO)
    return console


def bridge_logging(logger: logging.Logger | None = None, level: int = logging.NOTSET,
                   logger_provider: APILoggerProvider | None = None) -> LoggingBridge:
    """Attach a :class:`LoggingBridge` to ``logger`` (root by default) and return it."""
    handler = LoggingBridge(level, logger_provider)
    (logger or logging.getLogger()).addHandler(handler)
    return handler
