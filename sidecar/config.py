"""YAML -> typed, validated config, in the OpenTelemetry Collector's shape.

Every problem is reported with its YAML path
(``processors.tail_sampling.policies[2].latency.threshold_ms: must be > 0``);
``load_config`` collects all of them before failing so ``validate`` lists every one.
Component sections are validated by the config model each factory declares.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from redaction import format_problems as pydantic_problems  # the one YAML-path error formatter
from sidecar.component import Kind
from sidecar.signals import Signal


class ConfigError(Exception):
    """The config is invalid. ``problems`` holds one ``path: message`` line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


class ConfigModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --- scalar types shared by component configs -------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """``"5s"``, ``"200ms"``, ``"1m"`` or a bare number of seconds -> seconds as float."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 5s or 200ms")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("must be >= 0")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError(f"expected a duration such as 5s or 200ms, got {value!r}")


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds; written in YAML as ``5s``, ``200ms``, ``1m`` or a number of seconds."""


def parse_endpoint(value: Any) -> str:
    if not isinstance(value, str) or not re.match(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):\d{1,5}$", value):
        raise ValueError(f"expected host:port such as 127.0.0.1:4317, got {value!r}")
    port = int(value.rsplit(":", 1)[1])
    if port > 65535:
        raise ValueError(f"port {port} out of range")
    return value


HostPort = Annotated[str, BeforeValidator(parse_endpoint)]


def split_host_port(endpoint: str) -> tuple[str, int]:
    host, port = endpoint.rsplit(":", 1)
    return host.strip("[]"), int(port)


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
class ComponentId:
    """``otlp/jaeger`` -> type ``otlp``, name ``jaeger``."""

    type: str
    name: str = ""

    @classmethod
    def parse(cls, text: str) -> "ComponentId":
        if not isinstance(text, str) or not text or text.count("/") > 1:
            raise ValueError(f"invalid component id {text!r}: expected type or type/name")
        type_, _, name = text.partition("/")
        if not re.match(r"^[a-z][a-z0-9_]*$", type_):
            raise ValueError(f"invalid component type {type_!r} in {text!r}")
        if _ and not name:
            raise ValueError(f"invalid component id {text!r}: empty name after '/'")
        return cls(type_, name)

    def __str__(self) -> str:
        return f"{self.type}/{self.name}" if self.name else self.type


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


# --- environment expansion --------------------------------------------------------------------

_ENV_REF = re.compile(r"\$\$|\$\{(?:env:)?([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(node: Any, path: str, problems: list[str], environ: dict[str, str] | None = None) -> Any:
    """Replace ``${env:VAR}``, ``${env:VAR:-default}`` and ``${VAR}`` in every string; ``$$`` is a literal ``$``.

    A scalar that is exactly one reference is re-read as YAML, so ``port: ${env:PORT}`` becomes an int.
    An unset variable without a default is an error naming the path.
    """
    env = os.environ if environ is None else environ
    if isinstance(node, dict):
        return {k: expand_env(v, _join(path, str(k)), problems, env) for k, v in node.items()}
    if isinstance(node, list):
        return [expand_env(v, f"{path}[{i}]", problems, env) for i, v in enumerate(node)]
    if not isinstance(node, str) or "$" not in node:
        return node

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        problems.append(f"{path}: environment variable {name} is not set and has no default (use ${{env:{name}:-default}})")
        return ""

    whole = _ENV_REF.fullmatch(node)
    expanded = _ENV_REF.sub(sub, node)
    if whole and whole.group(0) != "$$":
        try:
            return yaml.safe_load(expanded) if expanded != "" else ""
        except yaml.YAMLError:
            return expanded
    return expanded


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --- loading ----------------------------------------------------------------------------------


def load_config(path: str | os.PathLike, environ: dict[str, str] | None = None) -> Config:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read config: {e.strerror}"]) from None
    return parse_config(text, source=str(path), environ=environ)


def parse_config(text: str, source: str = "<config>", environ: dict[str, str] | None = None) -> Config:
    from sidecar.registry import factory_for  # late: the registry imports component modules

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError([f"{source}: not valid YAML: {e}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{source}: the top level must be a mapping with receivers, exporters and service"])

    problems: list[str] = []
    raw = expand_env(raw, "", problems, environ)
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
            where = f"{kind.section}.{key}"
            try:
                cid = ComponentId.parse(str(key))
            except ValueError as e:
                problems.append(f"{where}: {e}")
                continue
            factory = factory_for(kind, cid.type)
            if factory is None:
                from sidecar.registry import known_types

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
                problems.extend(pydantic_problems(e, where))
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
            problems.extend(pydantic_problems(e, "service"))

    if service is not None:
        problems.extend(_check_references(service, sections, raw))

    if problems:
        raise ConfigError(problems)
    return Config(
        receivers=sections[Kind.RECEIVER],
        processors=sections[Kind.PROCESSOR],
        exporters=sections[Kind.EXPORTER],
        extensions=sections[Kind.EXTENSION],
        service=service,
    )


def _check_references(service: ServiceConfig, sections: dict[Kind, dict[str, ComponentConfig]], raw: dict) -> list[str]:
    from sidecar.registry import factory_for

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
                    other = processor_signals.get((name, signal))
                    if other is not None:
                        problems.append(f"{at}: processor {name!r} is already used by {other}, another {signal.value} "
                                        f"pipeline; define a second instance such as {defined.id.type}/2")
                    processor_signals[(name, signal)] = pid
    return problems
