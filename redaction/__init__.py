"""One redaction rule engine for the app and the sidecar: no PII or secret leaves the pod.

Importable without grpc, torch or the OTel SDK (RE2, pydantic and the stdlib only).
The protobuf adapter lives in :mod:`redaction.otlp`; the in-process SDK adapters in
:mod:`instrumentation.redaction`.

    engine = RedactionEngine(load_redaction_config("collector-config/sidecar.yaml"))
    engine.redact_text("classify the photo sent by bob@example.com please")
    # -> 'classify the photo sent by [EMAIL] please'
"""

from redaction._config import (
    Action,
    DetectorConfig,
    DetectorsConfig,
    KeyRule,
    RedactionConfig,
    RedactionConfigError,
    ValueRule,
    format_problems,
    linear_regex,
    load_redaction_config,
)
from redaction._detectors import BUILTIN_KEY_PATTERNS, DETECTOR_NAMES
from redaction._engine import DROP, SCAN_LOCK, RedactionEngine, RedactionStats

__all__ = [
    "Action",
    "BUILTIN_KEY_PATTERNS",
    "DETECTOR_NAMES",
    "DROP",
    "DetectorConfig",
    "DetectorsConfig",
    "KeyRule",
    "RedactionConfig",
    "RedactionConfigError",
    "RedactionEngine",
    "RedactionStats",
    "SCAN_LOCK",
    "ValueRule",
    "format_problems",
    "linear_regex",
    "load_redaction_config",
]
