"""k8s_resource: the pod's identity from the downward-API variables, on every resource, once per key."""

from __future__ import annotations

import logging

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidecar.component import Kind
from sidecar.config import ComponentId, ConfigError, parse_config
from sidecar.envelope import Envelope
from sidecar.processors.k8s_resource import FACTORY, K8sResourceProcessor
from sidecar.registry import CreateSettings
from sidecar.signals import Signal
from sidecar.telemetry import SelfTelemetry
from sidecar.testing import CollectingConsumer

POD = {"K8S_POD_NAME": "resnet-7d9f-abcde", "K8S_NAMESPACE_NAME": "inference", "K8S_NODE_NAME": "node-a"}


def make(config: dict, environ: dict):
    cfg = FACTORY.config_model.model_validate(config)
    nxt = CollectingConsumer()
    settings = CreateSettings(ComponentId("k8s_resource"), Kind.PROCESSOR,
                              SelfTelemetry().component("processor", "k8s_resource"))
    return K8sResourceProcessor(settings, cfg, nxt, environ=environ), nxt


def traces(*resources: dict) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    for attrs in resources:
        rs = req.resource_spans.add()
        for k, v in attrs.items():
            rs.resource.attributes.add(key=k).value.string_value = v
        rs.scope_spans.add().spans.add(name="s", trace_id=b"\x01" * 16, span_id=b"\x02" * 8)
    return req


def attrs(resource) -> dict:
    return {kv.key: kv.value.string_value for kv in resource.attributes}


def test_adds_the_pods_identity_to_every_resource_and_keeps_what_the_app_set():
    proc, nxt = make({}, {**POD, "K8S_POD_UID": ""})
    req = traces({"service.name": "a"}, {"service.name": "b", "k8s.node.name": "set-by-app"})
    proc.consume(Envelope(Signal.TRACES, req))
    (env,) = nxt.envelopes
    first, second = (rs.resource for rs in env.message.resource_spans)
    assert attrs(first) == {"service.name": "a", "k8s.pod.name": "resnet-7d9f-abcde",
                            "k8s.namespace.name": "inference", "k8s.node.name": "node-a"}
    assert attrs(second)["k8s.node.name"] == "set-by-app"  # the app knows better; an empty variable adds nothing
    assert [kv.key for kv in second.attributes].count("k8s.node.name") == 1


def test_override_replaces_and_logs_go_the_same_way():
    proc, nxt = make({"override": True, "attributes": {"k8s.node.name": "K8S_NODE_NAME"}}, POD)
    req = ExportLogsServiceRequest()
    rl = req.resource_logs.add()
    rl.resource.attributes.add(key="k8s.node.name").value.string_value = "stale"
    rl.scope_logs.add().log_records.add().body.string_value = "hello"
    proc.consume(Envelope(Signal.LOGS, req))
    (env,) = nxt.envelopes
    assert attrs(env.message.resource_logs[0].resource) == {"k8s.node.name": "node-a"}


def test_data_that_already_carries_the_identity_is_passed_on_with_its_received_bytes():
    proc, nxt = make({}, POD)
    raw = traces({"k8s.pod.name": "p", "k8s.namespace.name": "n", "k8s.node.name": "x"}).SerializeToString()
    env = Envelope(Signal.TRACES, encoded=raw, items=1)
    proc.consume(env)
    assert env.has_encoding and env.encoded is raw  # no copy, no re-encoding


def test_missing_variables_are_named_once_at_start(caplog):
    with caplog.at_level(logging.WARNING):
        proc, _ = make({}, {"K8S_POD_NAME": "p"})
    assert proc.attributes == {"k8s.pod.name": "p"}
    assert "K8S_NAMESPACE_NAME" in caplog.text and "K8S_NODE_NAME" in caplog.text


def test_config_errors_name_the_yaml_path():
    bad = """
receivers: {otlp: {protocols: {grpc: {endpoint: 127.0.0.1:0}}}}
processors: {k8s_resource: {attributes: {k8s.pod.name: "not a variable"}, overide: true}}
exporters: {debug: {}}
service: {pipelines: {traces: {receivers: [otlp], processors: [k8s_resource], exporters: [debug]}}}
"""
    with pytest.raises(ConfigError) as e:
        parse_config(bad, environ={})
    text = str(e.value) + " ".join(map(str, getattr(e.value, "problems", [])))
    assert "processors.k8s_resource" in text
    assert "overide" in text and "not an environment variable name" in text
