"""Durable until decided: with ``storage``, what tail sampling holds survives a crash (durable.py, wal.py).

Real files under a real ``file_storage`` extension; a crash is the processor dropped with its
files let go and nothing deleted, as ``kill -9`` leaves them; the real kill -9 is in
tests/e2e/test_durable_e2e.py.
"""

from __future__ import annotations

import os
import stat
import threading
import time

import pytest

from sidecar.component import Kind, Refused
from sidecar.config import ComponentId, ConfigError, parse_config
from sidecar.envelope import Envelope
from sidecar.extensions.file_storage import FileStorage, FileStorageConfig
from sidecar.host import Host
from sidecar.registry import CreateSettings
from sidecar.signals import Signal
from sidecar.telemetry import SelfTelemetry
from tests.sidecar.tail_sampling.helpers import kept_logs, kept_spans, logs_request, make, span, tid, traces_request

POLICIES = [{"name": "all", "type": "always_sample"}]


def host_with_storage(directory) -> Host:
    tel = SelfTelemetry()
    settings = CreateSettings(id=ComponentId("file_storage"), kind=Kind.EXTENSION,
                              telemetry=tel.component("extension", "file_storage"))
    fs = FileStorage(settings, FileStorageConfig(directory=str(directory)))
    fs.start(None)
    host = Host(tel)
    host.extensions["file_storage"] = fs
    return host


def durable(tmp_path, policies=POLICIES, **overrides):
    """A started processor with its log under ``tmp_path`` (the same directory across 'restarts')."""
    proc, sink, clock, tel = make(policies, storage="file_storage", **overrides)
    proc.start(host_with_storage(tmp_path))
    return proc, sink, clock, tel


def crash(proc) -> None:
    """What kill -9 leaves: no decision, no delivery, the log's files as they are."""
    proc._ticker.stop(time.monotonic() + 5)
    proc._durable.abandon()


def wal_dir(tmp_path):
    return tmp_path / "processor_tail_sampling"


def segments(tmp_path) -> list[str]:
    return sorted(p.name for p in wal_dir(tmp_path).glob("*.wal"))


def recovered(tel, signal: Signal) -> float:
    return tel.registry.get_sample_value("sidecar_tail_sampling_recovered_items_total",
                                         {"component": "tail_sampling", "signal": signal.value}) or 0.0


def test_undecided_spans_and_logs_survive_a_crash_and_are_decided_after_restart(tmp_path):
    proc, sink, clock, _ = durable(tmp_path)
    ids = [tid() for _ in range(20)]
    proc.consume(Envelope(Signal.TRACES, traces_request(*[span(t, root=True) for t in ids])))
    proc.consume(Envelope(Signal.TRACES, traces_request(*[span(t) for t in ids])))
    proc.consume(Envelope(Signal.LOGS, logs_request(*[(t, 9, f"log {i}") for i, t in enumerate(ids)])))
    assert kept_spans(sink) == [] and segments(tmp_path)
    crash(proc)

    proc2, sink2, clock2, tel2 = durable(tmp_path)
    assert recovered(tel2, Signal.TRACES) == 40 and recovered(tel2, Signal.LOGS) == 20
    assert proc2.buffered_traces == 20
    proc2.tick(clock2.advance(1.5))  # the root grace period starts again at recovery
    assert sorted(s.trace_id for s in kept_spans(sink2)) == sorted(ids * 2)
    assert sorted(r.body.string_value for r in kept_logs(sink2)) == sorted(f"log {i}" for i in range(20))
    # everything decided and handed on: the log is empty again
    assert segments(tmp_path) == [] and proc2._durable.stored_bytes == 0
    proc2.shutdown(time.monotonic() + 5)


def test_decided_and_delivered_data_is_deleted_and_not_replayed(tmp_path):
    proc, sink, clock, _ = durable(tmp_path)
    proc.consume(Envelope(Signal.TRACES, traces_request(span(tid(), root=True))))
    proc.tick(clock.advance(1.5))
    assert len(kept_spans(sink)) == 1
    assert segments(tmp_path) == []
    crash(proc)
    proc2, sink2, clock2, tel2 = durable(tmp_path)
    assert recovered(tel2, Signal.TRACES) == 0 and proc2.buffered_traces == 0
    proc2.shutdown(time.monotonic() + 5)


