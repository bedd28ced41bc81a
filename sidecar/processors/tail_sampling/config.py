"""Typed config of the ``tail_sampling`` processor, in the OpenTelemetry Collector's shape.

A policy is ``{name, type, <type>: {...}}``: the nested key must match the type
(``always_sample`` needs none). One model with an optional section per type keeps
every validation error on its YAML path
(``processors.tail_sampling.policies[2].latency.threshold_ms: must be > 0``),
which a pydantic tagged union would not (it inserts the tag into the path).
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, ValidationInfo, field_validator, model_validator

from sidecar.config import ConfigModel, Duration

PolicyType = Literal[
    "always_sample", "status_code", "latency", "probabilistic", "string_attribute", "numeric_attribute",
    "boolean_attribute", "rate_limiting", "span_count", "and", "drop", "composite", "adaptive",
]


def _positive(v: float) -> float:
    if v <= 0:
        raise ValueError("must be > 0")
    return v


def _percentage(v: float) -> float:
    if not 0 <= v <= 100:
        raise ValueError("must be between 0 and 100")
    return v


class StatusCodeConfig(ConfigModel):
    status_codes: list[Literal["OK", "ERROR", "UNSET"]]

    @field_validator("status_codes")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must list at least one of OK, ERROR, UNSET")
        return v


class LatencyConfig(ConfigModel):
    """Trace duration (earliest span start to latest span end) in [threshold_ms, upper_threshold_ms]."""

    # declared first so threshold_ms's validator can see it
    upper_threshold_ms: int = 0
    threshold_ms: int = 0

    @field_validator("upper_threshold_ms")
    @classmethod
    def _upper(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must be >= 0")
        return v

    @field_validator("threshold_ms")
    @classmethod
    def _threshold(cls, v: int, info: ValidationInfo) -> int:
        upper = info.data.get("upper_threshold_ms", 0)
        if v < 0 or (v == 0 and not upper):
            raise ValueError("must be > 0")
        if upper and v > upper:
            raise ValueError(f"must be <= upper_threshold_ms ({upper})")
        return v


class ProbabilisticConfig(ConfigModel):
    sampling_percentage: float

    _check = field_validator("sampling_percentage")(_percentage)


class StringAttributeConfig(ConfigModel):
    key: str
    values: list[str]
    enabled_regex_matching: bool = False
    invert_match: bool = False

    @field_validator("values")
    @classmethod
    def _values(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must list at least one value")
        return v

    @model_validator(mode="after")
    def _regexes_compile(self) -> "StringAttributeConfig":
        if self.enabled_regex_matching:
            from redaction import linear_regex

            for i, pattern in enumerate(self.values):
                try:
                    linear_regex(pattern)
                except ValueError as e:
                    raise ValueError(f"values[{i}]: {e}") from None
        return self


class NumericAttributeConfig(ConfigModel):
    key: str
    min_value: Optional[float] = None
    max_value: Optional[float] = None
    invert_match: bool = False

    @model_validator(mode="after")
    def _range(self) -> "NumericAttributeConfig":
        if self.min_value is None and self.max_value is None:
            raise ValueError("set min_value, max_value or both")
        if self.min_value is not None and self.max_value is not None and self.min_value > self.max_value:
            raise ValueError("min_value must be <= max_value")
        return self


class BooleanAttributeConfig(ConfigModel):
    key: str
    value: bool
    invert_match: bool = False


class RateLimitingConfig(ConfigModel):
    spans_per_second: int

    _check = field_validator("spans_per_second")(_positive)


class SpanCountConfig(ConfigModel):
    min_spans: int = 1
    max_spans: int = 0  # 0: no upper bound

    @field_validator("min_spans")
    @classmethod
    def _min(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must be >= 0")
        return v

    @field_validator("max_spans")
    @classmethod
    def _max(cls, v: int, info: ValidationInfo) -> int:
        if v < 0:
            raise ValueError("must be >= 0 (0 means no upper bound)")
        if v and v < info.data.get("min_spans", 0):
            raise ValueError("must be >= min_spans")
        return v


class AndConfig(ConfigModel):
    and_sub_policy: list["PolicyConfig"]

    @field_validator("and_sub_policy")
    @classmethod
    def _non_empty(cls, v: list) -> list:
        if not v:
            raise ValueError("must list at least one sub-policy")
        return v


class DropConfig(ConfigModel):
    """A trace matching every ``drop_sub_policy`` is dropped, whatever the other policies say."""

    drop_sub_policy: list["PolicyConfig"]

    @field_validator("drop_sub_policy")
    @classmethod
    def _non_empty(cls, v: list) -> list:
        if not v:
            raise ValueError("must list at least one sub-policy")
        return v


class RateAllocation(ConfigModel):
    policy: str
    percent: float

    _check = field_validator("percent")(_percentage)


class CompositeConfig(ConfigModel):
    max_total_spans_per_second: int
    policy_order: list[str]
    composite_sub_policy: list["PolicyConfig"]
    rate_allocation: list[RateAllocation] = Field(default_factory=list)

    _check = field_validator("max_total_spans_per_second")(_positive)

    @model_validator(mode="after")
    def _names(self) -> "CompositeConfig":
        names = {p.name for p in self.composite_sub_policy}
        for name in self.policy_order:
            if name not in names:
                raise ValueError(f"policy_order names {name!r}, which is not in composite_sub_policy")
        for a in self.rate_allocation:
            if a.policy not in names:
                raise ValueError(f"rate_allocation names {a.policy!r}, which is not in composite_sub_policy")
        if sum(a.percent for a in self.rate_allocation) > 100:
            raise ValueError("rate_allocation percents add up to more than 100")
        return self


class AdaptiveConfig(ConfigModel):
    """Hold about ``target_traces_per_second`` kept by this policy as traffic changes."""

    target_traces_per_second: float
    min_sampling_percentage: float = 0.1
    max_sampling_percentage: float = 100.0
    adjust_interval: Duration = 10.0

    _target = field_validator("target_traces_per_second", "adjust_interval")(_positive)
    _pct = field_validator("min_sampling_percentage", "max_sampling_percentage")(_percentage)

    @model_validator(mode="after")
    def _order(self) -> "AdaptiveConfig":
        if self.min_sampling_percentage > self.max_sampling_percentage:
            raise ValueError("min_sampling_percentage must be <= max_sampling_percentage")
        return self


class PolicyConfig(ConfigModel):
    name: str
    type: PolicyType
    status_code: Optional[StatusCodeConfig] = None
    latency: Optional[LatencyConfig] = None
    probabilistic: Optional[ProbabilisticConfig] = None
    string_attribute: Optional[StringAttributeConfig] = None
    numeric_attribute: Optional[NumericAttributeConfig] = None
    boolean_attribute: Optional[BooleanAttributeConfig] = None
    rate_limiting: Optional[RateLimitingConfig] = None
    span_count: Optional[SpanCountConfig] = None
    and_: Optional[AndConfig] = Field(default=None, alias="and")
    drop: Optional[DropConfig] = None
    composite: Optional[CompositeConfig] = None
    adaptive: Optional[AdaptiveConfig] = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @model_validator(mode="after")
    def _section_matches_type(self) -> "PolicyConfig":
        present = [t for t in _SECTIONS if getattr(self, _field(t)) is not None]
        if self.type == "always_sample":
            if present:
                raise ValueError(f"type 'always_sample' takes no settings, but {present[0]!r} is set")
            return self
        if self.type not in present:
            others = f" (found {', '.join(repr(p) for p in present)})" if present else ""
            raise ValueError(f"type {self.type!r} needs its settings under the key {self.type!r}{others}")
        extra = [p for p in present if p != self.type]
        if extra:
            raise ValueError(f"{extra[0]!r} does not match type {self.type!r}")
        return self

    def section(self):
        """The settings for this policy's type (None for always_sample)."""
        return None if self.type == "always_sample" else getattr(self, _field(self.type))


