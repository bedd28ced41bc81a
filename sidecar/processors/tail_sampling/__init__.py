"""``tail_sampling``: keep whole traces (spans and their logs) by policy, decided once per trace.

Layout: ``config`` (the typed YAML section), ``policies`` (keep/drop rules),
``decisions`` (consistent sampling thresholds, tracestate, the decision cache),
``buffer`` (undecided traces held as their encoded bytes; ``_trace.c`` or its twin ``_trace_py``: a
trace's fields, the sort of a request into the buffer, the decision loop), ``durable`` and ``wal`` (the buffer's
write-ahead log with ``storage``), ``processor`` (the component).
"""

from sidecar.component import Kind
from sidecar.processors.tail_sampling.config import TailSamplingConfig
from sidecar.processors.tail_sampling.durable import TELEMETRY as DURABLE_TELEMETRY
from sidecar.processors.tail_sampling.processor import POLICY_ATTRIBUTE, TailSamplingProcessor
from sidecar.registry import Factory
from sidecar.signals import Signal

FACTORY = Factory(
    type="tail_sampling",
    kind=Kind.PROCESSOR,
    config_model=TailSamplingConfig,
    create=lambda settings, cfg, next_consumer: TailSamplingProcessor(settings, cfg, next_consumer),
    signals=frozenset({Signal.TRACES, Signal.LOGS}),
    telemetry=frozenset({"sidecar_tail_sampling_buffered_bytes", "sidecar_tail_sampling_buffered_traces",
                         "sidecar_tail_sampling_early_decisions", "sidecar_tail_sampling_late_items",
                         "sidecar_tail_sampling_traces"}) | DURABLE_TELEMETRY,
)

__all__ = ["FACTORY", "POLICY_ATTRIBUTE", "TailSamplingConfig", "TailSamplingProcessor"]
