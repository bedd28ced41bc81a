"""``sidecar_thread_cpu_seconds_total``: where the sidecar's CPU goes, by thread name, on ``/metrics``."""

import sys
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client import generate_latest

from sidecar.telemetry import SelfTelemetry, ThreadCPU

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _scrape(tel: SelfTelemetry) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(tel.registry).decode()):
        for s in family.samples:
            if s.name == "sidecar_thread_cpu_seconds_total":
                out[s.labels["thread"]] = s.value
            elif s.name == "process_cpu_seconds_total":
                out["<process>"] = s.value
    return out


def _burn(seconds: float, go: threading.Event, done: threading.Event) -> None:
    """Spend ``seconds`` of this thread's CPU, then wait until told to exit."""
    x = 0
    while time.thread_time() < seconds:
        x += 1
    done.set()
    go.wait(30)


def _measured() -> SelfTelemetry:
    tel = SelfTelemetry()
    tel.measure_process()
    tel.measure_process()  # twice, as a restarted metrics server would: still one of each
    return tel


def test_a_pools_cpu_counts_under_its_name_and_stays_counted_after_its_threads_exit():
    tel = _measured()
    go = threading.Event()
    dones = [threading.Event() for _ in range(2)]
    pool = [threading.Thread(target=_burn, args=(0.3, go, d), name=f"burner_{i}") for i, d in enumerate(dones)]
    for t in pool:
        t.start()
    for d in dones:
        assert d.wait(30)
    while_running = _scrape(tel)
    go.set()
    for t in pool:
        t.join()
    after_exit = _scrape(tel)

    assert while_running["burner"] >= 0.5  # both threads, under one name (the clock ticks are 10 ms)
    assert after_exit["burner"] == while_running["burner"]  # exited: still counted, as last seen
    assert "burner_0" not in after_exit and "burner_1" not in after_exit
    # the series add up to the process's CPU, the rest under "other" (threads Python did not start)
    total = sum(v for k, v in after_exit.items() if k != "<process>")
    assert abs(total - after_exit["<process>"]) < 0.05
    assert after_exit["other"] >= 0


def test_series_never_go_down_while_threads_come_and_go():
    tel = _measured()
    last: dict[str, float] = {}
    for round_ in range(5):
        go, done = threading.Event(), threading.Event()
        t = threading.Thread(target=_burn, args=(0.05, go, done), name=f"worker-{round_}")
        t.start()
        assert done.wait(30)
        now = _scrape(tel)
        go.set()
        t.join()
        for name, value in last.items():
            assert now.get(name, 0.0) >= value - 1e-9, (name, value, now.get(name))
        last = now
    assert last["worker"] >= 0.1  # five short-lived threads of one name, each seen by a scrape


def test_names_drop_a_pools_index_and_pythons_default_numbering():
    def named(name: str) -> threading.Thread:
        return threading.Thread(name=name)

    assert ThreadCPU.name_of(named("otlp-grpc_3")) == "otlp-grpc"
    assert ThreadCPU.name_of(named("exporter-otlp-1")) == "exporter-otlp"
    assert ThreadCPU.name_of(named("ThreadPoolExecutor-3_1")) == "ThreadPoolExecutor"  # one series for any pool
    assert ThreadCPU.name_of(named("Thread-12 (_serve)")) == "Thread (_serve)"
    assert ThreadCPU.name_of(named("tail_sampling[tail_sampling]")) == "tail_sampling[tail_sampling]"
    assert ThreadCPU.name_of(named("exporter-audit-index")) == "exporter-audit-index"


def test_a_thread_whose_stat_cannot_be_read_keeps_its_last_value(tmp_path):
    """A thread that is exiting is still listed by Python after /proc dropped it: its series must not dip (a
    counter that goes down reads as a restart), and it is counted once it is gone."""
    def stat(path, ticks: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"1 (py thon) S {' '.join(['0'] * 10)} {ticks} 0 0 0\n")  # utime is field 14

    go, done = threading.Event(), threading.Event()
    t = threading.Thread(target=_burn, args=(0.0, go, done), name="leaving-1")
    t.start()
    assert done.wait(30)
    tick = ThreadCPU()._tick
    stat(tmp_path / "stat", 100 * tick)
    for other in threading.enumerate():
        stat(tmp_path / "task" / str(other.native_id) / "stat", (3 if other is t else 0) * tick)
    cpu = ThreadCPU(str(tmp_path))
    read = lambda: {s.labels["thread"]: s.value for f in cpu.collect() for s in f.samples}  # noqa: E731
    assert read()["leaving"] == 3.0
    (tmp_path / "task" / str(t.native_id) / "stat").unlink()  # /proc no longer has it; Python still lists it
    assert read()["leaving"] == 3.0
    go.set()
    t.join()
    assert read()["leaving"] == 3.0 and read()["other"] == 97.0