def test_output_refused_downstream_stays_in_the_log_until_accepted(tmp_path):
    proc, sink, clock, _ = durable(tmp_path)
    t = tid()
    proc.consume(Envelope(Signal.TRACES, traces_request(span(t, root=True), span(t))))
    sink.refuse = Refused("queue_full")
    proc.tick(clock.advance(1.5))
    assert proc.pending_output_items == 2 and segments(tmp_path), "decided but not handed on: still logged"
    crash(proc)  # the decided output was only in memory: the log brings it back

    proc2, sink2, clock2, tel2 = durable(tmp_path)
    assert recovered(tel2, Signal.TRACES) == 2
    proc2.tick(clock2.advance(1.5))
    assert [s.trace_id for s in kept_spans(sink2)] == [t, t] and segments(tmp_path) == []
    proc2.shutdown(time.monotonic() + 5)


def test_a_trace_still_waiting_keeps_newer_segments_of_other_traces(tmp_path):
    proc, sink, clock, _ = durable(tmp_path, wal={"segment_bytes": 4096})
    waiting = tid()
    proc.consume(Envelope(Signal.TRACES, traces_request(span(waiting))))  # no root: waits decision_wait (10s)
    clock.advance(2)
    late = tid()
    proc.consume(Envelope(Signal.TRACES, traces_request(*[span(late, attrs={"pad": "x" * 500}) for _ in range(10)])))
    proc.consume(Envelope(Signal.TRACES, traces_request(span(waiting, root=True))))  # newer data of the old trace
    assert len(segments(tmp_path)) >= 2
    crash(proc)
    proc2, sink2, clock2, tel2 = durable(tmp_path)
    assert recovered(tel2, Signal.TRACES) == 12
    proc2.tick(clock2.advance(10.5))
    assert sorted(s.trace_id for s in kept_spans(sink2)) == sorted([waiting] * 2 + [late] * 10)
    proc2.shutdown(time.monotonic() + 5)


def early(tel) -> float:
    return tel.registry.get_sample_value("sidecar_tail_sampling_early_decisions_total",
                                         {"component": "tail_sampling"}) or 0.0


def test_a_full_buffer_decides_early_and_a_replay_bigger_than_the_buffer_loses_nothing_kept(tmp_path):
    """num_traces 3: the second request pushes out both traces of the first and one of its own, created in
    the same sort (pinned only then). They are decided early and handed on, and their pins given back once
    (the first segment goes; the second stays while one of its traces waits). After a crash the replay, bigger than the buffer, decides one early again:
    every trace the policy keeps reaches the sink (one twice: at least once), and the log empties."""
    proc, sink, clock, tel = durable(tmp_path, num_traces=3, wal={"segment_bytes": 4096})
    pad = {"pad": "x" * 1500}
    old = [tid(), tid()]
    proc.consume(Envelope(Signal.TRACES, traces_request(*[span(t, attrs=pad) for t in old])))
    assert len(segments(tmp_path)) == 1
    new = [tid() for _ in range(4)]  # the middle two end (roots): decided 1 s later, the last waits
    proc.consume(Envelope(Signal.TRACES, traces_request(*[span(t, attrs=pad, root=i in (1, 2))
                                                          for i, t in enumerate(new)])))  # a new segment
    assert proc.buffered_traces == 3 and early(tel) == 3
    proc.tick()  # hands on what the sort decided early
    assert sorted(s.trace_id for s in kept_spans(sink)) == sorted(old + new[:1])
    assert len(segments(tmp_path)) == 1, "the first segment is deleted once its traces were handed on"
    proc.tick(clock.advance(1.5))
    assert sorted(s.trace_id for s in kept_spans(sink)) == sorted(old + new[:3])
    assert len(segments(tmp_path)) == 1, "the last trace still pins the second segment"
    crash(proc)

    proc2, sink2, clock2, tel2 = durable(tmp_path, num_traces=3)
    assert recovered(tel2, Signal.TRACES) == 4 and proc2.buffered_traces == 3 and early(tel2) == 1
    proc2.tick(clock2.advance(10.5))
    assert sorted(s.trace_id for s in kept_spans(sink2)) == sorted(new)
    assert segments(tmp_path) == [], "every pin given back once: the log empties"
    proc2.shutdown(time.monotonic() + 5)


