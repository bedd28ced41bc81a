"""The config core: one loader, one model base, one error style, the shared scalar types.

Nothing here imports the sidecar, grpc, torch or the OpenTelemetry SDK (pydantic and
PyYAML only), so the inference app reads the sidecar's YAML exactly as the sidecar does:

    doc = YamlFile.read("collector-config/sidecar.yaml")   # syntax errors carry file:line
    body = doc.value("processors", "redaction")             # ${env:…} expanded like otelcol
    try:
        cfg = MyConfig.model_validate(body)
    except ValidationError as e:
        raise doc.error(format_problems(e, "processors.redaction"))
"""

from __future__ import annotations

import re
import types
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationInfo, field_validator

from contract._yaml import EnvText, YamlFile, expand_env, resolved, typed_env_value
from contract.errors import ConfigError, format_problems

__all__ = [
    "ConfigError", "ConfigModel", "Duration", "EnvText", "HostPort", "YamlFile", "expand_env", "format_problems",
    "parse_duration", "parse_endpoint", "resolved", "split_host_port", "typed_env_value",
]


class ConfigModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are checked on assignment.

    A whole unquoted ``${env:VAR}`` (:class:`EnvText`) reaches a string field as the
    variable's text (``ID=0`` -> ``"0"``) and any other field as its YAML value, as the
    OpenTelemetry Collector does.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @field_validator("*", mode="before")
    @classmethod
    def _env_values(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        return value if field is None else _typed_for(value, field.annotation)


def _typed_for(value: Any, tp: Any) -> Any:
    """Each :class:`EnvText` in ``value`` as text where ``tp`` wants only a string, else as its YAML value."""
    if isinstance(value, EnvText):
        return str(value) if _wants_only_text(tp) else value.resolve()
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return _typed_for(value, args[0])
    if origin in (Union, types.UnionType):
        kind = _container_kind(value)
        shaped = [a for a in args if kind is not None and _container_kind(a) == kind]
        return _typed_for(value, shaped[0]) if len(shaped) == 1 else value
    kind = _container_kind(tp)
    if kind == "map" and isinstance(value, dict) and len(args) == 2:
        return {k: _typed_for(v, args[1]) for k, v in value.items()}
    if kind == "seq" and isinstance(value, list) and args and (len(args) == 1 or args[1] is Ellipsis):
        return [_typed_for(v, args[0]) for v in value]
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return value  # the model's own fields decide
    return _deep_resolved(value)  # Any, bare containers: no schema below, so YAML types


def _deep_resolved(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_resolved(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_resolved(v) for v in value]
    return resolved(value)


def _container_kind(obj: Any) -> str | None:
    """"map", "seq" or None, for a value or a type annotation."""
    if isinstance(obj, dict):
        return "map"
    if isinstance(obj, list):
        return "seq"
    origin = get_origin(obj) or obj
    if isinstance(origin, type) and issubclass(origin, Mapping):
        return "map"
    if isinstance(origin, type) and issubclass(origin, Sequence) and not issubclass(origin, (str, bytes)):
        return "seq"
    if origin in (set, frozenset):
        return "seq"
    return None


def _scalar_types(tp: Any) -> set:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return _scalar_types(args[0])
    if origin in (Union, types.UnionType):
        return set().union(*(_scalar_types(a) for a in args))
    if origin is Literal:
        return {type(a) for a in args}
    return {tp}


def _wants_only_text(tp: Any) -> bool:
    accepted = _scalar_types(tp)
    return str in accepted and not accepted & {int, float, Any, object}


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

_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):\d{1,5}$")


def parse_endpoint(value: Any) -> str:
    """``host:port`` (``[::1]:4317`` for IPv6), the port in range."""
    if not isinstance(value, str) or not _HOST_PORT.match(value):
        raise ValueError(f"expected host:port such as 127.0.0.1:4317, got {value!r}")
    port = int(value.rsplit(":", 1)[1])
    if port > 65535:
        raise ValueError(f"port {port} out of range")
    return value


HostPort = Annotated[str, BeforeValidator(parse_endpoint)]


def split_host_port(endpoint: str) -> tuple[str, int]:
    host, port = endpoint.rsplit(":", 1)
    return host.strip("[]"), int(port)
