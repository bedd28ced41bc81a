"""Which exporters each signal gets, from ``configure()``'s arguments and the standard ``OTEL_*`` variables.

Read as the SDK documents them, per signal first:

* ``OTEL_{TRACES,LOGS,METRICS}_EXPORTER``: comma-separated ``otlp`` (default), ``console``,
  ``none``, or the name of any exporter an installed package registers under the SDK's
  ``opentelemetry_{traces,logs,metrics}_exporter`` entry points;
* ``OTEL_EXPORTER_OTLP_{TRACES,LOGS,METRICS}_PROTOCOL`` > ``OTEL_EXPORTER_OTLP_PROTOCOL`` >
  ``grpc``; ``OTEL_EXPORTER_OTLP_{SIGNAL}_ENDPOINT`` (used as given) >
  ``OTEL_EXPORTER_OTLP_ENDPOINT`` (HTTP appends ``/v1/<signal>``) > the sidecar on loopback.

Explicit ``configure(endpoint=..., protocol=...)`` arguments win over the variables.
Every exporter is wrapped so an export that fails writes one line to stderr (rate-limited).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, Literal, TextIO

Signal = Literal["traces", "logs", "metrics"]
SIGNALS: tuple[Signal, ...] = ("traces", "logs", "metrics")
PROTOCOLS = ("grpc", "http/protobuf")
_DEFAULT_PORTS = {"grpc": 4317, "http/protobuf": 4318}
_KNOWN = ("otlp", "console", "none")


def exporter_names(signal: Signal, environ: Mapping[str, str] = os.environ) -> list[str]:
    """The exporters ``OTEL_<SIGNAL>_EXPORTER`` names (``[]`` for ``none``), ``["otlp"]`` when unset."""
    var = f"OTEL_{signal.upper()}_EXPORTER"
    raw = environ.get(var, "").strip()
    names = [n.strip().lower() for n in raw.split(",") if n.strip()] or ["otlp"]
    if "none" in names:
        if len(names) > 1:
            raise ValueError(f"{var}: 'none' cannot be combined with other exporters, got {raw!r}")
        return []
    return names


def protocol_for(signal: Signal, explicit: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """Explicit argument > per-signal variable > general variable > grpc; anything else is an error."""
    var = f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL"
    source, value = "protocol", explicit
    if value is None:
        for source in (var, "OTEL_EXPORTER_OTLP_PROTOCOL"):
            value = environ.get(source) or None
            if value is not None:
                break
    value = (value or "grpc").strip()
    if value not in PROTOCOLS:
        raise ValueError(f"{source}: must be 'grpc' or 'http/protobuf', got {value!r}")
    return value


def endpoint_for(signal: Signal, protocol: str, explicit: str | None,
                 environ: Mapping[str, str] = os.environ) -> str:
    """The URL this signal's OTLP exporter sends to (gRPC: scheme://host:port; HTTP: the full path)."""
    path = f"/v1/{signal}" if protocol == "http/protobuf" else ""
    if explicit is not None:
        return _with_scheme(explicit) + path
    # from the environment, a gRPC endpoint without a scheme stays as given: the SDK then reads
    # OTEL_EXPORTER_OTLP[_<SIGNAL>]_INSECURE to choose TLS, as documented
    from_env = _with_scheme if protocol == "http/protobuf" else (lambda e: e.strip().rstrip("/"))
    per_signal = environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    if per_signal:
        return from_env(per_signal)  # the spec: used as given, no path appended
    general = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if general:
        return from_env(general) + path
    return f"http://127.0.0.1:{_DEFAULT_PORTS[protocol]}{path}"  # the sidecar on loopback speaks plaintext


def _with_scheme(endpoint: str) -> str:
    endpoint = endpoint.strip().rstrip("/")
    return endpoint if "://" in endpoint else "http://" + endpoint


def _otlp(signal: Signal, protocol: str, endpoint: str, headers: dict[str, str] | None) -> Any:
    if protocol == "grpc":
        if signal == "traces":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as E
        elif signal == "logs":
            from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as E  # type: ignore
        else:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as E  # type: ignore
        exporter = E(endpoint=endpoint, headers=headers)
        _reconnect_after_fork(exporter)
        return exporter
    if signal == "traces":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as H
    elif signal == "logs":
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as H  # type: ignore
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as H  # type: ignore
    return H(endpoint=endpoint, headers=headers)


def _console(signal: Signal) -> Any:
    if signal == "traces":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if signal == "logs":
        from opentelemetry.sdk._logs.export import ConsoleLogRecordExporter

        return ConsoleLogRecordExporter()
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

    return ConsoleMetricExporter()


