"""The ``redaction`` processor: no PII or secret leaves the pod.

Applies the shared rule engine (:mod:`redaction`) to every request, in place, for all
three signals. The config section is the engine's config, with the OpenTelemetry
Collector's key names (``allow_all_keys``, ``allowed_keys``, ``blocked_key_patterns``,
``blocked_values``, ``allowed_values``, ``hash_function``, ``summary``) plus
``detectors``. A rule that cannot compile fails config validation with its YAML path;
``hash`` without its key in the environment fails start-up.

Each request is redacted on the wire (:mod:`sidecar.wire_redaction`: strings located in the
encoded request, scanned in one RE2 pass, replacements spliced into the bytes), which gives
the same output as the object-level adapter (``redaction.otlp``) at a fraction of the cost on
PII-dense traffic. The rare request the wire path hands back (malformed bytes, or a changed
item that already carries summary attributes from an earlier stage) goes through the object
path.

In the recommended pipeline it runs after tail sampling, so dropped data costs
nothing to redact. It fails closed: if redacting a request raises, the request is
refused (not retryable) instead of being forwarded unredacted.

Per-rule counts are served as ``sidecar_redaction_values_total{component, rule, action}``,
read from the engine's stats at scrape time, so the hot path touches no Prometheus label.
"""

from __future__ import annotations

import logging
import os
from typing import Iterator

from prometheus_client.core import CounterMetricFamily

from redaction import SCAN_LOCK, RedactionConfig, RedactionConfigError, RedactionEngine, RedactionStats
from redaction.otlp import OtlpRedactor
from sidecar import wire_redaction
from sidecar.component import Component, Consumer, Kind, Refused
from sidecar.envelope import Envelope
from sidecar.registry import ALL_SIGNALS, CreateSettings, Factory

log = logging.getLogger(__name__)

#: The wire path pays off with the C half of ``sidecar.wire_redaction``. Its pure-Python half walks every
#: field from Python, which costs more than the object path with its prefilter, so without the extension
#: (or with SIDECAR_PURE_PYTHON=1) the processor keeps the object path; both give the same output
#: (tests/sidecar/test_wire_redaction.py). ``SIDECAR_REDACTION_PATH=object`` keeps the object path
#: anyway: an escape hatch, and how benchmarks/throughput.py compares the two in one run.
WIRE = (wire_redaction.IMPLEMENTATION == "c"
        and os.environ.get("SIDECAR_REDACTION_PATH", "").strip().lower() != "object")


class RedactionProcessor(Component):
    def __init__(self, settings: CreateSettings, config: RedactionConfig, next_consumer: Consumer):
        try:
            self.engine = RedactionEngine(config)
        except RedactionConfigError as e:
            # start-up fails with the YAML path, like a config error
            raise RedactionConfigError([f"processors.{settings.id}.{p}" for p in e.problems]) from None
        self.redactor = OtlpRedactor(self.engine)
        self._tel = settings.telemetry
        self._next = next_consumer
        settings.telemetry.root.collector("sidecar_redaction_values", _RedactionMetrics).add(
            str(settings.id), self.engine.stats)

    def consume(self, envelope: Envelope) -> None:
        signal = envelope.signal
        try:
            with SCAN_LOCK:  # one request scanned at a time: see redaction._engine.SCAN_LOCK
                if WIRE:
                    self._redact_wire(envelope)
                else:
                    self.redactor.redact(signal.value, envelope.mutable())
        except Exception as e:  # fail closed: never forward what could not be redacted
            log.exception("redaction failed; refusing the request")
            raise Refused("redaction_error", retryable=False, message=f"redaction failed: {e}") from e
        self._next.consume(envelope)

    def _redact_wire(self, envelope: Envelope) -> None:
        """On the bytes; what the wire path hands back (see the module docstring) goes the object path."""
        try:
            new = wire_redaction.redact(self.engine, envelope.signal.value, envelope.encoded)
        except (wire_redaction.NeedsObjectPath, ValueError):
            self.redactor.redact(envelope.signal.value, envelope.mutable())
        else:
            if new is not None:
                envelope.replace_encoding(new)


class _RedactionMetrics:
    """``sidecar_redaction_values_total``: one family per registry, one stats object per component."""

    def __init__(self) -> None:
        self._components: dict[str, RedactionStats] = {}

    def add(self, component: str, stats: RedactionStats) -> None:
        self._components[component] = stats

    def describe(self) -> list:
        return [CounterMetricFamily("sidecar_redaction_values", "Values changed by a redaction rule, by action.",
                                    labels=("component", "rule", "action"))]

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = self.describe()[0]
        for component, stats in list(self._components.items()):
            for (rule, action), n in sorted(stats.snapshot().items()):
                family.add_metric((component, rule, action), n)
        yield family


FACTORY = Factory(
    type="redaction",
    kind=Kind.PROCESSOR,
    config_model=RedactionConfig,
    create=lambda settings, cfg, next_consumer: RedactionProcessor(settings, cfg, next_consumer),
    signals=ALL_SIGNALS,
    telemetry=frozenset({"sidecar_redaction_values"}),
)