def test_output_merged_across_segments_pins_the_oldest_and_the_log_empties_once_it_is_delivered(tmp_path):
    """A full buffer decides early on every request, each request in a new segment; the outputs waiting for
    the tick are merged into one request, which keeps the oldest of their segments (and so every newer one)
    until the next stage took it. A crash before that loses nothing; after it the log empties."""
    pad = {"pad": "x" * 3000}
    proc, sink, clock, tel = durable(tmp_path, num_traces=2, wal={"segment_bytes": 4096})
    sent = [tid() for _ in range(8)]
    for t in sent:  # each request a segment of its own; from the third on, each pushes the oldest trace out
        proc.consume(Envelope(Signal.TRACES, traces_request(span(t, attrs=pad))))
    assert early(tel) == 6 and sink.envelopes == []
    before = segments(tmp_path)
    assert len(before) == 8
    sink.refuse = Refused("queue_full")
    proc.tick()  # merged into one, refused: it waits, pinning the oldest segment
    assert sink.calls == 1 and proc.pending_output_items == 6
    assert segments(tmp_path) == before, "the merged output keeps the oldest segment and every newer one"
    crash(proc)

    proc2, sink2, clock2, tel2 = durable(tmp_path, num_traces=2, wal={"segment_bytes": 4096})
    assert recovered(tel2, Signal.TRACES) == 8
    proc2.tick()
    assert [e.items for e in sink2.envelopes] == [6], "what the replay decided early goes on as one request"
    assert segments(tmp_path) == before[-2:], "taken: its pin and the merged ones' are given back, but the waiting two"
    proc2.tick(clock2.advance(10.5))
    assert sorted(s.trace_id for s in kept_spans(sink2)) == sorted(sent)
    assert segments(tmp_path) == [], "every pin given back once: the log empties"
    proc2.shutdown(time.monotonic() + 5)


def test_output_the_outbox_drops_gives_its_pin_back_so_the_log_still_empties(tmp_path):
    """The next stage refuses long enough for decided output to pass ``output.max_items``: the oldest is
    dropped and counted, and its pin goes with it. Were it kept, its segment and every newer one would stay
    on disk (until ``wal.max_bytes`` refuses all new data) and a restart would deliver what was counted lost."""
    proc, sink, clock, tel = durable(tmp_path, output={"backpressure_items": 2, "max_items": 2},
                                     wal={"segment_bytes": 4096})
    sink.refuse = Refused("queue_full")
    for _ in range(4):  # four outputs of one trace each, each in a segment of its own
        proc.consume(Envelope(Signal.TRACES, traces_request(span(tid(), root=True, attrs={"pad": "x" * 3000}))))
        proc.tick(clock.advance(1.5))
    assert tel.value("dropped", Signal.TRACES, "downstream_refused", "false") == 2
    sink.refuse = None
    proc.tick(clock.advance(1))
    assert len(kept_spans(sink)) == 2 and proc.pending_output_items == 0
    assert segments(tmp_path) == [], "every pin given back, the dropped outputs' too: the log empties"
    proc.shutdown(time.monotonic() + 5)


def test_a_trace_pins_the_older_segment_of_a_request_sorted_after_a_newer_one(tmp_path):
    """Two receiver threads log two requests of one trace in one order and sort them in the other: the trace,
    created by the newer request, must move its pin to the older segment, or that segment goes once its other
    traces are handed on and a crash loses the older request's span."""
    proc, sink, clock, waiting, done = _sorted_out_of_order(tmp_path)
    proc.tick(clock.advance(1.5))  # `done` is decided and handed on; `waiting` (no root) waits
    assert [s.trace_id for s in kept_spans(sink)] == [done]
    crash(proc)

    proc2, sink2, clock2, _ = durable(tmp_path)
    proc2.tick(clock2.advance(10.5))
    assert [s.trace_id for s in kept_spans(sink2)].count(waiting) == 4
    proc2.shutdown(time.monotonic() + 5)


