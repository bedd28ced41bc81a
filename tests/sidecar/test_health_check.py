"""health_check: liveness always, readiness following host.ready, over real HTTP."""

from __future__ import annotations

import json
import socket
import time

import pytest
import urllib3

from sidecar.component import Kind
from sidecar.config import ComponentId
from sidecar.extensions.health_check import FACTORY, HealthCheckConfig
from sidecar.host import Host
from sidecar.registry import CreateSettings
from sidecar.telemetry import SelfTelemetry
from sidecar.testing import free_port


@pytest.fixture
def running():
    telemetry = SelfTelemetry()
    host = Host(telemetry)
    cid = ComponentId("health_check")
    ext = FACTORY.create(CreateSettings(cid, Kind.EXTENSION, telemetry.component("extension", str(cid))),
                         HealthCheckConfig(endpoint=f"127.0.0.1:{free_port()}"), None)
    ext.start(host)
    yield ext, host
    ext.shutdown(time.monotonic() + 2)


def get(ext, path: str):
    r = urllib3.PoolManager(retries=False, timeout=5).request("GET", f"http://127.0.0.1:{ext.port}{path}")
    return r.status, json.loads(r.data)


def test_liveness_and_readiness_follow_the_host(running):
    ext, host = running
    assert get(ext, "/healthz") == (200, {"status": "alive"})
    assert get(ext, "/readyz") == (503, {"status": "not ready"})
    assert get(ext, "/") == (503, {"status": "not ready"})
    host.ready.set()
    assert get(ext, "/readyz") == (200, {"status": "ready"})
    assert get(ext, "/") == (200, {"status": "ready"})
    host.ready.clear()  # shutdown began: out of the load balancer, still alive
    assert get(ext, "/readyz")[0] == 503
    assert get(ext, "/healthz")[0] == 200
    assert get(ext, "/metrics")[0] == 404


def test_default_endpoint_is_loopback():
    assert HealthCheckConfig().endpoint == "127.0.0.1:13133"


def test_port_in_use_fails_start_naming_the_endpoint():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        endpoint = f"127.0.0.1:{taken.getsockname()[1]}"
        telemetry = SelfTelemetry()
        cid = ComponentId("health_check")
        ext = FACTORY.create(CreateSettings(cid, Kind.EXTENSION, telemetry.component("extension", str(cid))),
                             HealthCheckConfig(endpoint=endpoint), None)
        with pytest.raises(OSError, match=f"extensions.health_check: cannot listen on {endpoint}"):
            ext.start(Host(telemetry))