_SECTIONS = ("status_code", "latency", "probabilistic", "string_attribute", "numeric_attribute", "boolean_attribute",
             "rate_limiting", "span_count", "and", "drop", "composite", "adaptive")


def _field(section: str) -> str:
    return "and_" if section == "and" else section


class DecisionCacheConfig(ConfigModel):
    """LRU sets of decided trace ids, so late spans and logs follow the decision. 0 disables a set."""

    sampled_cache_size: int = 100_000
    non_sampled_cache_size: int = 100_000

    @field_validator("sampled_cache_size", "non_sampled_cache_size")
    @classmethod
    def _size(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must be >= 0")
        return v


class LogsConfig(ConfigModel):
    #: Log records at or above this severity_number are forwarded at once, whatever the trace's fate (17 = ERROR).
    #: 0 disables the exception.
    always_keep_severity_at_least: int = 17
    #: Share of log records without a trace id that pass.
    without_trace_sampling_percentage: float = 100.0

    _pct = field_validator("without_trace_sampling_percentage")(_percentage)

    @field_validator("always_keep_severity_at_least")
    @classmethod
    def _severity(cls, v: int) -> int:
        if not 0 <= v <= 24:
            raise ValueError("must be a severity_number between 0 and 24 (0 disables)")
        return v


class OutputConfig(ConfigModel):
    """``output``: decided data waiting for the next stage while it refuses (held in order, retried)."""

    #: above this many items waiting, new data is refused (``downstream_backpressure``) so senders back off
    backpressure_items: int = Field(50_000, ge=1)
    #: above this many, the oldest waiting output is dropped and counted (``downstream_refused``)
    max_items: int = Field(200_000, ge=1)

    @model_validator(mode="after")
    def _order(self) -> "OutputConfig":
        if self.max_items < self.backpressure_items:
            raise ValueError(f"max_items ({self.max_items}) must be >= backpressure_items ({self.backpressure_items})")
        return self


class WalConfig(ConfigModel):
    """``wal``: the write-ahead log that keeps undecided data on disk (with ``storage``; see durable.py)."""

    #: bytes on disk beyond which new data is refused (retryable, ``storage_full``) until decided data is deleted
    max_bytes: int = Field(1 << 30, ge=1 << 20)
    #: a segment file is closed at this size (or after a second); it is deleted once all it holds is handed on
    segment_bytes: int = Field(8 << 20, ge=4096)


class TailSamplingConfig(ConfigModel):
    decision_wait: Duration = 10.0
    #: Decide this long after the local root span arrived instead of waiting the full decision_wait.
    decision_wait_after_root_received: Duration = 1.0
    num_traces: int = 50_000
    #: Memory budget of undecided data: items are held encoded, so this is their wire size plus the
    #: measured per-item and per-trace overhead (the sidecar_tail_sampling_buffered_bytes gauge).
    max_buffered_bytes: int = 128 * 1024 * 1024
    decision_cache: DecisionCacheConfig = Field(default_factory=DecisionCacheConfig)
    logs: LogsConfig = Field(default_factory=LogsConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    #: id of a ``file_storage`` extension: undecided traces and logs are logged to disk before the
    #: acknowledgement and recovered at start, so a crash loses nothing acknowledged
    storage: str | None = None
    wal: WalConfig = Field(default_factory=WalConfig)
    policies: list[PolicyConfig]

    _wait = field_validator("decision_wait")(_positive)

    @field_validator("num_traces", "max_buffered_bytes")
    @classmethod
    def _bounds(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be > 0")
        return v

    @model_validator(mode="after")
    def _wal_needs_storage(self) -> "TailSamplingConfig":
        if "wal" in self.model_fields_set and self.storage is None:
            raise ValueError("wal: takes effect only with storage (name a file_storage extension)")
        return self

    def extension_refs(self) -> dict[str, str]:
        """Extensions this processor needs at start (checked by config validation)."""
        return {"storage": self.storage} if self.storage else {}

    @field_validator("policies")
    @classmethod
    def _policies(cls, v: list[PolicyConfig]) -> list[PolicyConfig]:
        if not v:
            raise ValueError("must list at least one policy")
        seen = set()
        for p in v:
            if p.name in seen:
                raise ValueError(f"policy name {p.name!r} is used twice")
            seen.add(p.name)
        return v


AndConfig.model_rebuild()
DropConfig.model_rebuild()
CompositeConfig.model_rebuild()