def _registered(signal: Signal, name: str) -> Any:
    from opentelemetry.util._importlib_metadata import entry_points

    for ep in entry_points(group=f"opentelemetry_{signal}_exporter", name=name):
        return ep.load()()
    raise ValueError(f"OTEL_{signal.upper()}_EXPORTER: unknown exporter {name!r} "
                     f"(built in: {', '.join(_KNOWN)}; others need a package that registers it)")


def build_exporters(signal: Signal, *, protocol: str | None, endpoint: str | None,
                    headers: dict[str, str] | None, environ: Mapping[str, str] = os.environ) -> list[Any]:
    """The exporters for one signal, each reporting its failures on stderr."""
    out = []
    for name in exporter_names(signal, environ):
        if name == "otlp":
            proto = protocol_for(signal, protocol, environ)
            exporter = _otlp(signal, proto, endpoint_for(signal, proto, endpoint, environ), headers)
            where = f"OTLP {proto} {endpoint_for(signal, proto, endpoint, environ)}"
        elif name == "console":
            exporter, where = _console(signal), "console"
        else:
            exporter, where = _registered(signal, name), name
        out.append(FailureReporting(exporter, signal, where))
    return out


def _reconnect_after_fork(exporter: Any) -> None:
    """gRPC channels do not survive fork: give the exporter a fresh channel in the child."""
    init = getattr(exporter, "_initialize_channel_and_stub", None)
    if init is not None and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=init)


class StderrLimiter:
    """At most one line per ``interval`` seconds per key; says how many were held back in between.

    The SDK reports export failures through ``logging``, which an app without a handler of
    its own never shows, and which would repeat every few seconds while the sidecar is down.
    """

    def __init__(self, interval: float = 30.0, stream: TextIO | None = None) -> None:
        self.interval = interval
        self._stream = stream
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def report(self, key: str, line: str) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._held[key] = self._held.get(key, 0) + 1
                return False
            self._last[key] = now
            held = self._held.pop(key, 0)
        if held:
            line += f" ({held} more since the last report)"
        try:
            (self._stream or sys.stderr).write(f"torch-otel: {line}\n")
        except (OSError, ValueError):  # stderr closed at interpreter exit
            return False
        return True


STDERR = StderrLimiter()


class SDKFailureLines(logging.Handler):
    """The SDK's exporter warnings (retrying, failed) as rate-limited single lines on stderr.

    Attached to the ``opentelemetry.exporter`` and ``opentelemetry.sdk`` loggers, so the first
    failed attempt shows at once even while the exporter keeps retrying in the background.
    """

    def __init__(self, limiter: StderrLimiter = STDERR) -> None:
        super().__init__(logging.WARNING)
        self._limiter = limiter

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage().splitlines()[0] if record.msg else record.name
            if message.startswith(_AT_SHUTDOWN):
                return  # our own deadline cut the exporter short: the failure line for that batch follows
            lower = message.lower()
            signal = next((s for s, words in _SIGNAL_WORDS if any(w in lower for w in words)), "sdk")
            self._limiter.report(signal, message)  # one key per signal, shared with FailureReporting
        except Exception:  # noqa: BLE001 - reporting must never raise into the exporter
            pass


_AT_SHUTDOWN = ("Shutdown in progress", "Exporter already shutdown", "Can't export", "Processor already shutdown")
_SIGNAL_WORDS = (("traces", ("span", "trace")), ("metrics", ("metric",)), ("logs", ("log",)))
_SDK_LINES = SDKFailureLines()


def report_sdk_failures() -> None:
    """Show the SDK's export complaints on stderr once per interval, whether or not the app logs anywhere."""
    for name in ("opentelemetry.exporter", "opentelemetry.sdk"):
        logger = logging.getLogger(name)
        if _SDK_LINES not in logger.handlers:
            logger.addHandler(_SDK_LINES)


class FailureReporting:
    """Delegates to an exporter; a failed or raising export becomes one rate-limited stderr line."""

    def __init__(self, exporter: Any, signal: Signal, where: str, limiter: StderrLimiter = STDERR) -> None:
        self.exporter = exporter
        self.signal = signal
        self.where = where
        self._limiter = limiter
        # the metric reader reads these off its exporter
        self._preferred_temporality = getattr(exporter, "_preferred_temporality", {})
        self._preferred_aggregation = getattr(exporter, "_preferred_aggregation", {})

    def export(self, batch: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            result = self.exporter.export(batch, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - reported, then handled by the processor as before
            self._limiter.report(self.signal, f"exporting {self.signal} to {self.where} failed: "
                                              f"{type(e).__name__}: {e}")
            raise
        if getattr(result, "name", "SUCCESS") != "SUCCESS":
            n = len(batch) if hasattr(batch, "__len__") else "a batch of"
            self._limiter.report(self.signal, f"exporting {n} {self.signal} to {self.where} failed "
                                              f"(unreachable or refused); they are dropped")
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.exporter, name)
