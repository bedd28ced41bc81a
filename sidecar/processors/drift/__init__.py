"""``drift``: drift scores per model version and feature against a pinned reference (see :mod:`.processor`)."""

from __future__ import annotations

from sidecar.component import Kind
from sidecar.processors.drift.config import DriftConfig
from sidecar.processors.drift.processor import DriftProcessor
from sidecar.registry import Factory
from sidecar.signals import Signal

__all__ = ["DriftConfig", "DriftProcessor", "FACTORY"]

FACTORY = Factory(
    type="drift",
    kind=Kind.PROCESSOR,
    config_model=DriftConfig,
    create=lambda settings, cfg, next_consumer: DriftProcessor(settings, cfg, next_consumer),
    signals=frozenset({Signal.METRICS}),
    telemetry=frozenset({"sidecar_drift_chi2", "sidecar_drift_dropped_points", "sidecar_drift_js", "sidecar_drift_psi",
                         "sidecar_drift_samples", "sidecar_drift_wasserstein"}),
)
