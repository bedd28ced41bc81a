"""``k8s_resource``: the pod's Kubernetes identity on the resource of everything forwarded.

In a pod the sidecar is given its identity through the downward API (``K8S_POD_NAME``,
``K8S_NAMESPACE_NAME``, ... in deploy/kubernetes). This processor reads those variables
once, at construction, and sets ``k8s.pod.name``, ``k8s.namespace.name``, ... on every
resource of every request that does not already carry them, so a backend can find a
trace's pod without asking the Kubernetes API (what otelcol's ``k8sattributes`` does with
RBAC and a watch; here the pod tells us). Like otelcol's ``resource`` processor with
``from_env``, but with the semantic-convention names as defaults.

    processors:
      k8s_resource:
        attributes:            # resource attribute -> environment variable (these are the defaults)
          k8s.pod.name: K8S_POD_NAME
        override: false        # true: replace values the app set itself

It mutates data: put it last in a pipeline, after sampling, so dropped data costs nothing.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping

from pydantic import Field, field_validator

from sidecar.component import Component, Consumer, Kind
from sidecar.config import ConfigModel
from sidecar.envelope import Envelope
from sidecar.registry import ALL_SIGNALS, CreateSettings, Factory
from sidecar.signals import Signal

log = logging.getLogger(__name__)

#: Semantic-convention resource attributes and the variables deploy/kubernetes fills from the downward API.
DEFAULT_ATTRIBUTES = {
    "k8s.pod.name": "K8S_POD_NAME",
    "k8s.pod.uid": "K8S_POD_UID",
    "k8s.namespace.name": "K8S_NAMESPACE_NAME",
    "k8s.node.name": "K8S_NODE_NAME",
    "k8s.deployment.name": "K8S_DEPLOYMENT_NAME",
}

_RESOURCE_LISTS = {Signal.TRACES: "resource_spans", Signal.LOGS: "resource_logs", Signal.METRICS: "resource_metrics"}


class K8sResourceConfig(ConfigModel):
    #: resource attribute -> name of the environment variable holding its value
    attributes: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_ATTRIBUTES))
    #: replace a value the sender already set (default: keep it; the app may know better)
    override: bool = False

    @field_validator("attributes")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        for key, env in v.items():
            if not key:
                raise ValueError("an attribute name must not be empty")
            if not env or not env.replace("_", "a").isalnum():
                raise ValueError(f"{key}: {env!r} is not an environment variable name")
        return v


def identity(cfg: K8sResourceConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """The attributes whose variables are set and non-empty."""
    return {key: environ[env] for key, env in cfg.attributes.items() if environ.get(env)}


class K8sResourceProcessor(Component):
    def __init__(self, settings: CreateSettings, cfg: K8sResourceConfig, next_consumer: Consumer,
                 environ: Mapping[str, str] | None = None):
        self._next = next_consumer
        self._override = cfg.override
        self.attributes = identity(cfg, os.environ if environ is None else environ)
        missing = sorted(env for key, env in cfg.attributes.items() if key not in self.attributes)
        if missing:  # outside a pod, or a manifest without the downward-API env: say so once
            log.warning("processors.%s: not set, so not added: %s", settings.id, ", ".join(missing))
        self._keys = frozenset(self.attributes)

    def consume(self, envelope: Envelope) -> None:
        if self.attributes and self._needs(envelope):
            self._apply(getattr(envelope.mutable(), _RESOURCE_LISTS[envelope.signal]))
        self._next.consume(envelope)

    def _needs(self, envelope: Envelope) -> bool:
        """False when every resource already has every key (and nothing is overridden): no copy, no re-encoding."""
        if self._override:
            return True
        for rs in getattr(envelope.message, _RESOURCE_LISTS[envelope.signal]):
            if not self._keys <= {kv.key for kv in rs.resource.attributes}:
                return True
        return False

    def _apply(self, resources) -> None:
        for rs in resources:
            attrs = rs.resource.attributes
            present = {kv.key: i for i, kv in enumerate(attrs)}
            for key, value in self.attributes.items():
                i = present.get(key)
                if i is None:
                    attrs.add(key=key).value.string_value = value
                elif self._override:
                    attrs[i].value.string_value = value


FACTORY = Factory(type="k8s_resource", kind=Kind.PROCESSOR, config_model=K8sResourceConfig,
                  create=lambda settings, cfg, next_consumer: K8sResourceProcessor(settings, cfg, next_consumer),
                  signals=ALL_SIGNALS)
