"""The one list of component types the sidecar knows, and the ``type/name`` ids that pick them.

Each component module exposes ``FACTORY``: its type name, kind, config model,
supported signals and one ``create`` function. Adding a component means adding
its module path here. The config loader imports this module, never the reverse,
and component modules are loaded by name on first lookup, so there is no import cycle.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from sidecar.component import Kind
from sidecar.signals import Signal

if TYPE_CHECKING:
    from sidecar.component import Component, Consumer
    from sidecar.telemetry import ComponentTelemetry

ALL_SIGNALS = frozenset(Signal)
_TYPE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class ComponentId:
    """``otlp/jaeger`` -> type ``otlp``, name ``jaeger``."""

    type: str
    name: str = ""

    @classmethod
    def parse(cls, text: str) -> "ComponentId":
        if not isinstance(text, str) or not text or text.count("/") > 1:
            raise ValueError(f"invalid component id {text!r}: expected type or type/name")
        type_, slash, name = text.partition("/")
        if not _TYPE.match(type_):
            raise ValueError(f"invalid component type {type_!r} in {text!r}")
        if slash and not name:
            raise ValueError(f"invalid component id {text!r}: empty name after '/'")
        return cls(type_, name)

    def __str__(self) -> str:
        return f"{self.type}/{self.name}" if self.name else self.type


@dataclass(frozen=True)
class CreateSettings:
    """What every component gets at creation, besides its config and the next stage."""

    id: ComponentId
    kind: Kind
    telemetry: "ComponentTelemetry"


@dataclass(frozen=True)
class Factory:
    type: str
    kind: Kind
    config_model: type
    #: create(settings, config, next_consumer) -> Component. ``next_consumer`` is None for
    #: exporters and extensions.
    create: Callable[[CreateSettings, object, "Consumer | None"], "Component"]
    signals: frozenset = field(default=ALL_SIGNALS)
    #: names of the metric families the component registers (``telemetry.root.family``) beyond the
    #: received/accepted/refused/dropped counters the pipeline keeps for it; checked by the contract test
    telemetry: frozenset = field(default=frozenset())
    #: processors that keep only what some exporter types read: the exporter types its pipelines may
    #: have (empty: any); the config check refuses any other
    feeds_only: frozenset = field(default=frozenset())


_MODULES = (
    "sidecar.receivers.otlp",
    "sidecar.processors.batch",
    "sidecar.processors.memory_limiter",
    "sidecar.processors.span_metrics",
    "sidecar.processors.tail_sampling",
    "sidecar.processors.redaction",
    "sidecar.processors.k8s_resource",
    "sidecar.processors.drift",
    "sidecar.processors.audit_fields",
    "sidecar.exporters.otlp",
    "sidecar.exporters.otlphttp",
    "sidecar.exporters.file",
    "sidecar.exporters.debug",
    "sidecar.exporters.audit",
    "sidecar.exporters.syslog",
    "sidecar.extensions.health_check",
    "sidecar.extensions.file_storage",
)

_factories: dict[tuple[Kind, str], Factory] | None = None


def _load() -> dict[tuple[Kind, str], Factory]:
    global _factories
    if _factories is None:
        found = {}
        for name in _MODULES:
            try:
                module = importlib.import_module(name)
            except ModuleNotFoundError as e:
                if e.name == name:  # not written yet; anything else missing is a real error
                    continue
                raise
            f: Factory = module.FACTORY
            found[(f.kind, f.type)] = f
        _factories = found
    return _factories


def factory_for(kind: Kind, type_: str) -> Factory | None:
    return _load().get((kind, type_))


def known_types(kind: Kind) -> list[str]:
    return sorted(t for (k, t) in _load() if k is kind)
