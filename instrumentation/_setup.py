"""``configure()``: tracer, logger and meter providers exporting OTLP to the sidecar.

Everything the SDK already reads from ``OTEL_*`` variables is left to it (headers,
sampler, batch sizes, service name, resource attributes); explicit arguments win.
Export runs in the SDK's batch processors: a bounded deque per signal, a background
worker, drops instead of blocking, the worker restarted after ``fork``.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from typing import Any, Literal

from opentelemetry import _logs, metrics, trace
from opentelemetry.context import Context
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind
from opentelemetry.util.types import Attributes

from instrumentation._context import FORCE_KEEP, RequestContextSpanProcessor, current_request

Protocol = Literal["grpc", "http/protobuf"]

_log = logging.getLogger(__name__)

#: Downward-API variables (set in the pod spec) -> resource attributes.
K8S_ENV = {
    "K8S_POD_NAME": "k8s.pod.name",
    "K8S_POD_UID": "k8s.pod.uid",
    "K8S_NAMESPACE_NAME": "k8s.namespace.name",
    "POD_NAMESPACE": "k8s.namespace.name",
    "K8S_NODE_NAME": "k8s.node.name",
    "K8S_CONTAINER_NAME": "k8s.container.name",
}
_DEFAULT_PORTS = {"grpc": 4317, "http/protobuf": 4318}
_SIGNAL_ENDPOINT_ENV = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                        "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")


def k8s_resource_attributes(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Kubernetes identity from downward-API environment variables (first name listed wins)."""
    out: dict[str, str] = {}
    for env, key in K8S_ENV.items():
        value = environ.get(env)
        if value and key not in out:
            out[key] = value
    return out


class ForceKeepSampler(Sampler):
    """Samples every span of a request marked with the debug header, else defers to ``inner``.

    Head sampling in the app must not throw away a request the user asked to keep;
    the sidecar's debug policy sees ``sampling.force_keep`` on what arrives.
    """

    def __init__(self, inner: Sampler) -> None:
        self._inner = inner
        self._keep = SamplingResult(Decision.RECORD_AND_SAMPLE, {FORCE_KEEP: True})

    def should_sample(self, parent_context: Context | None, trace_id: int, name: str,
                      kind: SpanKind | None = None, attributes: Attributes = None,
                      links: list[Link] | None = None, trace_state: Any = None) -> SamplingResult:
        ctx = current_request()
        if ctx is not None and ctx.force_keep:
            parent = trace.get_current_span(parent_context).get_span_context()
            # the SDK starts the span with the sampler's attributes only: keep the caller's (model id, ...)
            keep = {**attributes, FORCE_KEEP: True} if attributes else self._keep.attributes
            return SamplingResult(Decision.RECORD_AND_SAMPLE, keep, parent.trace_state if parent.is_valid else None)
        return self._inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"ForceKeep{{{self._inner.get_description()}}}"


