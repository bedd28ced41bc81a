"""The local demo: the sidecar with its default config, an instrumented torch service, real traffic.

Starts ``python -m sidecar --config collector-config/sidecar.yaml`` (its file exporter is
the embedded backend) on free ports, starts examples/demo_app.py (FastAPI + torch,
instrumented; a stable v1 and a canary v2 of the classifier), sends a mix of plain,
failing, slow, debug-forced and generation requests — some with PII — and reports what
the sidecar measured, kept, dropped and redacted, and where to look at it.

The traffic comes in two phases. After the first, the app exports its drift summaries
(``POST /debug/flush``) and the sidecar pins them as each version's reference (its
``reference.window`` is 2 s here, SIDECAR_DRIFT_REFERENCE_WINDOW); then the canary's inputs get
column 7 shifted (``POST /debug/shift-canary``) and the second phase is its current window. The
app exports metrics only at these flushes (OTEL_METRIC_EXPORT_INTERVAL is 10 min), so what is
reference and what is current never depends on timing.

    python examples/run_demo.py [--work-dir var/demo] [--otlp-grpc-port N] [--otlp-http-port N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from rich import box  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

import demo_report as rep  # noqa: E402
from contract.attributes import SAMPLING_FORCE_KEEP, TAG_PREFIX  # noqa: E402
from sidecar.cli import render  # noqa: E402
from sidecar.cli.store import POLICY, TraceStore  # noqa: E402
from sidecar.testing import free_port  # noqa: E402

EMAIL, CARD = "alice@example.com", "4111 1111 1111 1111"
PII = (EMAIL, CARD, "4111111111111111")
MODEL = "resnet-demo"
PLAIN_PER_PHASE = 1200  # the canary gets every fourth: 300 of its forwards before the shift, 300 after
REFERENCE_WINDOW = "2s"  # the sidecar's drift reference: a version's first 2s of summaries (one flush)


class DemoError(Exception):
    """A step failed; the message is one line that says why and which log to read."""


def post(port: int, path: str, body: dict, headers: dict | None = None) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def last_error(log: Path) -> str:
    """The line of a log that says why a process stopped: its last ERROR/exception line, else its last line."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
    for ln in reversed(lines):
        if " ERROR " in ln or "Error:" in ln or "error:" in ln:
            return ln
    return lines[-1] if lines else "(no output)"


