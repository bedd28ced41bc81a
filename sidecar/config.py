"""YAML -> typed, validated config, in the OpenTelemetry Collector's shape.

Every problem is reported with its YAML path
(``processors.tail_sampling.policies[2].latency.threshold_ms: must be > 0``) and, where the
file says, its line (``ConfigError.located``); ``load_config`` collects all of them before
failing so ``validate`` lists every one. Component sections are validated by the config
model each factory declares. Reading YAML, env expansion, the model base and the scalar
types come from :mod:`contract.config`, which the app uses to read this same file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from pydantic import Field, ValidationError, field_validator

from contract.config import (  # noqa: F401 - re-exported: component configs import them from here
    ConfigError,
    ConfigModel,
    Duration,
    HostPort,
    YamlFile,
    expand_env,
    format_problems,
    parse_duration,
    parse_endpoint,
    resolved,
    split_host_port,
)
from sidecar.component import Kind
from sidecar.registry import ComponentId, factory_for, known_types
from sidecar.signals import Signal

pydantic_problems = format_problems  # the name component tests know


# --- the top level -----------------------------------------------------------------------------


class PipelineConfig(ConfigModel):
    receivers: list[str] = Field(default_factory=list)
    processors: list[str] = Field(default_factory=list)
    exporters: list[str] = Field(default_factory=list)


class MetricsTelemetryConfig(ConfigModel):
    """Where the Prometheus ``/metrics`` endpoint (self-telemetry and span metrics) listens."""

    address: HostPort | None = "127.0.0.1:8888"


class LogsTelemetryConfig(ConfigModel):
    level: str = "info"

    @field_validator("level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.lower() not in {"debug", "info", "warn", "warning", "error"}:
            raise ValueError("must be one of debug, info, warn, error")
        return v.lower()


class TelemetryConfig(ConfigModel):
    metrics: MetricsTelemetryConfig = Field(default_factory=MetricsTelemetryConfig)
    logs: LogsTelemetryConfig = Field(default_factory=LogsTelemetryConfig)


class ServiceConfig(ConfigModel):
    extensions: list[str] = Field(default_factory=list)
    pipelines: dict[str, PipelineConfig]
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    #: SIGTERM grace period: receivers stop, stages drain, queues flush within this time.
    shutdown_timeout: Duration = 30.0


@dataclass(frozen=True)
class ComponentConfig:
    id: ComponentId
    kind: Kind
    config: Any  # the factory's ConfigModel instance


@dataclass(frozen=True)
class Config:
    """The whole validated config: every component's typed config plus the service section."""

    receivers: dict[str, ComponentConfig]
    processors: dict[str, ComponentConfig]
    exporters: dict[str, ComponentConfig]
    extensions: dict[str, ComponentConfig]
    service: ServiceConfig

    def section(self, kind: Kind) -> dict[str, ComponentConfig]:
        return getattr(self, kind.section)


def pipeline_signal(pipeline_id: str) -> Signal:
    type_ = pipeline_id.partition("/")[0]
    try:
        return Signal(type_)
    except ValueError:
        raise ValueError(f"unknown signal {type_!r}: pipeline ids start with traces, logs or metrics") from None


# --- loading ----------------------------------------------------------------------------------


def load_config(path: str | os.PathLike, environ: dict[str, str] | None = None) -> Config:
    return _parse(YamlFile.read(path), environ)


def parse_config(text: str, source: str = "<config>", environ: dict[str, str] | None = None) -> Config:
    return _parse(YamlFile(text, source), environ)


