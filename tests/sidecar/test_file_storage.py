"""The file_storage extension and how exporters find it."""

from __future__ import annotations

import os
import time

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidecar.envelope import Envelope
from sidecar.component import Kind
from sidecar.config import ComponentId
from sidecar.exporters.otlp import FACTORY as OTLP
from sidecar.extensions.file_storage import FACTORY, FileStorage, StorageError
from sidecar.host import Host
from sidecar.registry import CreateSettings
from sidecar.signals import Signal
from sidecar.telemetry import SelfTelemetry
from sidecar.testing import free_port


def storage(body: dict, name: str = "") -> FileStorage:
    cfg = FACTORY.config_model.model_validate(body)
    return FACTORY.create(CreateSettings(ComponentId("file_storage", name), Kind.EXTENSION, None), cfg, None)


def test_defaults():
    cfg = FACTORY.config_model()
    assert (cfg.directory, cfg.fsync, cfg.create_directory) == ("./var/sidecar-storage", True, True)


def test_creates_the_directory(tmp_path):
    ext = storage({"directory": str(tmp_path / "a" / "b")})
    ext.start(Host(SelfTelemetry()))
    assert (tmp_path / "a" / "b").is_dir()
    assert ext.directory_for(Kind.EXPORTER, "otlp/jaeger") == tmp_path / "a" / "b" / "exporter_otlp_jaeger"


def test_missing_directory_without_create_is_a_clear_error(tmp_path):
    ext = storage({"directory": str(tmp_path / "nope"), "create_directory": False})
    with pytest.raises(StorageError, match=r"extensions.file_storage.directory: .*does not exist"):
        ext.start(Host(SelfTelemetry()))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_directory_is_a_clear_error(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        with pytest.raises(StorageError, match="not writable"):
            storage({"directory": str(d)}).start(Host(SelfTelemetry()))
    finally:
        d.chmod(0o700)


def test_directory_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError, match="extensions.file_storage/q.directory: cannot create"):
        storage({"directory": str(tmp_path / "f" / "sub")}, name="q").start(Host(SelfTelemetry()))


def _otlp(storage_id: str):
    tel = SelfTelemetry()
    cfg = OTLP.config_model.model_validate({"endpoint": f"127.0.0.1:{free_port()}", "tls": {"insecure": True},
                                            "sending_queue": {"storage": storage_id}})
    return OTLP.create(CreateSettings(ComponentId("otlp", "a"), Kind.EXPORTER, tel.component("exporter", "otlp/a")),
                       cfg, None), Host(tel)


def test_exporter_naming_a_missing_extension_fails_start():
    exp, host = _otlp("file_storage")
    with pytest.raises(ValueError, match="exporters.otlp/a.sending_queue.storage: 'file_storage' is not an enabled"):
        exp.start(host)


def test_exporter_queue_lives_in_its_own_subdirectory(tmp_path):
    exp, host = _otlp("file_storage/q")
    ext = storage({"directory": str(tmp_path), "fsync": False}, name="q")
    ext.start(host)
    host.extensions["file_storage/q"] = ext
    exp.start(host)
    req = ExportTraceServiceRequest()
    req.resource_spans.add().scope_spans.add().spans.add(name="s")
    exp.consume(Envelope(Signal.TRACES, req))  # the backend is down: it waits on disk
    assert len(list((tmp_path / "exporter_otlp_a").glob("*-traces-1.otlp"))) == 1
    exp.shutdown(time.monotonic() + 0.1)
    assert len(list((tmp_path / "exporter_otlp_a").glob("*-traces-1.otlp"))) == 1