def test_a_pin_moved_to_an_older_segment_is_given_back_once(tmp_path):
    """The older request holds two runs of the trace (another trace's span between them): its pin moves once,
    and once everything is decided and handed on the log empties."""
    proc, sink, clock, waiting, done = _sorted_out_of_order(tmp_path)
    proc.tick(clock.advance(10.5))
    assert sorted(s.trace_id for s in kept_spans(sink)) == sorted([done] + [waiting] * 4)
    assert segments(tmp_path) == []
    proc.shutdown(time.monotonic() + 5)


def test_a_trace_pins_the_older_segment_of_its_first_log_records_sorted_after_its_spans(tmp_path):
    """A logs request logged before a traces request of the same trace, sorted after it (two receiver threads):
    the trace was created by the spans, in the newer segment, and its first log records come from the older one.
    The trace's pin must move there too, or the older segment goes once its other trace is handed on, and a
    crash loses the log record."""
    proc, sink, clock, _ = durable(tmp_path, wal={"segment_bytes": 4096})
    wal = proc._durable._wal
    waiting, done = tid(), tid()
    pad = "x" * 3000
    older = (Signal.LOGS, logs_request((waiting, 9, pad), (done, 9, "done")))
    newer = (Signal.TRACES, traces_request(span(waiting, attrs={"pad": pad}), span(done, root=True)))
    logged = [(signal, req) + wal.write(signal, 2, req.SerializeToString()) for signal, req in (older, newer)]
    assert logged[1][2] > logged[0][2], "the two requests are in two segments"
    for signal, req, index, ticket in reversed(logged):
        proc._durable._here.segment = index
        proc._sort(Envelope(signal, req))
        wal.commit(ticket)
        proc._durable._here.segment = None
        wal.unpin(index)
    proc.tick(clock.advance(1.5))  # `done` is decided and handed on; `waiting` (no root) waits
    assert [s.trace_id for s in kept_spans(sink)] == [done]
    crash(proc)

    proc2, sink2, clock2, _ = durable(tmp_path)
    proc2.tick(clock2.advance(10.5))
    assert [r.body.string_value for r in kept_logs(sink2) if r.trace_id == waiting] == [pad]
    proc2.shutdown(time.monotonic() + 5)


def _sorted_out_of_order(tmp_path):
    """Two requests of one trace (``waiting``, no root) logged in one order and sorted in the other, as two
    receiver threads may: DurableBuffer.consume's steps, the newer request's sort first. The older request
    also holds ``done`` (a root, decided soon)."""
    proc, sink, clock, _ = durable(tmp_path, wal={"segment_bytes": 4096})
    wal = proc._durable._wal
    waiting, done = tid(), tid()
    pad = {"pad": "x" * 1000}
    older = traces_request(span(waiting, attrs=pad), span(done, root=True, attrs=pad), span(waiting, attrs=pad))
    newer = traces_request(span(waiting, attrs=pad), span(waiting, attrs=pad))
    logged = [(req,) + wal.write(Signal.TRACES, len(req.resource_spans[0].scope_spans[0].spans),
                                 req.SerializeToString()) for req in (older, newer)]
    assert logged[1][1] > logged[0][1], "the two requests are in two segments"
    for req, index, ticket in reversed(logged):
        proc._durable._here.segment = index
        proc._sort(Envelope(Signal.TRACES, req))
        wal.commit(ticket)
        proc._durable._here.segment = None
        wal.unpin(index)
    return proc, sink, clock, waiting, done


def test_graceful_shutdown_leaves_an_empty_log(tmp_path):
    proc, sink, clock, _ = durable(tmp_path)
    proc.consume(Envelope(Signal.TRACES, traces_request(*[span(tid()) for _ in range(5)])))
    proc.shutdown(time.monotonic() + 5)
    assert len(kept_spans(sink)) == 5 and segments(tmp_path) == []


