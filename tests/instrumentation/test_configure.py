"""configure(): real SDK, real OTLP exporters, a real backend on loopback; one process per scenario."""

from __future__ import annotations

import os

import pytest

from instrumentation import k8s_resource_attributes
from sidecar.signals import Signal
from sidecar.testing import OTLPBackend, OTLPHTTPBackend

from .conftest import run_script

K8S = {"K8S_POD_NAME": "clf-7d9f-abcde", "K8S_NAMESPACE_NAME": "ml", "K8S_NODE_NAME": "node-3",
       "K8S_CONTAINER_NAME": "app", "K8S_POD_UID": "1234-5678"}
FAST = {"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_BLRP_SCHEDULE_DELAY": "50"}


def resource_of(backend) -> dict:
    _, _, _ = backend.spans()[0]
    resource = backend.spans()[0][0]
    return {kv.key: kv.value.string_value for kv in resource.attributes}


def span_names(backend) -> list[str]:
    return sorted(s.name for _, _, s in backend.spans())


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_exports_traces_logs_and_metrics_with_k8s_identity(protocol):
    backend_cls = OTLPBackend if protocol == "grpc" else OTLPHTTPBackend
    with backend_cls() as backend:
        run_script("configure_scenarios.py", "basic",
                   env={"ENDPOINT": backend.endpoint, "PROTOCOL": protocol, **K8S, **FAST})
        assert span_names(backend) == ["basic"]
        res = resource_of(backend)
        assert res["service.name"] == "svc-explicit" and res["team"] == "ml"
        assert res["k8s.pod.name"] == "clf-7d9f-abcde" and res["k8s.namespace.name"] == "ml"
        assert res["k8s.node.name"] == "node-3" and res["k8s.container.name"] == "app"
        assert res["k8s.pod.uid"] == "1234-5678"
        (log,) = [rec for _, _, rec in backend.log_records()]
        span = backend.spans()[0][2]
        assert log.body.string_value == "log from basic" and log.trace_id == span.trace_id
        assert log.severity_number == 13
        assert "scenario.calls" in {m.name for _, _, m in backend.metrics()}


def test_standard_otel_environment_variables_are_honoured():
    with OTLPBackend() as backend:
        run_script("configure_scenarios.py", "env", env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{backend.endpoint}", "OTEL_SERVICE_NAME": "from-env",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,k8s.pod.name=override",
            "K8S_POD_NAME": "from-downward-api", **FAST})
        res = resource_of(backend)
        assert res["service.name"] == "from-env" and res["deployment.environment"] == "prod"
        assert res["k8s.pod.name"] == "override"  # OTEL_RESOURCE_ATTRIBUTES beats the downward-API variable


def test_sampler_from_environment():
    with OTLPBackend() as backend:
        run_script("configure_scenarios.py", "env", env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{backend.endpoint}", "OTEL_TRACES_SAMPLER": "always_off", **FAST})
        assert backend.spans() == []
        assert backend.log_records()  # logs are not head-sampled


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_survives_fork_child_spans_arrive():
    with OTLPBackend() as backend:
        run_script("configure_scenarios.py", "fork", env={"ENDPOINT": backend.endpoint, **FAST})
        assert span_names(backend) == ["before-fork", "in-child", "parent-after-fork"]
        assert len({r.body.string_value for _, _, r in backend.log_records()}) == 3


def test_an_app_provider_that_exports_gets_no_second_exporter_but_redaction_and_request_ids():
    with OTLPBackend() as backend:
        run_script("configure_scenarios.py", "existing", env={"ENDPOINT": backend.endpoint, **FAST})
        assert backend.spans() == []  # the app's exporter got it, once (asserted in the script)


def test_an_app_provider_without_exporters_gets_ours():
    with OTLPBackend() as backend:
        run_script("configure_scenarios.py", "existing-bare", env={"ENDPOINT": backend.endpoint, **FAST})
        assert span_names(backend) == ["bare"]


def test_full_queue_drops_and_counts_instead_of_blocking():
    with OTLPBackend() as backend:
        proc = run_script("configure_scenarios.py", "dropping", env={"ENDPOINT": backend.endpoint})
        dropped = int(proc.stdout.split()[-1])
        received = backend.items[Signal.TRACES]
        assert dropped > 0 and received < 500
        assert received + dropped >= 500  # every span is either exported or counted as dropped


def test_k8s_attributes_from_downward_api_variables():
    assert k8s_resource_attributes({"POD_NAMESPACE": "inference", "K8S_POD_NAME": "p"}) == {
        "k8s.namespace.name": "inference", "k8s.pod.name": "p"}
    assert k8s_resource_attributes({}) == {}


def test_captured_content_and_logs_are_redacted_before_leaving_the_process():
    with OTLPBackend() as backend:
        run_script("configure_scenarios.py", "redaction", env={"ENDPOINT": backend.endpoint, **FAST})
        (_, _, span), = backend.spans()
        prompt = span.events[0].attributes[0].value.string_value
        (_, _, log), = backend.log_records()
        assert "jane.doe@example.com" not in prompt and "mail the summary to" in prompt
        assert "jane.doe@example.com" not in log.body.string_value
