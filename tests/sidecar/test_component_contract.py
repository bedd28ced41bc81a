"""The contract every registered component type keeps, checked over the whole registry.

A component survives ``shutdown`` without ``start``, ``start``/``shutdown`` twice (and a second
``shutdown``), declares the signals it takes, and declares every metric family it registers
(``Factory.telemetry``) beyond the counters the pipeline keeps for it at its edges. A new
component type must add a minimal config below: the test fails until it does.
"""

from __future__ import annotations

import threading
import time

import pytest

from sidecar.component import Kind
from sidecar.config import ComponentId
from sidecar.host import Host
from sidecar.registry import CreateSettings, _load
from sidecar.telemetry import SelfTelemetry
from sidecar.testing import free_port


def _minimal_configs(tmp) -> dict[tuple[Kind, str], dict]:
    """The smallest config each type accepts, with its files under ``tmp`` and its ports free."""
    return {
        (Kind.RECEIVER, "otlp"): {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{free_port()}"},
                                                "http": {"endpoint": f"127.0.0.1:{free_port()}"}}},
        (Kind.PROCESSOR, "batch"): {},
        (Kind.PROCESSOR, "memory_limiter"): {"limit_mib": 100_000},
        (Kind.PROCESSOR, "span_metrics"): {},
        (Kind.PROCESSOR, "tail_sampling"): {"policies": [{"name": "all", "type": "always_sample"}]},
        (Kind.PROCESSOR, "redaction"): {},
        (Kind.PROCESSOR, "k8s_resource"): {},
        (Kind.PROCESSOR, "drift"): {},
        (Kind.PROCESSOR, "audit_fields"): {},
        (Kind.EXPORTER, "otlp"): {"endpoint": f"127.0.0.1:{free_port()}", "tls": {"insecure": True}},
        (Kind.EXPORTER, "otlphttp"): {"endpoint": f"http://127.0.0.1:{free_port()}"},
        (Kind.EXPORTER, "file"): {"directory": str(tmp / "file")},
        (Kind.EXPORTER, "debug"): {},
        (Kind.EXPORTER, "audit"): {"store": f"sqlite:///{tmp / 'audit.db'}"},
        (Kind.EXPORTER, "syslog"): {"endpoint": f"127.0.0.1:{free_port()}", "network": "udp"},
        (Kind.EXTENSION, "health_check"): {"endpoint": f"127.0.0.1:{free_port()}"},
        (Kind.EXTENSION, "file_storage"): {"directory": str(tmp / "storage")},
    }


class _Sink:
    def consume(self, envelope) -> None:
        pass


#: families every SelfTelemetry has: the pipeline's edge counters and the sending-queue gauges
_BASE = {m.name for m in SelfTelemetry().registry.collect()}
_ALL = sorted(_load(), key=lambda k: (k[0].value, k[1]))


def _build(key, tmp):
    kind, type_ = key
    factory = _load()[key]
    configs = _minimal_configs(tmp)
    assert key in configs, f"{kind.value} {type_!r}: add a minimal config to _minimal_configs in this test"
    telemetry = SelfTelemetry()
    cid = ComponentId(type_)
    settings = CreateSettings(id=cid, kind=kind, telemetry=telemetry.component(kind.value, str(cid)))
    nxt = _Sink() if kind in (Kind.RECEIVER, Kind.PROCESSOR) else None
    comp = factory.create(settings, factory.config_model.model_validate(configs[key]), nxt)
    return comp, telemetry


@pytest.mark.parametrize("key", _ALL, ids=[f"{k.value}-{t}" for k, t in _ALL])
def test_shutdown_without_start(key, tmp_path):
    comp, _ = _build(key, tmp_path)
    comp.shutdown(time.monotonic() + 2)
    comp.shutdown(time.monotonic() + 2)


@pytest.mark.parametrize("key", _ALL, ids=[f"{k.value}-{t}" for k, t in _ALL])
def test_start_and_shutdown_twice_leaves_no_thread_running(key, tmp_path):
    before = set(threading.enumerate())
    comp, telemetry = _build(key, tmp_path)
    host = Host(telemetry)
    if key[0] is not Kind.EXTENSION:
        storage, _ = _build((Kind.EXTENSION, "file_storage"), tmp_path)
        storage.start(host)
        host.extensions["file_storage"] = storage
    for _ in range(2):
        comp.start(host)
        comp.shutdown(time.monotonic() + 5)
    comp.shutdown(time.monotonic() + 5)
    deadline = time.monotonic() + 10
    while (left := [t for t in set(threading.enumerate()) - before if t.is_alive()
                    and not t.name.startswith(("ThreadPoolExecutor", "grpc", "waitress"))]) \
            and time.monotonic() < deadline:
        left[0].join(0.1)
    assert not left, f"threads still running after shutdown: {[t.name for t in left]}"


@pytest.mark.parametrize("key", _ALL, ids=[f"{k.value}-{t}" for k, t in _ALL])
def test_declares_its_signals_and_its_telemetry(key, tmp_path):
    kind, type_ = key
    factory = _load()[key]
    if kind is Kind.EXTENSION:
        assert not factory.signals, "an extension takes no data"
    else:
        assert factory.signals, f"{kind.value} {type_!r} declares no signal"
    _, telemetry = _build(key, tmp_path)
    registered = {m.name for m in telemetry.registry.collect()} - _BASE
    assert registered == set(factory.telemetry), \
        f"{kind.value} {type_!r} registers {sorted(registered)} but declares {sorted(factory.telemetry)}"