def _parse(doc: YamlFile, environ: dict[str, str] | None) -> Config:
    raw = resolved(doc.value(environ=environ))
    if raw is None:
        raw = {}
    if isinstance(raw, dict):  # a whole section may come from one ${env:…}
        raw = {k: resolved(v) for k, v in raw.items()}
    else:
        raise doc.error([f"{doc.source}: the top level must be a mapping with receivers, exporters and service"])

    problems: list[str] = list(doc.problems)
    known_top = {"receivers", "processors", "exporters", "extensions", "service", "connectors"}
    for key in raw:
        if key not in known_top:
            problems.append(f"{key}: unknown key (expected one of {', '.join(sorted(known_top - {'connectors'}))})")
    if "connectors" in raw:
        problems.append("connectors: connectors are not supported by this sidecar")

    sections: dict[Kind, dict[str, ComponentConfig]] = {}
    for kind in Kind:
        section = raw.get(kind.section) or {}
        if not isinstance(section, dict):
            problems.append(f"{kind.section}: must be a mapping of component id to its settings")
            section = {}
        parsed: dict[str, ComponentConfig] = {}
        for key, body in section.items():
            body = resolved(body)
            where = f"{kind.section}.{key}"
            try:
                cid = ComponentId.parse(str(key))
            except ValueError as e:
                problems.append(f"{where}: {e}")
                continue
            factory = factory_for(kind, cid.type)
            if factory is None:
                problems.append(f"{where}: unknown {kind.value} type {cid.type!r} (known: {', '.join(known_types(kind))})")
                continue
            if body is None:
                body = {}
            if not isinstance(body, dict):
                problems.append(f"{where}: must be a mapping, got {type(body).__name__}")
                continue
            try:
                cfg = factory.config_model.model_validate(body)
            except ValidationError as e:
                problems.extend(format_problems(e, where))
                continue
            parsed[str(key)] = ComponentConfig(cid, kind, cfg)
        sections[kind] = parsed

    service_raw = raw.get("service")
    service = None
    if not isinstance(service_raw, dict):
        problems.append("service: missing; it must name at least one pipeline under service.pipelines")
    else:
        try:
            service = ServiceConfig.model_validate(service_raw)
        except ValidationError as e:
            problems.extend(format_problems(e, "service"))

    if service is not None:
        problems.extend(_check_references(service, sections, raw))

    if problems:
        raise doc.error(problems)
    return Config(
        receivers=sections[Kind.RECEIVER],
        processors=sections[Kind.PROCESSOR],
        exporters=sections[Kind.EXPORTER],
        extensions=sections[Kind.EXTENSION],
        service=service,
    )


def _check_references(service: ServiceConfig, sections: dict[Kind, dict[str, ComponentConfig]], raw: dict) -> list[str]:
    problems = []
    for i, ext in enumerate(service.extensions):
        if ext not in sections[Kind.EXTENSION] and ext not in (raw.get("extensions") or {}):
            problems.append(f"service.extensions[{i}]: references {ext!r}, which is not defined under extensions")
    # components that name an extension (a persistent queue's storage) say so through extension_refs()
    for kind in (Kind.RECEIVER, Kind.PROCESSOR, Kind.EXPORTER):
        for name, cc in sections[kind].items():
            refs = getattr(cc.config, "extension_refs", None)
            for key, ext in (refs() if refs else {}).items():
                if ext not in service.extensions:
                    problems.append(f"{kind.section}.{name}.{key}: references extension {ext!r}, which is not "
                                    "enabled (define it under extensions and list it in service.extensions)")
    if not service.pipelines:
        problems.append("service.pipelines: at least one pipeline is required")
    processor_signals: dict[tuple[str, Signal], str] = {}
    for pid, pipe in service.pipelines.items():
        where = f"service.pipelines.{pid}"
        try:
            signal = pipeline_signal(pid)
        except ValueError as e:
            problems.append(f"{where}: {e}")
            continue
        if not pipe.receivers:
            problems.append(f"{where}.receivers: a pipeline needs at least one receiver")
        if not pipe.exporters:
            problems.append(f"{where}.exporters: a pipeline needs at least one exporter")
        for kind, names in ((Kind.RECEIVER, pipe.receivers), (Kind.PROCESSOR, pipe.processors), (Kind.EXPORTER, pipe.exporters)):
            seen = set()
            for i, name in enumerate(names):
                at = f"{where}.{kind.section}[{i}]"
                if name in seen:
                    problems.append(f"{at}: {name!r} is listed twice in this pipeline")
                seen.add(name)
                defined = sections[kind].get(name)
                if defined is None:
                    if name not in (raw.get(kind.section) or {}):
                        problems.append(f"{at}: references {name!r}, which is not defined under {kind.section}")
                    continue
                factory = factory_for(kind, defined.id.type)
                if signal not in factory.signals:
                    problems.append(f"{at}: {kind.value} {name!r} does not support {signal.value}"
                                    f" (supports {', '.join(sorted(s.value for s in factory.signals))})")
                if kind is Kind.PROCESSOR:
                    for j, exp in enumerate(pipe.exporters):
                        target = sections[Kind.EXPORTER].get(exp)
                        if factory.feeds_only and target is not None and target.id.type not in factory.feeds_only:
                            problems.append(f"{at}: processor {name!r} keeps only what {', '.join(sorted(factory.feeds_only))}"
                                            f" exporters read, so it cannot feed exporter {exp!r} "
                                            f"({where}.exporters[{j}]); give that exporter a pipeline of its own")
                    other = processor_signals.get((name, signal))
                    if other is not None:
                        problems.append(f"{at}: processor {name!r} is already used by {other}, another {signal.value} "
                                        f"pipeline; define a second instance such as {defined.id.type}/2")
                    processor_signals[(name, signal)] = pid
    return problems
