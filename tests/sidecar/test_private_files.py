"""What the sidecar writes to disk (queued requests, exported telemetry, the storage tree) is private to its user."""

from __future__ import annotations

import os
import stat
import time

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidecar.component import Kind
from sidecar.config import ComponentId
from sidecar.envelope import Envelope
from sidecar.exporters import file
from sidecar.exporters.otlp import FACTORY as OTLP
from sidecar.extensions.file_storage import FACTORY as FILE_STORAGE
from sidecar.host import Host
from sidecar.private_files import make_private_dir, open_private
from sidecar.queue.persistent import PersistentQueue
from sidecar.registry import CreateSettings
from sidecar.signals import Signal
from sidecar.telemetry import SelfTelemetry
from sidecar.testing import free_port


@pytest.fixture(autouse=True)
def permissive_umask():
    """The usual umask (022) would make new files 0644 and directories 0755."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def traces(n: int = 1) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    ss = req.resource_spans.add().scope_spans.add()
    for i in range(n):
        ss.spans.add(name="GET /users/jane.doe@example.com", trace_id=b"\1" * 16, span_id=bytes([i + 1]) * 8)
    return req


def test_persistent_queue_through_file_storage_is_private(tmp_path):
    tel = SelfTelemetry()
    root = tmp_path / "var" / "storage"  # neither exists yet: both created by the extension
    ext = FILE_STORAGE.create(CreateSettings(ComponentId("file_storage", ""), Kind.EXTENSION, None),
                              FILE_STORAGE.config_model.model_validate({"directory": str(root), "fsync": False}), None)
    host = Host(tel)
    ext.start(host)
    host.extensions["file_storage"] = ext
    cfg = OTLP.config_model.model_validate({"endpoint": f"127.0.0.1:{free_port()}", "tls": {"insecure": True},
                                            "sending_queue": {"storage": "file_storage"}})
    exp = OTLP.create(CreateSettings(ComponentId("otlp", ""), Kind.EXPORTER, tel.component("exporter", "otlp")),
                      cfg, None)
    exp.start(host)
    exp.consume(Envelope(Signal.TRACES, traces()))  # the backend is down: the request waits on disk
    exp.shutdown(time.monotonic() + 0.2)
    queue_dir = root / "exporter_otlp"
    files = [p for p in queue_dir.iterdir() if p.is_file()]
    assert any(p.suffix == ".otlp" for p in files)
    assert mode(root.parent) == mode(root) == mode(queue_dir) == 0o700
    assert {p.name: mode(p) for p in files} == {p.name: 0o600 for p in files}


def test_queue_directory_left_readable_by_an_older_version_is_tightened(tmp_path):
    d = tmp_path / "exporter_otlp"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    q = PersistentQueue(d, 10, fsync=False)
    q.put(Envelope(Signal.TRACES, traces()))
    assert mode(d) == 0o700
    assert all(mode(p) == 0o600 for p in d.iterdir())
    q.abort()


def test_file_exporter_output_is_private(tmp_path):
    tel = SelfTelemetry()
    cfg = file.FACTORY.config_model.model_validate({"directory": str(tmp_path / "out" / "telemetry")})
    exp = file.FACTORY.create(CreateSettings(ComponentId("file", ""), Kind.EXPORTER,
                                             tel.component("exporter", "file")), cfg, None)
    exp.start(Host(tel))
    exp.consume(Envelope(Signal.TRACES, traces(3)))
    exp.shutdown(time.monotonic() + 5)
    out = tmp_path / "out" / "telemetry"
    assert (out / "traces.jsonl").stat().st_size > 0
    assert mode(tmp_path / "out") == mode(out) == 0o700
    assert mode(out / "traces.jsonl") == 0o600


def test_an_existing_world_readable_file_is_tightened_when_reopened(tmp_path):
    p = tmp_path / "traces.jsonl"
    p.write_bytes(b"old\n")
    os.chmod(p, 0o644)
    with open_private(p, "ab") as f:
        f.write(b"new\n")
    assert mode(p) == 0o600 and p.read_bytes() == b"old\nnew\n"


def test_an_operator_made_directory_keeps_its_mode_unless_asked(tmp_path):
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o750)
    make_private_dir(d, tighten=False)
    assert mode(d) == 0o750
    make_private_dir(d / "a" / "b")
    assert mode(d / "a") == mode(d / "a" / "b") == 0o700
