"""``configure()``: tracer, logger and meter providers exporting OTLP to the sidecar.

Everything the SDK already reads from ``OTEL_*`` variables is left to it (headers,
sampler, batch sizes, service name, resource attributes); exporters, protocols and
endpoints per signal are chosen in :mod:`instrumentation._exporters`; explicit arguments win.
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

from contract.attributes import SERVICE_NAME
from instrumentation._context import FORCE_KEEP, RequestContextSpanProcessor, current_request
from instrumentation._exporters import build_exporters, report_sdk_failures

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
                 shutdown_timeout_millis: int, console_handler: logging.Handler | None = None) -> None:
        self.tracer_provider = tracer_provider
        self.logger_provider = logger_provider
        self.meter_provider = meter_provider
        self.capture_payloads = capture_payloads
        #: the in-process redaction engine (None when off); JSONFormatter uses it for stdout too
        self.redaction_engine: Any = None
        self.log_handler = log_handler
        self.console_handler = console_handler
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
        """Flush all three signals in parallel; returns within ``timeout_millis`` (False if not all done).

        Whatever is still being retried against an unreachable sidecar at the deadline carries on
        in the background (daemon threads); the caller is not held past its deadline.
        """
        tasks = [lambda: self.tracer_provider.force_flush(timeout_millis)]
        if self.logger_provider is not None:
            tasks.append(lambda: self.logger_provider.force_flush(timeout_millis))  # type: ignore[union-attr]
        if self.meter_provider is not None:
            tasks.append(lambda: self.meter_provider.force_flush(timeout_millis))  # type: ignore[union-attr]
        return _run_with_deadline(tasks, timeout_millis / 1000)

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
        root = logging.getLogger()
        for h in (self.log_handler, self.console_handler):
            if h is not None:
                root.removeHandler(h)
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
        if not _run_with_deadline(tasks, timeout):
            for e in self._exporters:  # interrupts the exporters' retry back-off; unsent data is dropped
                try:
                    e.shutdown()
                except Exception:  # noqa: BLE001 - best effort at exit
                    pass


def _run_with_deadline(tasks: list[Any], timeout: float) -> bool:
    """Run ``tasks`` in parallel daemon threads; True when all finished (and none returned False) in time."""
    results: list[Any] = []

    def run(task: Any) -> None:
        try:
            results.append(task() is not False)
        except Exception:  # noqa: BLE001 - a failing provider is reported as not flushed
            results.append(False)

    threads = [threading.Thread(target=run, args=(t,), name="otel-flush", daemon=True) for t in tasks]
    deadline = time.monotonic() + max(0.0, timeout)
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return not any(t.is_alive() for t in threads) and all(results)


_lock = threading.Lock()
_handle: Telemetry | None = None


def _exporter_slot(processor: Any) -> tuple[Any, str] | None:
    """Where an SDK span/log processor keeps its exporter (Batch*: its worker; Simple*: itself), if anywhere."""
    worker = getattr(processor, "_batch_processor", None)
    if worker is not None and hasattr(worker, "_exporter"):
        return worker, "_exporter"
    for attr in ("span_exporter", "_exporter"):
        if attr in vars(processor):
            return processor, attr
    return None


def _adopt(processors: tuple[Any, ...], wrap: Any) -> bool:
    """Put in-process redaction in front of the exporters an existing provider already has.

    Returns whether the provider exports anywhere at all: if it does, configure() adds no
    exporter of its own, so nothing is exported twice.
    """
    exporting = False
    for p in processors:
        slot = _exporter_slot(p)
        if slot is None:
            continue
        exporting = True
        if wrap is not None:
            owner, attr = slot
            setattr(owner, attr, wrap(getattr(owner, attr)))
    return exporting


def configure(service_name: str | None = None, endpoint: str | None = None, protocol: Protocol | None = None, *,
              resource_attributes: Mapping[str, Any] | None = None, headers: dict[str, str] | None = None,
              redaction: Any = True, capture_payloads: bool = False, logging_bridge: bool = True,
              log_level: int | None = None, metrics_enabled: bool = True,
              max_queue_size: int | None = None, shutdown_timeout_millis: int = 5_000,
              flush_on_sigterm: bool = True) -> Telemetry:
    """Set up traces, logs and metrics over OTLP to the sidecar; idempotent (later calls return the first handle).

    Exporters, protocols and endpoints follow the standard ``OTEL_*`` variables, per signal
    too (see :mod:`instrumentation._exporters`); explicit ``endpoint``/``protocol`` win.
    ``redaction`` (True — the default — for the built-in detectors, a config path, dict or
    engine; False or None to turn it off) redacts spans and logs on the export thread before
    they leave the process; the sidecar redacts again before data leaves the pod. Its counts
    are exported as the ``sidecar_redaction_values`` counter, ``component="in_process"``.

    If the app (or ``opentelemetry-instrument``) already installed an SDK provider that
    exports, configure() adds no exporter to it — each span and log is exported once — and
    puts redaction in front of the exporters it has. Logging: if the root logger had no
    handler, WARNING and above still reach stderr as before, and the root level is lowered to
    INFO so INFO records are exported; an app that set up logging keeps its levels
    (``log_level`` sets the root level explicitly).
    """
    global _handle
    with _lock:
        if _handle is not None:
            return _handle
        # stable HTTP semantic conventions unless the user chose (``http/dup`` emits old and new)
        os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "http")
        span_exporters = build_exporters("traces", protocol=protocol, endpoint=endpoint, headers=headers)
        log_exporters = build_exporters("logs", protocol=protocol, endpoint=endpoint, headers=headers)
        metric_exporters = build_exporters("metrics", protocol=protocol, endpoint=endpoint, headers=headers) \
            if metrics_enabled else []
        raw_exporters = (*span_exporters, *log_exporters, *metric_exporters)
        engine = wrap_spans = wrap_logs = None
        if redaction not in (None, False):
            from instrumentation.redaction import RedactingLogExporter, RedactingSpanExporter, make_engine

            engine = make_engine(None if redaction is True else redaction)  # fails closed: bad rules raise here

            def wrap_spans(e: Any) -> Any:
                return e if isinstance(e, RedactingSpanExporter) else RedactingSpanExporter(e, engine)

            def wrap_logs(e: Any) -> Any:
                return e if isinstance(e, RedactingLogExporter) else RedactingLogExporter(e, engine)

        attrs = dict(resource_attributes or {})
        if service_name:
            attrs[SERVICE_NAME] = service_name
        # k8s identity < OTEL_RESOURCE_ATTRIBUTES/OTEL_SERVICE_NAME < explicit arguments
        resource = Resource(k8s_resource_attributes()).merge(Resource.create(attrs))

        queue = {"max_queue_size": max_queue_size, "max_export_batch_size": min(512, max_queue_size)} \
            if max_queue_size else {}
        span_processors = [BatchSpanProcessor(wrap_spans(e) if wrap_spans else e, **queue) for e in span_exporters]
        log_processors = [BatchLogRecordProcessor(wrap_logs(e) if wrap_logs else e, **queue) for e in log_exporters]
        drops = {"spans": _count_drops(span_processors[0]) if span_processors else None,
                 "logs": _count_drops(log_processors[0]) if log_processors else None}

        ours: list[Any] = []
        existing = trace.get_tracer_provider()
        if isinstance(existing, TracerProvider):
            tracer_provider, owns_tp = existing, False
            current = existing._active_span_processor._span_processors
            if not any(isinstance(p, RequestContextSpanProcessor) for p in current):
                existing.add_span_processor(RequestContextSpanProcessor())
            if _adopt(current, wrap_spans):
                span_processors, drops["spans"] = [], None
            ours.extend(span_processors)
        else:
            from opentelemetry.sdk.trace.sampling import _get_from_env_or_default

            tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False,
                                             sampler=ForceKeepSampler(_get_from_env_or_default()))
            owns_tp = True
            trace.set_tracer_provider(tracer_provider)
            tracer_provider.add_span_processor(RequestContextSpanProcessor())
        for sp in span_processors:
            tracer_provider.add_span_processor(sp)

        existing_lp = _logs.get_logger_provider()
        if isinstance(existing_lp, LoggerProvider):
            logger_provider, owns_lp = existing_lp, False
            if _adopt(existing_lp._multi_log_record_processor._log_record_processors, wrap_logs):
                log_processors, drops["logs"] = [], None
            ours.extend(log_processors)
        else:
            logger_provider, owns_lp = LoggerProvider(resource=resource, shutdown_on_exit=False), True
            _logs.set_logger_provider(logger_provider)
        for lp in log_processors:
            logger_provider.add_log_record_processor(lp)

        meter_provider: MeterProvider | None = None
        owns_mp = False
        if metrics_enabled:
            existing_mp = metrics.get_meter_provider()
            if isinstance(existing_mp, MeterProvider):
                meter_provider = existing_mp  # readers cannot be added later: the app's own export it
            else:
                meter_provider = MeterProvider(resource=resource, shutdown_on_exit=False, metric_readers=[
                    PeriodicExportingMetricReader(e) for e in metric_exporters])
                owns_mp = True
                metrics.set_meter_provider(meter_provider)
            if engine is not None:
                from instrumentation.redaction import export_redaction_counts

                export_redaction_counts(engine, meter_provider)

        report_sdk_failures()
        handler = console = None
        if logging_bridge:
            from instrumentation.logs import LoggingBridge, take_over_root_logging

            handler = LoggingBridge(logger_provider=logger_provider)
            console = take_over_root_logging(handler, log_level)

        _handle = Telemetry(tracer_provider, logger_provider, meter_provider, owns=(owns_tp, owns_lp, owns_mp),
                            drop_counters=drops, capture_payloads=capture_payloads, log_handler=handler,
                            exporter_owners=ours, exporters=raw_exporters,
                            shutdown_timeout_millis=shutdown_timeout_millis, console_handler=console)
        _handle.redaction_engine = engine
        atexit.register(_handle.shutdown)
        if flush_on_sigterm:
            _flush_on_sigterm()
        return _handle


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
