"""The persistent queue: what was acknowledged survives a crash, in order; damage is skipped and counted."""

from __future__ import annotations

import errno
import gc
import logging
import os
import subprocess
import sys
import textwrap
import time

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidecar.envelope import Envelope
from sidecar.component import Kind, Refused
from sidecar.config import ComponentId
from sidecar.exporters.otlp import OTLPExporter, OTLPExporterConfig
from sidecar.extensions.file_storage import FileStorage, FileStorageConfig
from sidecar.host import Host
from sidecar.queue.persistent import PersistentQueue, StorageLocked
from sidecar.registry import CreateSettings
from sidecar.signals import Signal
from sidecar.telemetry import SelfTelemetry
from sidecar.testing import OTLPBackend, free_port


def traces(marker: int, spans: int = 2) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "svc"
    ss = rs.scope_spans.add()
    for i in range(spans):
        sp = ss.spans.add(name=f"req-{marker}-{i}", trace_id=marker.to_bytes(16, "big"),
                          span_id=(i + 1).to_bytes(8, "big"))
        sp.attributes.add(key="marker").value.int_value = marker
    return req


def logs(marker: int) -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    rec = req.resource_logs.add().scope_logs.add().log_records.add()
    rec.body.string_value = f"log-{marker}"
    return req


def drain(q: PersistentQueue) -> list:
    q.close()
    out = []
    while (item := q.get()) is not None:
        out.append(item)
        q.done(item)
    return out


def test_items_survive_a_crash_and_come_back_in_order(tmp_path):
    q = PersistentQueue(tmp_path / "q", 100)
    sent = []
    for i in range(5):
        req = traces(i) if i % 2 == 0 else logs(i)
        sig = Signal.TRACES if i % 2 == 0 else Signal.LOGS
        q.put(Envelope(sig, req, items=2 if sig is Signal.TRACES else 1))
        sent.append((sig, req.SerializeToString()))
    del q  # crash: no close, no shutdown
    gc.collect()  # a dropped queue lets go of its lock when it is collected

    q2 = PersistentQueue(tmp_path / "q", 100)
    assert q2.size() == 5 and q2.item_count() == 8
    got = drain(q2)
    assert [(it.signal, it.message.SerializeToString()) for it in got] == sent
    q2.abort()

    q3 = PersistentQueue(tmp_path / "q", 100)  # everything was acknowledged: nothing comes back
    assert q3.size() == 0
    q3.abort()


def test_an_item_handed_out_but_not_done_is_delivered_again(tmp_path):
    q = PersistentQueue(tmp_path / "q", 10)
    q.put(Envelope(Signal.TRACES, traces(1), items=2))
    q.put(Envelope(Signal.TRACES, traces(2), items=2))
    first = q.get()
    q.done(first)
    in_flight = q.get()  # pushed but the backend never answered before the crash
    assert in_flight.message == traces(2)
    del q, in_flight, first
    gc.collect()

    q2 = PersistentQueue(tmp_path / "q", 10)
    assert [it.message for it in drain(q2)] == [traces(2)]
    q2.abort()


def test_numbering_continues_after_restart(tmp_path):
    q = PersistentQueue(tmp_path / "q", 10)
    q.put(Envelope(Signal.TRACES, traces(1), items=2))
    q.abort()
    q2 = PersistentQueue(tmp_path / "q", 10)
    q2.put(Envelope(Signal.TRACES, traces(2), items=2))
    assert [it.message for it in drain(q2)] == [traces(1), traces(2)]
    q2.abort()


def test_corrupt_and_truncated_files_are_skipped_counted_and_logged(tmp_path, caplog):
    q = PersistentQueue(tmp_path / "q", 10)
    for i in range(4):
        q.put(Envelope(Signal.TRACES, traces(i, spans=3), items=3))
    q.abort()
    files = sorted(p for p in (tmp_path / "q").iterdir() if p.name.endswith(".otlp"))
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 2])  # torn write
    data = bytearray(files[2].read_bytes())
    data[-1] ^= 0xFF  # bit rot
    files[2].write_bytes(bytes(data))
    (tmp_path / "q" / "00000000000000000099-traces-3.otlp.tmp").write_bytes(b"half")

    tel = SelfTelemetry().component("exporter", "otlp")
    with caplog.at_level(logging.WARNING, logger="sidecar.queue.persistent"):
        q2 = PersistentQueue(tmp_path / "q", 10, telemetry=tel)
        got = drain(q2)
    assert [it.message for it in got] == [traces(0, spans=3), traces(3, spans=3)]
    assert tel.value("dropped", Signal.TRACES, "corrupt", "false") == 6
    assert sum("corrupt queue file" in r.getMessage() for r in caplog.records) == 2
    assert not list((tmp_path / "q").glob("*.tmp"))
    assert not list((tmp_path / "q").glob("*.otlp"))
    q2.abort()