def test_output_not_taken_by_the_shutdown_deadline_stays_in_the_log_counted_on_disk_not_lost(tmp_path):
    """The next stage refuses through the shutdown: the decided output keeps its pin, the shutdown report counts
    it on disk for the next start (not lost), and the next start hands it on."""
    from sidecar.shutdown_report import build_report

    proc, sink, clock, tel = durable(tmp_path)
    ids = [tid() for _ in range(3)]
    proc.consume(Envelope(Signal.TRACES, traces_request(*[span(t, root=True) for t in ids])))
    sink.refuse = Refused("queue_full")
    proc.shutdown(time.monotonic() + 0.2)
    assert proc.left_on_disk == {Signal.TRACES: 3}
    assert tel.value("dropped", Signal.TRACES, "shutdown", "false") == 0
    report = build_report(tel.registry, {}, [proc])
    assert report.signals[Signal.TRACES].on_disk == 3 and report.signals[Signal.TRACES].lost == 0

    proc2, sink2, clock2, tel2 = durable(tmp_path)
    assert recovered(tel2, Signal.TRACES) == 3
    proc2.tick(clock2.advance(1.5))
    assert sorted(s.trace_id for s in kept_spans(sink2)) == sorted(ids)
    proc2.shutdown(time.monotonic() + 5)
    assert proc2.left_on_disk == {} and segments(tmp_path) == []


def test_a_full_log_refuses_with_a_retryable_code_until_decided_data_is_deleted(tmp_path):
    proc, sink, clock, tel = durable(tmp_path, wal={"max_bytes": 1 << 20, "segment_bytes": 64 << 10})
    big = {"payload": "x" * 20_000}
    accepted = 0
    with pytest.raises(Refused) as refused:
        for _ in range(200):
            proc.consume(Envelope(Signal.TRACES, traces_request(span(tid(), root=True, attrs=big))))
            accepted += 1
    assert refused.value.retryable and refused.value.reason == "storage_full"
    assert 30 < accepted < 60
    assert tel.value("refused", Signal.TRACES, "storage_full") == 1
    proc.tick(clock.advance(1.5))  # decided, handed on: the segments go
    assert len(kept_spans(sink)) == accepted
    proc.consume(Envelope(Signal.TRACES, traces_request(span(tid(), root=True, attrs=big))))
    proc.shutdown(time.monotonic() + 5)


def test_log_files_are_private(tmp_path):
    proc, _, _, _ = durable(tmp_path)
    proc.consume(Envelope(Signal.TRACES, traces_request(span(tid()))))
    assert stat.S_IMODE(os.stat(wal_dir(tmp_path)).st_mode) == 0o700
    for name in segments(tmp_path):
        assert stat.S_IMODE(os.stat(wal_dir(tmp_path) / name).st_mode) == 0o600
    crash(proc)


def test_a_torn_last_record_is_skipped_and_the_rest_recovered(tmp_path):
    proc, _, _, _ = durable(tmp_path)
    proc.consume(Envelope(Signal.TRACES, traces_request(span(tid()), span(tid()))))
    proc.consume(Envelope(Signal.TRACES, traces_request(span(tid()))))
    crash(proc)
    [name] = segments(tmp_path)
    path = wal_dir(tmp_path) / name
    path.write_bytes(path.read_bytes()[:-5])  # the last write cut short: it was never acknowledged
    proc2, sink2, clock2, tel2 = durable(tmp_path)
    assert recovered(tel2, Signal.TRACES) == 2
    proc2.shutdown(time.monotonic() + 5)


def test_a_second_process_on_the_same_log_fails_at_start(tmp_path):
    proc, _, _, _ = durable(tmp_path)
    with pytest.raises(RuntimeError, match="in use by another process"):
        durable(tmp_path)
    proc.shutdown(time.monotonic() + 5)


def _hold_the_first_fdatasync(monkeypatch, os_module, *, fail: OSError | None = None):
    """The first ``fdatasync`` waits for the returned ``release`` (then raises ``fail`` when given); later
    ones run. Returns (the first sync started, release)."""
    started, release = threading.Event(), threading.Event()
    real_fdatasync = os.fdatasync

    def held(fd):
        if not started.is_set():
            started.set()
            assert release.wait(30)
            if fail is not None:
                raise fail
        real_fdatasync(fd)

    monkeypatch.setattr(os_module, "fdatasync", held)
    return started, release


