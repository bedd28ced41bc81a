"""Config of the ``drift`` processor (otelcol style: durations as ``10m``, unknown keys rejected)."""

from __future__ import annotations

import os
from typing import Optional

from pydantic import Field, field_validator

from sidecar.config import ConfigModel, Duration


class ReferenceConfig(ConfigModel):
    #: A reference file written by ``python -m sidecar drift export-reference``; its entries win over
    #: the pinned window for the versions (or ``*``) they name.
    file: Optional[str] = None
    #: Without a file entry: a version's first ``window`` (as this sidecar saw it) is its reference.
    window: Duration = 3600.0

    @field_validator("window")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be > 0")
        return v

    @field_validator("file")
    @classmethod
    def _exists(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not os.path.isfile(v):
            raise ValueError(f"{v!r} does not exist")
        return v


class DriftConfig(ConfigModel):
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    #: The sliding current window compared with the reference.
    window: Duration = 600.0
    #: Time slices the current window slides by (window / slices each).
    slices: int = Field(10, ge=1, le=1000)
    #: Values each window must hold before a feature gets scores.
    min_samples: int = Field(50, ge=1)
    #: Reference-quantile groups PSI and JS are computed on (numeric features).
    psi_bins: int = Field(10, ge=2, le=100)
    #: How often the scores are sent as OTLP gauges into the metrics pipeline.
    flush_interval: Duration = 15.0
    #: An app process's cumulative series not exported for this long is forgotten (it ended).
    stale_after: Duration = 900.0
    #: (model id, version, feature) combinations kept; further ones are dropped and counted.
    max_series: int = Field(10_000, ge=1)

    @field_validator("window", "flush_interval", "stale_after")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be > 0")
        return v