def test_full_queue_refuses_and_counts_in_flight_writes(tmp_path):
    q = PersistentQueue(tmp_path / "q", 2)
    q.put(Envelope(Signal.TRACES, traces(1), items=2))
    q.put(Envelope(Signal.TRACES, traces(2), items=2))
    with pytest.raises(Refused) as e:
        q.put(Envelope(Signal.TRACES, traces(3), items=2))
    assert e.value.reason == "queue_full" and e.value.retryable
    q.close()
    with pytest.raises(Refused) as e:
        q.put(Envelope(Signal.TRACES, traces(4), items=2))
    assert e.value.reason == "shutting_down"
    q.abort()


@pytest.mark.parametrize("err, reason", [(errno.ENOSPC, "disk_full"), (errno.EIO, "storage_error")])
def test_write_failure_refuses_and_leaves_nothing_behind(tmp_path, monkeypatch, err, reason):
    q = PersistentQueue(tmp_path / "q", 10)

    def failing_fsync(fd):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "fsync", failing_fsync)  # the disk, not the queue, is what fails here
    with pytest.raises(Refused) as e:
        q.put(Envelope(Signal.TRACES, traces(1), items=2))
    assert e.value.reason == reason and e.value.retryable
    monkeypatch.undo()
    assert q.size() == 0
    assert [p.name for p in (tmp_path / "q").iterdir()] == [".lock"]
    q.put(Envelope(Signal.TRACES, traces(2), items=2))  # the queue still works once the disk does
    assert [it.message for it in drain(q)] == [traces(2)]
    q.abort()


def test_a_second_process_cannot_share_the_directory(tmp_path):
    q = PersistentQueue(tmp_path / "q", 10)
    with pytest.raises(StorageLocked):
        PersistentQueue(tmp_path / "q", 10)
    q.abort()
    PersistentQueue(tmp_path / "q", 10).abort()


# --- through a real exporter and a real kill -9 ---------------------------------------------------

_CHILD = textwrap.dedent("""
    import sys, time
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from sidecar.config import ComponentId
    from sidecar.component import Kind
    from sidecar.exporters.otlp import OTLPExporter, OTLPExporterConfig
    from sidecar.extensions.file_storage import FileStorage, FileStorageConfig
    from sidecar.host import Host
    from sidecar.envelope import Envelope
    from sidecar.registry import CreateSettings
    from sidecar.signals import Signal
    from sidecar.telemetry import SelfTelemetry

    storage_dir, port = sys.argv[1], sys.argv[2]
    tel = SelfTelemetry()
    host = Host(tel)
    ext = FileStorage(CreateSettings(ComponentId("file_storage"), Kind.EXTENSION, None),
                      FileStorageConfig(directory=storage_dir))
    ext.start(host)
    host.extensions["file_storage"] = ext
    cfg = OTLPExporterConfig.model_validate({
        "endpoint": f"127.0.0.1:{port}", "tls": {"insecure": True},
        "sending_queue": {"storage": "file_storage", "num_consumers": 2},
        "retry_on_failure": {"initial_interval": "50ms", "max_interval": "100ms"}})
    exp = OTLPExporter(CreateSettings(ComponentId("otlp", "main"), Kind.EXPORTER,
                                      tel.component("exporter", "otlp/main")), cfg)
    exp.start(host)
    for line in sys.stdin:
        req = ExportTraceServiceRequest.FromString(bytes.fromhex(line.strip()))
        exp.consume(Envelope(Signal.TRACES, req))
        print("ack", flush=True)
    time.sleep(60)
""")


def _exporter(storage_dir, endpoint: str):
    tel = SelfTelemetry()
    host = Host(tel)
    ext = FileStorage(CreateSettings(ComponentId("file_storage"), Kind.EXTENSION, None),
                      FileStorageConfig(directory=str(storage_dir)))
    ext.start(host)
    host.extensions["file_storage"] = ext
    cfg = OTLPExporterConfig.model_validate({
        "endpoint": endpoint, "tls": {"insecure": True},
        "sending_queue": {"storage": "file_storage", "num_consumers": 2},
        "retry_on_failure": {"initial_interval": "50ms", "max_interval": "100ms"}})
    comp = tel.component("exporter", "otlp/main")
    exp = OTLPExporter(CreateSettings(ComponentId("otlp", "main"), Kind.EXPORTER, comp), cfg)
    exp.start(host)
    return exp, comp