def wait_ready(url: str, proc: subprocess.Popen, what: str, log: Path, timeout: float = 60) -> None:
    """Until ``url`` answers; a process that exits first is reported with the line of its log that says why."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"{what} exited during start-up (code {proc.returncode}): {last_error(log)} "
                            f"-- full log: {log}")
        try:
            get(url, timeout=2)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    raise DemoError(f"{what} not ready after {timeout:.0f}s -- see {log}")


def settled(m: rep.Samples) -> bool:
    """Every trace decided and everything handed to the file exporter (the report's backend) written."""
    buffered = rep.total(m, "sidecar_tail_sampling_buffered_traces")
    queued = rep.total(m, "sidecar_queue_size", component="file")
    at_exporter = rep.total(m, "sidecar_items_received_total", kind="exporter", component="file")
    exported = rep.total(m, "sidecar_items_exported_total", component="file")
    return buffered == 0 and queued == 0 and exported >= at_exporter > 0


def send_traffic(console: Console, port: int, metrics_url: str) -> tuple[Counter, Counter, float, dict]:
    """Both phases: unshifted traffic, the flush that becomes each version's drift reference, the canary's shift,
    traffic again, the flush that becomes the current window."""
    pii_prompt = f"classify the photo sent by {EMAIL}, card {CARD}, please"
    before = ([("plain", i) for i in range(PLAIN_PER_PHASE)] + [("error", i) for i in range(2)]
              + [("forced", i) for i in range(5)] + [("generate", i) for i in range(10)])
    after = ([("plain", i) for i in range(PLAIN_PER_PHASE, 2 * PLAIN_PER_PHASE)]
             + [("generate", i) for i in range(10, 20)])
    sent, statuses = Counter(), Counter()
    shift: dict = {}
    t0 = time.monotonic()
    with Progress(TextColumn("   traffic"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("", total=len(before) + len(after) + 4)
        slow_codes: list[int] = []  # list.append is atomic; Counter += from two threads is not
        slow = [threading.Thread(target=lambda: slow_codes.append(
            post(port, "/classify", {"prompt": "big", "slow": True}, {"X-Model-Version": "v1"}))) for _ in range(4)]
        for t in slow:
            t.start()
        for phase, plan in enumerate((before, after)):
            if phase:
                flush_app(port)
                wait_reference_pinned(metrics_url)
                shift = json.loads(post_json(port, "/debug/shift-canary"))
            for kind, i in plan:
                if kind == "plain":
                    prompt = pii_prompt if i % 5 == 0 else f"classify image #{i}"
                    code = post(port, "/classify", {"prompt": prompt}, {"X-User-ID": EMAIL})
                elif kind == "error":  # a malformed input on the stable version: its forward raises
                    code = post(port, "/classify", {"prompt": "boom", "fail": True}, {"X-Model-Version": "v1"})
                elif kind == "forced":
                    code = post(port, "/classify", {"prompt": pii_prompt},
                                {"X-Debug-Trace": "1", "X-Model-Version": "v1"})
                else:
                    code = post(port, "/generate", {"prompt": f"tell me a story {i}", "max_tokens": 12})
                sent[kind] += 1
                statuses[code] += 1
                progress.advance(task)
            if not phase:
                for t in slow:  # before the reference is taken: every unshifted forward is in it
                    t.join()
                statuses.update(slow_codes)
                sent["slow"] += 4
                progress.advance(task, 4)
        flush_app(port)
    return sent, statuses, time.monotonic() - t0, shift


def post_json(port: int, path: str) -> bytes:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read()


def flush_app(port: int) -> None:
    """The app exports its metrics now; it answers once the sidecar has accepted them."""
    if not json.loads(post_json(port, "/debug/flush")).get("flushed"):
        raise DemoError("the app could not export its metrics to the sidecar -- see app.stderr.log and sidecar.log")


def wait_reference_pinned(metrics_url: str, timeout: float = 60) -> None:
    """Until the sidecar has pinned the drift reference of both versions (their reference window is over)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = rep.parse_metrics(get(metrics_url).decode())
        if all(rep.total(m, "sidecar_drift_samples", model_id=MODEL, model_version=v, window="reference") > 0
               for v in ("v1", "v2")):
            return
        time.sleep(0.2)
    raise DemoError(f"the sidecar pinned no drift reference for {MODEL} v1 and v2 within {timeout:.0f}s "
                    f"(see its sidecar.log)")


def run(args: argparse.Namespace, console: Console) -> int:
    work = Path(args.work_dir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    (work / "telemetry").mkdir(parents=True)
    grpc_port, http_port = args.otlp_grpc_port or free_port(), args.otlp_http_port or free_port()
    metrics_port, health_port, app_port = free_port(), free_port(), free_port()
    env = {**os.environ, "SIDECAR_STORAGE_DIR": str(work / "storage"), "SIDECAR_FILE_EXPORT_DIR": str(work / "telemetry"),
           "SIDECAR_OTLP_GRPC_ENDPOINT": f"127.0.0.1:{grpc_port}", "SIDECAR_OTLP_HTTP_ENDPOINT": f"127.0.0.1:{http_port}",
           "SIDECAR_METRICS_ENDPOINT": f"127.0.0.1:{metrics_port}", "SIDECAR_HEALTH_ENDPOINT": f"127.0.0.1:{health_port}",
           "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{grpc_port}", "PYTHONPATH": str(ROOT),
           "PYTHONWARNINGS": "ignore", "SIDECAR_DRIFT_REFERENCE_WINDOW": REFERENCE_WINDOW}
    sidecar_log, app_log = work / "sidecar.log", work / "app.stderr.log"
    t_start = time.monotonic()
    console.print("[bold]== starting the sidecar[/]: python -m sidecar --config collector-config/sidecar.yaml")
    sidecar = subprocess.Popen([sys.executable, "-m", "sidecar", "--config", str(ROOT / "collector-config" / "sidecar.yaml")],
                               env=env, stdout=open(sidecar_log, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    app = None
    try:
        with console.status("   waiting for /readyz"):
            wait_ready(f"http://127.0.0.1:{health_port}/readyz", sidecar, "the sidecar", sidecar_log)
        console.print(f"   ready: OTLP gRPC :{grpc_port}, HTTP :{http_port}, metrics :{metrics_port}, health :{health_port}")
        console.print("[bold]== starting the instrumented torch service[/] (examples/demo_app.py: v1 stable, v2 canary)")
        # metrics leave the app only when the demo flushes them (and at exit): see the module doc
        app = subprocess.Popen([sys.executable, str(ROOT / "examples" / "demo_app.py"), str(app_port)],
                               env={**env, "OTEL_METRIC_EXPORT_INTERVAL": "600000"},
                               stdout=open(work / "app.stdout.jsonl", "w"), stderr=open(app_log, "w"))
        with console.status("   loading torch and the models"):
            wait_ready(f"http://127.0.0.1:{app_port}/docs", app, "the demo app", app_log, timeout=120)
        console.print("[bold]== sending traffic[/]")
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        sent, statuses, traffic_s, shift = send_traffic(console, app_port, metrics_url)
        console.print(f"   {sum(sent.values())} requests in {traffic_s:.1f}s: {dict(sent)}; "
                      f"HTTP statuses {dict(statuses)}", soft_wrap=True)
        app_redactions = json.loads(get(f"http://127.0.0.1:{app_port}/debug/redactions"))
        app.terminate()  # flushes the app's telemetry
        app.wait(30)
        app = None
        deadline = time.monotonic() + 60
        with console.status("   waiting for tail-sampling decisions and export"):
            while not settled(rep.parse_metrics(get(metrics_url).decode())):
                if time.monotonic() > deadline:
                    console.print("   warning: not everything was decided and exported after 60s; "
                                  "the figures below may be incomplete", soft_wrap=True)
                    break
                time.sleep(0.3)
        text = get(metrics_url).decode()
        (work / "sidecar-metrics.txt").write_text(text)
        m = rep.parse_metrics(text)
    finally:
        if app is not None:
            app.kill()
        sidecar.terminate()
        sidecar.wait(60)
    report(console, work, m, sent, statuses, traffic_s, app_redactions, shift)
    console.print(f"\n(demo finished in {time.monotonic() - t_start:.1f}s)")
    return check(console, work, m, statuses)


def report(console: Console, work: Path, m: rep.Samples, sent: Counter, statuses: Counter, traffic_s: float,
           app_redactions: dict, shift: dict) -> None:
    tele = work / "telemetry"
    store = TraceStore(tele)
    store.refresh()
    kept = store.recent()

    console.rule("per model version (span metrics: every forward, before sampling)")
    t = Table(box=box.SIMPLE_HEAD)
    for col in ("model", "version", "requests", "errors", "error rate", "p50", "p95", "p99", "2% alert"):
        t.add_column(col, justify="left" if col in ("model", "version", "2% alert") else "right")
    versions = rep.per_version(m, MODEL, traffic_s)
    for v in versions:
        t.add_row(MODEL, v.version, str(v.calls), str(v.errors), f"{v.error_rate:.1%}", f"{v.p50_ms:.1f}ms",
                  f"{v.p95_ms:.1f}ms", f"{v.p99_ms:.1f}ms", "WOULD FIRE" if v.would_alert else "quiet")
    console.print(t)
    for v in versions:
        verdict = "would trip" if v.would_alert else "would not trip"
        console.print(f"   {MODEL} {v.version}: error rate {v.error_rate:.1%} at {v.rate_per_s:.1f} req/s {verdict} "
                      f"ModelVersionErrorRateHigh (> 2% and > 1 req/s, for 5m)")
    console.print("   latency quantiles are interpolated in the histogram buckets, as histogram_quantile() does")

    console.rule("drift per model version (sidecar_drift_*: the current window against the version's reference)")
    console.print(f"   reference: each version's forwards of the first {PLAIN_PER_PHASE} plain requests, "
                  "pinned by the sidecar; "
                  f"current: the {PLAIN_PER_PHASE} after them, once {shift.get('version')}'s inputs had column "
                  f"{shift.get('column')} shifted by {shift.get('by', 0):+} (v1's never changed)", soft_wrap=True)
    t = Table(box=box.SIMPLE_HEAD)
    for col in ("model", "version", "feature (top by score)", "PSI", "JS", "samples ref/cur", ""):
        t.add_column(col, justify="right" if col in ("PSI", "JS", "samples ref/cur") else "left")
    drift = rep.drift(m, MODEL)
    for dv in drift:
        for f in dv.numeric[:3] + dv.categorical[:1]:
            t.add_row(MODEL, dv.version, f.feature, f"{f.psi:.3f}" if f.psi is not None else "-", f"{f.js:.3f}",
                      f"{f.samples_reference}/{f.samples_current}", "DRIFTED" if f.drifted else "")
    console.print(t)
    console.print("   samples: one value per forward (numeric features), one count per row (categories)")
    for dv in drift:
        console.print(f"   {dv.verdict(MODEL)}", soft_wrap=True)
    if not drift:
        console.print("   no drift scores: a window held fewer than min_samples values (see the sidecar's /metrics)")
    console.print(f"   thresholds: the alerts' (PSI > {rep.PSI_ALERT}: ModelVersionInputDrift; JS > {rep.JS_ALERT} for "
                  "categories: ModelVersionCategoryDrift); every score: sidecar_drift_psi, _js, _wasserstein, _chi2",
                  soft_wrap=True)

    console.rule("tail sampling, counted in traces (spans and log records that went with them)")
    kept_spans, kept_logs = Counter(), Counter()
    for tr in kept:
        p = tr.first(POLICY) or "?"
        kept_spans[p] += len(tr.spans)
        kept_logs[p] += len(tr.logs)
    t = Table(box=box.SIMPLE_HEAD)
    for col in ("outcome", "policy / reason", "traces", "spans", "log records"):
        t.add_column(col, justify="right" if col in ("traces", "spans", "log records") else "left")
    for row in rep.sampling_table(m, kept_spans, kept_logs):
        t.add_row(row.outcome, row.policy, str(row.traces), str(row.spans), str(row.logs))
    console.print(t)
    by_policy = Counter(tr.first(POLICY) for tr in kept)
    errors_sent = statuses.get(500, 0)
    # slow and forced requests are found by what they carry, whichever policy kept them: on a loaded machine a
    # forced request can take longer than the slow threshold, and the policy listed first ("slow") then keeps it
    slow_kept = sum(1 for tr in kept if tr.first(TAG_PREFIX + "load") == "slow")
    forced_kept = sum(1 for tr in kept if tr.first(SAMPLING_FORCE_KEEP) is True)
    console.print(f"   errors kept {by_policy.get('errors', 0)}/{errors_sent}, slow kept {slow_kept}/{sent['slow']}, "
                  f"forced kept {forced_kept}/{sent['forced']}; the rest by the consistent 10% rule")
    traceless = sum(1 for line in _lines(tele / "logs.jsonl") for rl in line.get("resourceLogs", ())
                    for sl in rl.get("scopeLogs", ()) for r in sl.get("logRecords", ()) if not r.get("traceId"))
    console.print(f"   log records without a trace id forwarded on their own: {traceless}")

    console.rule("redaction, per detector (values changed)")
    t = Table(box=box.SIMPLE_HEAD)
    t.add_column("detector:action")
    t.add_column("in the app", justify="right")
    t.add_column("in the sidecar", justify="right")
    for name, in_app, in_sidecar in rep.redactions(app_redactions, m):
        t.add_row(name, str(in_app), str(in_sidecar))
    console.print(t)
    forwarded = "".join(p.read_text() for p in tele.glob("*.jsonl")) + (work / "app.stdout.jsonl").read_text()
    leaks = {p: forwarded.count(p) for p in PII}
    console.print(f"   sent:      'classify the photo sent by {EMAIL}, card {CARD}, please' "
                  f"with X-User-ID: {EMAIL}", soft_wrap=True)
    example = next((lg.body for tr in kept for lg in tr.logs
                    if isinstance(lg.body, str) and lg.body.startswith("classifying request: classify the photo")), None)
    console.print(f"   forwarded: {example!r}")
    console.print(f"   PII strings in everything forwarded and in the app's stdout: {sum(leaks.values())}")

    console.rule("one kept error trace (the canary's), with its logs in place")
    errors = [tr for tr in kept if tr.is_error]
    pick = next((tr for tr in errors if tr.first("ml.model.version") == "v2" and tr.logs), errors[0] if errors else None)
    if pick is not None:
        console.print("\n".join(render.tree(pick)), highlight=False, markup=False, soft_wrap=True)
        console.print(f"   the same from the command line: python -m sidecar traces show {pick.trace_id} --dir {_rel(tele)}",
                      soft_wrap=True)

    console.rule("sidecar counters (items)")
    for name in ("received", "exported"):
        kind = "receiver" if name == "received" else "exporter"
        console.print(f"   {name:9} " + ", ".join(
            f"{sig} {int(rep.total(m, f'sidecar_items_{name}_total', signal=sig, kind=kind))}" for sig in ("traces", "logs", "metrics")))
    refused = rep.total(m, "sidecar_receiver_requests_refused_total")
    lost = rep.total(m, "sidecar_items_dropped_total", intended="false")
    console.print(f"   refused requests {int(refused)}, lost (dropped unintentionally) items {int(lost)}")

    console.rule("where everything lives")
    t = Table(box=box.SIMPLE_HEAD)
    t.add_column("what")
    t.add_column("where / command")
    t.add_row("recent kept traces", f"python -m sidecar traces ls --dir {_rel(tele)}")
    t.add_row("one trace, by trace or request id", f"python -m sidecar traces show ID --dir {_rel(tele)} [--attributes]")
    t.add_row("follow new traces", f"python -m sidecar traces tail --dir {_rel(tele)}")
    t.add_row("raw OTLP/JSON (one request a line)", f"{_rel(tele)}/traces.jsonl, logs.jsonl, metrics.jsonl")
    t.add_row("the sidecar's /metrics at the end", f"{_rel(work)}/sidecar-metrics.txt")
    t.add_row("the sidecar's log", f"{_rel(work)}/sidecar.log")
    t.add_row("the app's JSON logs (kubectl logs)", f"{_rel(work)}/app.stdout.jsonl, app.stderr.log")
    audit = work / "storage" / "audit.db"
    if audit.exists():  # the default config's audit branch: every request, before sampling
        t.add_row("every request on record (audit)",
                  f"python -m sidecar audit query --store {_rel(audit)} --model-version v2 --status ERROR")
    t.add_row("the config that ran", "collector-config/sidecar.yaml")
    console.print(t)


def check(console: Console, work: Path, m: rep.Samples, statuses: Counter) -> int:
    """Exit status: every error trace kept, nothing refused or lost, nothing with PII forwarded."""
    store = TraceStore(work / "telemetry")
    store.refresh()
    errors_kept = sum(1 for tr in store.recent() if tr.first(POLICY) == "errors")
    forwarded = "".join(p.read_text() for p in (work / "telemetry").glob("*.jsonl"))
    problems = []
    if errors_kept != statuses.get(500, 0):
        problems.append(f"{errors_kept} error traces kept for {statuses.get(500, 0)} failed requests")
    if any(p in forwarded for p in PII):
        problems.append("PII forwarded")
    refused = rep.total(m, "sidecar_receiver_requests_refused_total")
    lost = rep.total(m, "sidecar_items_dropped_total", intended="false")
    if refused or lost:
        problems.append(f"the sidecar refused {int(refused)} requests and lost {int(lost)} items "
                        f"(see {_rel(work)}/sidecar.log)")
    console.print(f"FAILED: {'; '.join(problems)}" if problems else "OK: every error trace kept, nothing lost, no PII",
                  soft_wrap=True)
    return 1 if problems else 0


def _lines(path: Path):
    if path.exists():
        for line in path.read_text().splitlines():
            if line:
                yield json.loads(line)


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", default=str(ROOT / "var" / "demo"), help="where the demo writes (emptied first)")
    ap.add_argument("--otlp-grpc-port", type=int, default=0, help="the sidecar's OTLP/gRPC port (default: a free one)")
    ap.add_argument("--otlp-http-port", type=int, default=0, help="the sidecar's OTLP/HTTP port (default: a free one)")
    args = ap.parse_args(argv)
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=120)
    try:
        return run(args, console)
    except DemoError as e:
        console.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