class _DropCounter:
    """Wraps the SDK batch processor's metrics hook to count drops where the app can read them."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.dropped = 0

    def register_queue_size(self, get_queue_size: Any) -> None:
        self._inner.register_queue_size(get_queue_size)

    def drop_items(self, count: int, error_type: str = "queue_full") -> None:
        self.dropped += count
        self._inner.drop_items(count, error_type)

    def finish_items(self, count: int) -> None:
        self._inner.finish_items(count)


def _count_drops(processor: Any) -> _DropCounter | None:
    inner = getattr(processor, "_batch_processor", None)
    if inner is None or not hasattr(inner, "_metrics"):
        return None  # a future SDK moved it: drop counts are then only in the SDK's own metrics
    counter = _DropCounter(inner._metrics)
    inner._metrics = counter
    return counter


class Telemetry:
    """The handle ``configure()`` returns: the three providers and their lifecycle."""

    def __init__(self, tracer_provider: TracerProvider, logger_provider: LoggerProvider | None,
                 meter_provider: MeterProvider | None, *, owns: tuple[bool, bool, bool],
                 drop_counters: dict[str, _DropCounter | None], capture_payloads: bool,
                 log_handler: logging.Handler | None, exporter_owners: list[Any], exporters: tuple[Any, ...],
                 shutdown_timeout_millis: int) -> None:
        self.tracer_provider = tracer_provider
        self.logger_provider = logger_provider
        self.meter_provider = meter_provider
        self.capture_payloads = capture_payloads
        #: the in-process redaction engine (None when off); JSONFormatter uses it for stdout too
        self.redaction_engine: Any = None
        self.log_handler = log_handler
        self._owns = owns
        self._drops = drop_counters
        self._our_processors = exporter_owners
        self._exporters = exporters
        self._shutdown_timeout_millis = shutdown_timeout_millis
        self._shut = False
        self._shut_lock = threading.Lock()

    def dropped(self) -> dict[str, int]:
        """Spans and log records dropped because a batch queue was full (the app never waits)."""
        return {signal: (c.dropped if c is not None else 0) for signal, c in self._drops.items()}

    def force_flush(self, timeout_millis: int = 10_000) -> bool:
        ok = self.tracer_provider.force_flush(timeout_millis)
        if self.logger_provider is not None:
            ok = self.logger_provider.force_flush(timeout_millis) and ok
        if self.meter_provider is not None:
            ok = self.meter_provider.force_flush(timeout_millis) and ok
        return ok

    def shutdown(self, timeout_millis: int | None = None) -> None:
        """Flush and stop, within ``timeout_millis`` (default: configure's ``shutdown_timeout_millis``).

        The three signals flush in parallel; whatever is still retrying against an
        unreachable sidecar at the deadline is abandoned, so process exit stays bounded.
        Providers the app owned keep running; only our processors stop.
        """
        with self._shut_lock:
            if self._shut:
                return
            self._shut = True
        if self.log_handler is not None:
            logging.getLogger().removeHandler(self.log_handler)
        timeout = (self._shutdown_timeout_millis if timeout_millis is None else timeout_millis) / 1000
        owns_tp, owns_lp, owns_mp = self._owns
        tasks: list[Any] = [p.shutdown for p in self._our_processors]
        if owns_tp:
            tasks.append(self.tracer_provider.shutdown)
        if self.logger_provider is not None and owns_lp:
            tasks.append(self.logger_provider.shutdown)
        if self.meter_provider is not None and owns_mp:
            mp = self.meter_provider
            tasks.append(lambda: mp.shutdown(timeout * 1000))
        threads = [threading.Thread(target=t, name="otel-shutdown", daemon=True) for t in tasks]
        deadline = time.monotonic() + timeout
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            for e in self._exporters:  # interrupts the exporters' retry back-off; unsent data is dropped
                try:
                    e.shutdown()
                except Exception:  # noqa: BLE001 - best effort at exit
                    pass


_lock = threading.Lock()
_handle: Telemetry | None = None


def _endpoint_for(protocol: str, endpoint: str | None) -> str | None:
    """Explicit endpoint, else None when OTEL_* names one (the SDK reads it), else the sidecar on loopback."""
    if endpoint is None:
        if any(os.environ.get(k) for k in _SIGNAL_ENDPOINT_ENV):
            return None
        endpoint = f"127.0.0.1:{_DEFAULT_PORTS[protocol]}"
    if "://" not in endpoint:
        endpoint = "http://" + endpoint  # the sidecar on loopback speaks plaintext
    return endpoint.rstrip("/")


def _exporters(protocol: str, endpoint: str | None, headers: dict[str, str] | None) -> tuple[Any, Any, Any]:
    base = _endpoint_for(protocol, endpoint)
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return (OTLPSpanExporter(endpoint=base, headers=headers), OTLPLogExporter(endpoint=base, headers=headers),
                OTLPMetricExporter(endpoint=base, headers=headers))
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HTTPLog
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HTTPMetric
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTPSpan

        def url(path: str) -> str | None:
            return None if base is None else base + path

        return (HTTPSpan(endpoint=url("/v1/traces"), headers=headers),
                HTTPLog(endpoint=url("/v1/logs"), headers=headers),
                HTTPMetric(endpoint=url("/v1/metrics"), headers=headers))
    raise ValueError(f"protocol: must be 'grpc' or 'http/protobuf', got {protocol!r}")


def _reconnect_after_fork(exporters: tuple[Any, ...]) -> None:
    """gRPC channels do not survive fork: give each exporter a fresh channel in the child."""
    def reinit() -> None:
        for e in exporters:
            init = getattr(e, "_initialize_channel_and_stub", None)
            if init is not None:
                init()

    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=reinit)


def configure(service_name: str | None = None, endpoint: str | None = None, protocol: Protocol | None = None, *,
              resource_attributes: Mapping[str, Any] | None = None, headers: dict[str, str] | None = None,
              redaction: Any = True, capture_payloads: bool = False, logging_bridge: bool = True,
              log_level: int | None = None, metrics_enabled: bool = True,
              max_queue_size: int | None = None, shutdown_timeout_millis: int = 5_000,
              flush_on_sigterm: bool = True) -> Telemetry:
    """Set up traces, logs and metrics over OTLP to the sidecar; idempotent (later calls return the first handle).

    ``protocol`` defaults to ``OTEL_EXPORTER_OTLP_PROTOCOL`` or ``grpc``; ``endpoint`` to
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``127.0.0.1:4317`` (gRPC) / ``:4318`` (HTTP).
    ``redaction`` (True — the default — for the built-in detectors, a config path, dict or
    engine; False or None to turn it off) redacts spans and logs on the export thread before
    they leave the process; the sidecar redacts again before data leaves the pod.
    If the app already installed an SDK TracerProvider/LoggerProvider, our processors
    are added to it instead of replacing it.
    """
    global _handle
    with _lock:
        if _handle is not None:
            return _handle
        protocol = protocol or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")  # type: ignore[assignment]
        span_exporter, log_exporter, metric_exporter = _exporters(protocol, endpoint, headers)
        raw_exporters = (span_exporter, log_exporter, metric_exporter)
        if protocol == "grpc":
            _reconnect_after_fork((span_exporter, log_exporter, metric_exporter))
        engine = None
        if redaction not in (None, False):
            span_exporter, log_exporter, engine = _with_redaction(redaction, span_exporter, log_exporter)

        attrs = dict(resource_attributes or {})
        if service_name:
            attrs["service.name"] = service_name
        # k8s identity < OTEL_RESOURCE_ATTRIBUTES/OTEL_SERVICE_NAME < explicit arguments
        resource = Resource(k8s_resource_attributes()).merge(Resource.create(attrs))

        queue = {"max_queue_size": max_queue_size, "max_export_batch_size": min(512, max_queue_size)} \
            if max_queue_size else {}
        span_processor = BatchSpanProcessor(span_exporter, **queue)
        log_processor = BatchLogRecordProcessor(log_exporter, **queue)
        drops = {"spans": _count_drops(span_processor), "logs": _count_drops(log_processor)}

        ours: list[Any] = []
        existing = trace.get_tracer_provider()
        if isinstance(existing, TracerProvider):
            tracer_provider, owns_tp = existing, False
            ours.append(span_processor)
        else:
            from opentelemetry.sdk.trace.sampling import _get_from_env_or_default

            tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False,
                                             sampler=ForceKeepSampler(_get_from_env_or_default()))
            owns_tp = True
            trace.set_tracer_provider(tracer_provider)
        tracer_provider.add_span_processor(RequestContextSpanProcessor())
        tracer_provider.add_span_processor(span_processor)

        existing_lp = _logs.get_logger_provider()
        if isinstance(existing_lp, LoggerProvider):
            logger_provider, owns_lp = existing_lp, False
            ours.append(log_processor)
        else:
            logger_provider, owns_lp = LoggerProvider(resource=resource, shutdown_on_exit=False), True
            _logs.set_logger_provider(logger_provider)
        logger_provider.add_log_record_processor(log_processor)

        meter_provider: MeterProvider | None = None
        owns_mp = False
        if metrics_enabled:
            existing_mp = metrics.get_meter_provider()
            if isinstance(existing_mp, MeterProvider):
                meter_provider = existing_mp  # readers cannot be added later: the app's own export it
            else:
                meter_provider = MeterProvider(resource=resource, shutdown_on_exit=False,
                                               metric_readers=[PeriodicExportingMetricReader(metric_exporter)])
                owns_mp = True
                metrics.set_meter_provider(meter_provider)

        handler = None
        if logging_bridge:
            from instrumentation.logs import LoggingBridge

            handler = LoggingBridge(logger_provider=logger_provider)
            root = logging.getLogger()
            root.addHandler(handler)
            if log_level is not None:
                root.setLevel(log_level)

        _handle = Telemetry(tracer_provider, logger_provider, meter_provider, owns=(owns_tp, owns_lp, owns_mp),
                            drop_counters=drops, capture_payloads=capture_payloads, log_handler=handler,
                            exporter_owners=ours, exporters=raw_exporters,
                            shutdown_timeout_millis=shutdown_timeout_millis)
        _handle.redaction_engine = engine
        atexit.register(_handle.shutdown)
        if flush_on_sigterm:
            _flush_on_sigterm()
        return _handle


def _with_redaction(redaction: Any, span_exporter: Any, log_exporter: Any) -> tuple[Any, Any, Any]:
    """Wrap the exporters so nothing leaves the process unredacted (fails closed: bad rules raise here).

    ``redaction`` is an engine, a config, a dict or a YAML path (the sidecar's
    ``processors.redaction`` section), or True for the default rules.
    """
    from instrumentation.redaction import RedactingLogExporter, RedactingSpanExporter, make_engine

    engine = make_engine(None if redaction is True else redaction)
    return RedactingSpanExporter(span_exporter, engine), RedactingLogExporter(log_exporter, engine), engine


def _flush_on_sigterm() -> None:
    """Flush telemetry when the process is told to stop (Kubernetes sends SIGTERM), then stop as before.

    A process killed by SIGTERM's default action never runs ``atexit``; servers that handle
    SIGTERM themselves (uvicorn) restore the previous handler and re-raise it when they are
    done, which lands here too. An app's own handler is chained, never replaced.
    """
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN:
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        handle = _handle
        if handle is not None:
            handle.shutdown()
        if callable(previous):
            previous(signum, frame)
        else:  # SIG_DFL: die by the signal, as the process would have
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


def get_telemetry() -> Telemetry | None:
    """The handle of the earlier ``configure()`` call, or None."""
    return _handle


def shutdown(timeout_millis: int | None = None) -> None:
    """Flush everything buffered and stop exporting, within a bounded time (atexit also calls it)."""
    if _handle is not None:
        _handle.shutdown(timeout_millis)