def test_concurrent_writers_share_syncs_and_all_are_recovered(tmp_path, monkeypatch):
    """Writers that arrive while a sync runs share the next one: the first sync is held until every
    writer's record is written, so one more sync covers all the others."""
    from sidecar.processors.tail_sampling import wal as wal_module

    proc, sink, clock, tel = durable(tmp_path)
    n_threads, per_thread = 8, 1
    first_sync_started, release = _hold_the_first_fdatasync(monkeypatch, wal_module.os)

    def send():
        for _ in range(per_thread):
            proc.consume(Envelope(Signal.TRACES, traces_request(span(tid()))))

    threads = [threading.Thread(target=send) for _ in range(n_threads)]
    for t in threads:
        t.start()
    assert first_sync_started.wait(30)
    wal = proc._durable._wal  # noqa: SLF001 - how many records are written, waiting for their sync
    deadline = time.monotonic() + 30
    while wal._written < n_threads * per_thread and time.monotonic() < deadline:  # noqa: SLF001
        time.sleep(0.01)
    release.set()
    for t in threads:
        t.join(60)
    syncs = tel.registry.get_sample_value("sidecar_tail_sampling_log_syncs_total", {"component": "tail_sampling"})
    # the held sync, then one for every writer that waited behind it (one sync in all when every record
    # was written before the first sync read its target); a sync per writer would be 8
    assert syncs in (1, 2), syncs
    crash(proc)
    proc2, _, _, tel2 = durable(tmp_path)
    assert recovered(tel2, Signal.TRACES) == n_threads * per_thread
    proc2.shutdown(time.monotonic() + 5)


def test_after_a_failed_sync_no_record_it_was_to_cover_is_acknowledged(tmp_path, monkeypatch):
    """A failed fdatasync may have dropped the pages it was writing, and a later sync can succeed without
    them: every writer whose record was written before the failure is refused (and resends), also those
    a later successful sync would cover; records written after it go to a new segment and are acknowledged."""
    import errno

    from sidecar.processors.tail_sampling import wal as wal_module

    proc, _, _, _ = durable(tmp_path)
    n_threads = 5
    first_sync_started, release = _hold_the_first_fdatasync(monkeypatch, wal_module.os,
                                                            fail=OSError(errno.EIO, "Input/output error"))
    outcomes: list = []

    def send():
        try:
            proc.consume(Envelope(Signal.TRACES, traces_request(span(tid()))))
            outcomes.append("acknowledged")
        except Refused as e:
            outcomes.append((e.reason, e.retryable))

    threads = [threading.Thread(target=send, daemon=True) for _ in range(n_threads)]
    for t in threads:
        t.start()
    assert first_sync_started.wait(30)
    wal = proc._durable._wal  # noqa: SLF001 - records written, all before the failing sync returns
    deadline = time.monotonic() + 30
    while wal._written < n_threads and time.monotonic() < deadline:  # noqa: SLF001
        time.sleep(0.01)
    release.set()
    for t in threads:
        t.join(60)
    assert outcomes == [("storage_error", True)] * n_threads
    proc.consume(Envelope(Signal.TRACES, traces_request(span(tid()))))  # a new segment: acknowledged
    proc.shutdown(time.monotonic() + 5)


class _OtherBranch:
    """The audit branch of the shipped default, as far as the log can tell: it runs after tail sampling in the
    receiver's fan-out. Records what the log had written and synced, and its segment, when it ran."""

    def __init__(self, wal):
        self.wal = wal
        self.seen: list[tuple[int, int, object]] = []

    def consume(self, envelope) -> None:
        wal = self.wal
        self.seen.append((wal._written, wal._synced, wal._current))  # noqa: SLF001


def test_beside_another_branch_the_log_syncs_after_it_and_before_the_fanout_answers(tmp_path):
    """The receiver shares each traces request with the audit branch: the log's sync waits until that branch
    has run (overlapping its work, or covered by another request's sync meanwhile), and still comes before
    the answer to the sender; the request's pin on its segment is given back."""
    from sidecar.pipeline import Fanout

    proc, _, _, tel = durable(tmp_path)
    other = _OtherBranch(proc._durable._wal)  # noqa: SLF001
    Fanout([proc, other]).consume(Envelope(Signal.TRACES, traces_request(span(tid()))))
    [(written, synced_then, segment)] = other.seen
    assert synced_then < written  # not yet synced while the other branch ran
    assert proc._durable._wal._synced >= written  # noqa: SLF001 - synced before the fan-out returned
    assert segment.refs == 1  # the buffered trace's pin; the request's own is given back
    crash(proc)
    proc2, _, _, tel2 = durable(tmp_path)
    assert recovered(tel2, Signal.TRACES) == 1
    proc2.shutdown(time.monotonic() + 5)


