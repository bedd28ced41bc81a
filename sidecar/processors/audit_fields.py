"""The ``audit_fields`` processor: each traces request reduced to what audit records are made of.

The audit branch sees every request, so everything in it runs on all the traffic. Placed in
front of the branch's ``redaction`` instance, this processor leaves only the spans a record
uses (entry spans and spans carrying model facts) with only the fields and attributes
:func:`sidecar.audit.records.extract` reads (:func:`sidecar.audit.records.reduce`, one C pass
over the bytes), and of spans repeating the facts of one kept before them only the first (a
generate loop's forward spans); redaction then scans a record's values, once, instead of whole
requests (on traffic where every request carries a prompt with PII, a quarter of the work). The
records come out identical: redaction works value by value, and extraction reads the same values
from the reduced request as from the whole one (tests/sidecar/audit/test_audit_fields.py).

What it removes is counted as dropped with reason ``filtered``. It feeds only ``audit``
exporters: the config check refuses a pipeline where it would cut data another exporter
sends on.
"""

from __future__ import annotations

from sidecar.audit.records import reduce
from sidecar.component import Component, Consumer, Kind
from sidecar.config import ConfigModel
from sidecar.envelope import Envelope
from sidecar.registry import CreateSettings, Factory
from sidecar.signals import Signal


class AuditFieldsConfig(ConfigModel):
    """No settings: what a record reads is fixed by :mod:`sidecar.audit.records`."""


class AuditFieldsProcessor(Component):
    def __init__(self, settings: CreateSettings, next_consumer: Consumer):
        self._tel = settings.telemetry
        self._next = next_consumer

    def consume(self, envelope: Envelope) -> None:
        reduced, kept = reduce(envelope.encoded)
        self._tel.dropped(Signal.TRACES, envelope.items - kept, "filtered")
        if not kept:
            return
        envelope.replace_encoding(reduced)
        envelope.items = kept
        self._next.consume(envelope)


FACTORY = Factory(
    type="audit_fields",
    kind=Kind.PROCESSOR,
    config_model=AuditFieldsConfig,
    create=lambda settings, cfg, next_consumer: AuditFieldsProcessor(settings, next_consumer),
    signals=frozenset({Signal.TRACES}),
    feeds_only=frozenset({"audit"}),
)