def test_acknowledged_requests_survive_kill_9_of_the_exporting_process(tmp_path):
    port = free_port()  # nothing listens yet: every push fails and waits
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path / "storage"), str(port)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    sent = [traces(i, spans=3) for i in range(20)]
    try:
        for req in sent:
            child.stdin.write(req.SerializeToString().hex() + "\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "ack"
    finally:
        child.kill()
        child.wait(10)
    assert (tmp_path / "storage" / "exporter_otlp_main").is_dir()

    with OTLPBackend(port) as backend:
        exp, tel = _exporter(tmp_path / "storage", backend.endpoint)
        try:
            assert backend.wait_for_items(Signal.TRACES, 60, timeout=20)
        finally:
            exp.shutdown(time.monotonic() + 5)
        got = sorted(r.SerializeToString() for r in backend.requests[Signal.TRACES])
        assert got == sorted(r.SerializeToString() for r in sent)
        assert tel.value("exported", Signal.TRACES) == 60
    assert not list((tmp_path / "storage" / "exporter_otlp_main").glob("*.otlp"))


def test_shutdown_keeps_undelivered_requests_on_disk_for_the_next_start(tmp_path):
    port = free_port()
    exp, tel = _exporter(tmp_path / "storage", f"127.0.0.1:{port}")
    for i in range(5):
        exp.consume(Envelope(Signal.TRACES, traces(i)))
    t0 = time.monotonic()
    exp.shutdown(time.monotonic() + 0.3)
    assert time.monotonic() - t0 < 3
    assert tel.value("dropped", Signal.TRACES, "shutdown", "false") == 0
    with pytest.raises(Refused) as e:
        exp.consume(Envelope(Signal.TRACES, traces(99)))
    assert e.value.reason == "shutting_down"

    with OTLPBackend(port) as backend:
        exp2, _ = _exporter(tmp_path / "storage", backend.endpoint)
        try:
            assert backend.wait_for_items(Signal.TRACES, 10, timeout=20)
        finally:
            exp2.shutdown(time.monotonic() + 5)
        assert sorted(r.SerializeToString() for r in backend.requests[Signal.TRACES]) == \
            sorted(traces(i).SerializeToString() for i in range(5))


# --- group commit -------------------------------------------------------------------------------------


class _HeldDisk:
    """os.fsync that holds the first commit until ``writers`` more puts wait in the next group, and logs calls."""

    def __init__(self, q: PersistentQueue, writers: int):
        import threading

        self.q, self.writers = q, writers
        self.real = os.fsync
        self.calls: list[str] = []
        self.lock = threading.Lock()
        self.released = False

    def __call__(self, fd):
        with self.lock:
            self.calls.append("dir" if fd == self.q._dir_fd else "file")
        if not self.released:
            deadline = time.monotonic() + 30
            while len(self.q.group_commit.waiting()) < self.writers and time.monotonic() < deadline:
                time.sleep(0.001)  # waits on a condition (the others have joined), not on time
            self.released = True
        self.real(fd)


def test_concurrent_puts_share_one_commit_that_precedes_every_acknowledgement(tmp_path, monkeypatch):
    import threading

    q = PersistentQueue(tmp_path / "q", 100)
    disk = _HeldDisk(q, writers=7)
    monkeypatch.setattr(os, "fsync", disk)
    first = threading.Thread(target=q.put, args=(Envelope(Signal.TRACES, traces(0), items=2),))
    first.start()
    while not q.group_commit.committing:  # the first put leads a commit of its own, held by the disk
        time.sleep(0.001)
    acked = []

    def put(i):
        q.put(Envelope(Signal.TRACES, traces(i), items=2))
        # acknowledged: the file is in place and the directory was synced after it was renamed
        acked.append((i, sorted(p.name for p in (tmp_path / "q").glob("*.otlp")), disk.calls.count("dir")))

    others = [threading.Thread(target=put, args=(i,)) for i in range(1, 8)]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join(30)
    assert q.group_commit.commits == 2 and q.group_commit.committed == 8  # 1 + 7: the seven waiting writers committed together
    assert disk.calls.count("dir") == 2  # one directory sync per group, not per request
    assert all(len(names) == 8 and dirs == 2 for _, names, dirs in acked)
    monkeypatch.undo()
    assert sorted(int(it.message.resource_spans[0].scope_spans[0].spans[0].trace_id.hex(), 16)
                  for it in drain(q)) == list(range(8))
    q.abort()


def test_a_failed_group_commit_refuses_every_writer_of_the_group_and_leaves_nothing(tmp_path, monkeypatch):
    import threading

    q = PersistentQueue(tmp_path / "q", 100)
    disk = _HeldDisk(q, writers=3)

    def failing(fd):
        disk(fd)
        if len(disk.calls) > 2:  # the first group (one file, the directory) commits; the second fails
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", failing)
    outcomes = []

    def put(i):
        try:
            q.put(Envelope(Signal.TRACES, traces(i), items=2))
            outcomes.append("ok")
        except Refused as e:
            outcomes.append(e.reason)

    threads = [threading.Thread(target=put, args=(0,))]
    threads[0].start()
    while not q.group_commit.committing:
        time.sleep(0.001)
    threads += [threading.Thread(target=put, args=(i,)) for i in (1, 2, 3)]
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(30)
    monkeypatch.undo()
    assert sorted(outcomes) == ["disk_full"] * 3 + ["ok"]
    assert q.size() == 1 and len(list((tmp_path / "q").glob("*.otlp"))) == 1
    assert not list((tmp_path / "q").glob("*.tmp"))
    q.abort()