def test_beside_another_branch_a_failed_sync_refuses_the_request_and_gives_its_pin_back(tmp_path, monkeypatch):
    import errno

    from sidecar.pipeline import Fanout
    from sidecar.processors.tail_sampling import wal as wal_module

    proc, _, _, _ = durable(tmp_path)
    _, release = _hold_the_first_fdatasync(monkeypatch, wal_module.os, fail=OSError(errno.EIO, "Input/output error"))
    release.set()
    other = _OtherBranch(proc._durable._wal)  # noqa: SLF001
    with pytest.raises(Refused) as refused:
        Fanout([proc, other]).consume(Envelope(Signal.TRACES, traces_request(span(tid()))))
    assert (refused.value.reason, refused.value.retryable) == ("storage_error", True)
    [(_, _, segment)] = other.seen
    assert segment.refs == 1  # the buffered trace's pin only
    proc.consume(Envelope(Signal.TRACES, traces_request(span(tid()))))  # a new segment: acknowledged
    proc.shutdown(time.monotonic() + 5)


_CONFIG = """
extensions: {{file_storage: {{directory: {dir}}}}}
receivers: {{otlp: {{protocols: {{grpc: {{endpoint: 127.0.0.1:0}}}}}}}}
processors:
  tail_sampling:
    {storage}
    wal: {{max_bytes: 10485760}}
    policies: [{{name: all, type: always_sample}}]
exporters: {{debug: {{}}}}
service:
  extensions: [{extensions}]
  pipelines: {{traces: {{receivers: [otlp], processors: [tail_sampling], exporters: [debug]}}}}
"""


def test_config_names_a_storage_that_is_not_enabled_by_its_yaml_path(tmp_path):
    text = _CONFIG.format(dir=tmp_path, storage="storage: file_storage", extensions="")
    with pytest.raises(ConfigError, match=r"processors\.tail_sampling\.storage: references extension 'file_storage'"):
        parse_config(text)
    parse_config(_CONFIG.format(dir=tmp_path, storage="storage: file_storage", extensions="file_storage"))


def test_config_wal_without_storage_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"processors\.tail_sampling.*wal: takes effect only with storage"):
        parse_config(_CONFIG.format(dir=tmp_path, storage="", extensions="file_storage"))


def test_output_refused_for_good_is_dropped_counted_and_its_log_deleted(tmp_path):
    proc, sink, clock, tel = durable(tmp_path)
    proc.consume(Envelope(Signal.TRACES, traces_request(span(tid(), root=True))))
    sink.refuse = Refused("bad_data", retryable=False)
    proc.tick(clock.advance(1.5))
    assert tel.value("dropped", Signal.TRACES, "bad_data", "false") == 1
    assert segments(tmp_path) == [], "dropped for good: nothing left to recover"
    proc.shutdown(time.monotonic() + 5)


def test_a_refusal_during_recovery_keeps_the_segment_for_the_next_start(tmp_path):
    proc, sink, clock, _ = durable(tmp_path)
    waiting = tid()
    proc.consume(Envelope(Signal.TRACES, traces_request(span(waiting))))  # undecided: keeps the segment
    proc.consume(Envelope(Signal.LOGS, logs_request((b"", 9, "no trace"))))  # forwarded as received
    assert len(kept_logs(sink)) == 1
    crash(proc)

    proc2, sink2, _, tel2 = make(POLICIES, storage="file_storage")
    sink2.refuse = Refused("queue_full")  # the next stage refuses while the log is replayed
    proc2.start(host_with_storage(tmp_path))
    assert recovered(tel2, Signal.TRACES) == 1 and recovered(tel2, Signal.LOGS) == 0
    crash(proc2)
    proc3, sink3, _, tel3 = durable(tmp_path)
    assert recovered(tel3, Signal.TRACES) == 1 and recovered(tel3, Signal.LOGS) == 1
    proc3.shutdown(time.monotonic() + 5)
    assert [r.body.string_value for r in kept_logs(sink3)] == ["no trace"]  # at least once: it came again
    assert [s.trace_id for s in kept_spans(sink3)] == [waiting]


def test_a_damaged_record_ends_its_segment_replay_and_is_logged(tmp_path, caplog):
    """Records longer than the CRC's pieces (sidecar.gil_io): one flipped byte in the second is caught."""
    import logging

    from sidecar.processors.tail_sampling.wal import WriteAheadLog

    wal = WriteAheadLog(wal_dir(tmp_path), max_bytes=1 << 24, segment_bytes=1 << 24, fsync=False)
    wal.open()
    payloads = [bytes([i]) * 12_000 + os.urandom(3_000) for i in range(3)]
    for payload in payloads:
        wal.write(Signal.TRACES, 1, payload)
    wal.abandon()
    [name] = segments(tmp_path)
    path = wal_dir(tmp_path) / name
    data = bytearray(path.read_bytes())
    data[data.index(payloads[1]) + 11_000] ^= 0x01  # bit rot in the third piece of the second record
    path.write_bytes(bytes(data))
    wal2 = WriteAheadLog(wal_dir(tmp_path), max_bytes=1 << 24, segment_bytes=1 << 24, fsync=False)
    [index] = wal2.open()
    with caplog.at_level(logging.WARNING, logger="sidecar.processors.tail_sampling.wal"):
        assert [payload for _, _, payload in wal2.records(index)] == payloads[:1]
    assert any("checksum mismatch" in r.getMessage() for r in caplog.records)
    wal2.abandon()


def test_a_record_that_does_not_parse_is_dropped_and_counted_not_blocking_the_start(tmp_path):
    from sidecar.processors.tail_sampling.wal import WriteAheadLog

    wal = WriteAheadLog(wal_dir(tmp_path), max_bytes=1 << 20, segment_bytes=1 << 16, fsync=False)
    wal.open()
    good = traces_request(span(tid(), root=True)).SerializeToString()
    for payload in (b"\xff\xff not protobuf", good):
        wal.write(Signal.TRACES, 1, payload)
    wal.abandon()
    proc, sink, clock, tel = durable(tmp_path)
    assert recovered(tel, Signal.TRACES) == 1
    assert tel.value("dropped", Signal.TRACES, "unreadable", "false") == 1
    proc.shutdown(time.monotonic() + 5)
    assert len(kept_spans(sink)) == 1


_FILL_UNTIL_FULL = """
import resource, signal, sys
from sidecar.component import Refused
from sidecar.processors.tail_sampling.wal import WriteAheadLog
from sidecar.signals import Signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))  # a file cannot grow past 64 KiB: a full disk
wal = WriteAheadLog(sys.argv[1], max_bytes=1 << 30, segment_bytes=1 << 30)
wal.open()
acked, refused = [], []
for i in range(30):
    size = 10_000 if i % 2 == 0 else 100  # small ones still fit once a big one was cut off
    try:
        _, ticket = wal.write(Signal.LOGS, i, bytes([i]) * size)
        wal.commit(ticket)
        acked.append(i)
    except Refused as e:
        assert e.retryable, e
        refused.append(i)
print(repr((acked, refused)))
"""


def test_a_write_cut_short_by_a_full_disk_is_refused_and_leaves_the_log_readable(tmp_path):
    import subprocess
    import sys

    from sidecar.processors.tail_sampling.wal import WriteAheadLog

    out = subprocess.run([sys.executable, "-c", _FILL_UNTIL_FULL, str(wal_dir(tmp_path))], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    acked, refused = eval(out)  # noqa: S307 - our own child's repr of two lists of ints
    assert refused and any(i > refused[0] for i in acked), "after a cut-off write the log must keep working"
    wal = WriteAheadLog(wal_dir(tmp_path), max_bytes=1 << 30, segment_bytes=1 << 30)
    [index] = wal.open()
    assert [(items, payload) for _, items, payload in wal.records(index)] == \
        [(i, bytes([i]) * (10_000 if i % 2 == 0 else 100)) for i in acked]
    wal.close()
