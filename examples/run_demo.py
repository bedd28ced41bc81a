"""The local demo: the sidecar with its default config, an instrumented torch service, real traffic.

Starts ``python -m sidecar --config collector-config/sidecar.yaml`` (its file exporter is
the embedded backend), starts examples/demo_app.py (FastAPI + torch, instrumented),
sends a mix of plain, failing, slow, debug-forced and generation requests — some with
PII — and shows what the sidecar kept, redacted and forwarded.
"""

from __future__ import annotations

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

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from sidecar.otlp_json import from_json  # noqa: E402
from sidecar.signals import Signal  # noqa: E402
from sidecar.testing import free_port  # noqa: E402

WORK = ROOT / "var" / "demo"
EMAIL, CARD = "alice@example.com", "4111 1111 1111 1111"
PII = (EMAIL, CARD, "4111111111111111")


def post(port: int, path: str, body: dict, headers: dict | None = None) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    raise TimeoutError(url)


def scrape(port: int) -> dict[tuple, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(metrics: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in metrics.items() if n == name and all(dict(ls).get(k) == w for k, w in labels.items()))


def read_jsonl(path: Path, signal: Signal) -> list:
    return [from_json(signal, line) for line in path.read_text().splitlines() if line] if path.exists() else []


def attr(kvs, key):
    for kv in kvs:
        if kv.key == key:
            return getattr(kv.value, kv.value.WhichOneof("value"))
    return None


def main() -> int:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    metrics_port, health_port, app_port = free_port(), free_port(), free_port()
    env = {**os.environ, "SIDECAR_STORAGE_DIR": str(WORK / "storage"), "SIDECAR_FILE_EXPORT_DIR": str(WORK / "telemetry"),
           "SIDECAR_METRICS_ENDPOINT": f"127.0.0.1:{metrics_port}", "SIDECAR_HEALTH_ENDPOINT": f"127.0.0.1:{health_port}",
           "PYTHONPATH": str(ROOT)}
    print("== starting the sidecar: python -m sidecar --config collector-config/sidecar.yaml")
    sidecar = subprocess.Popen([sys.executable, "-m", "sidecar", "--config", str(ROOT / "collector-config" / "sidecar.yaml")],
                               env=env, stdout=open(WORK / "sidecar.log", "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    app = None
    try:
        wait_http(f"http://127.0.0.1:{health_port}/readyz")
        print(f"   ready: OTLP on 127.0.0.1:4317 (gRPC) and :4318 (HTTP), metrics on :{metrics_port}, "
              f"health on :{health_port}")
        print("== starting the instrumented torch service (examples/demo_app.py)")
        app = subprocess.Popen([sys.executable, str(ROOT / "examples" / "demo_app.py"), str(app_port)], env=env,
                               stdout=open(WORK / "app.stdout.jsonl", "w"), stderr=open(WORK / "app.stderr.log", "w"))
        wait_http(f"http://127.0.0.1:{app_port}/docs")

        print("== sending traffic")
        sent = Counter()
        statuses = Counter()
        pii_prompt = f"classify the photo sent by {EMAIL}, card {CARD}, please"
        for i in range(200):
            prompt = pii_prompt if i % 5 == 0 else f"classify image #{i}"
            statuses[post(app_port, "/classify", {"prompt": prompt}, {"X-User-ID": EMAIL})] += 1
            sent["plain"] += 1
        for _ in range(8):
            statuses[post(app_port, "/classify", {"prompt": "boom", "fail": True})] += 1
            sent["error"] += 1
        slow = [threading.Thread(target=lambda: statuses.update([post(app_port, "/classify", {"prompt": "big", "slow": True})]))
                for _ in range(4)]
        for t in slow:
            t.start()
        for t in slow:
            t.join()
        sent["slow"] += 4
        for _ in range(5):
            statuses[post(app_port, "/classify", {"prompt": pii_prompt}, {"X-Debug-Trace": "1"})] += 1
            sent["forced"] += 1
        for i in range(20):
            statuses[post(app_port, "/generate", {"prompt": f"tell me a story {i}", "max_tokens": 12})] += 1
            sent["generate"] += 1
        print(f"   {sum(sent.values())} requests: {dict(sent)}; HTTP statuses {dict(statuses)}")

        print("== waiting for tail-sampling decisions and export")
        app.terminate()  # flushes the app's telemetry
        app.wait(30)
        app = None
        last, stable = None, time.monotonic()
        while time.monotonic() - stable < 3:
            m = scrape(metrics_port)
            now = total(m, "sidecar_items_exported_total")
            if now != last:
                last, stable = now, time.monotonic()
            time.sleep(0.5)
        m = scrape(metrics_port)
        (WORK / "sidecar-metrics.txt").write_text(
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode())
    finally:
        if app is not None:
            app.kill()
        sidecar.terminate()
        sidecar.wait(60)

    out = WORK / "telemetry"
    traces = read_jsonl(out / "traces.jsonl", Signal.TRACES)
    logs = read_jsonl(out / "logs.jsonl", Signal.LOGS)
    spans = [s for r in traces for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans]
    records = [rec for r in logs for rl in r.resource_logs for sl in rl.scope_logs for rec in sl.log_records]
    kept_by_policy: dict[bytes, str] = {}
    for s in spans:
        kept_by_policy.setdefault(s.trace_id, attr(s.attributes, "sampling.policy") or "?")

    print(f"\n== kept (written by the file exporter to {out.relative_to(ROOT)}/)")
    print(f"   {len(kept_by_policy)} traces ({len(spans)} spans) kept, by policy: {dict(Counter(kept_by_policy.values()))}")
    plain = sent["plain"] + sent["generate"]
    baseline = Counter(kept_by_policy.values()).get("baseline", 0)
    print(f"   errors {Counter(kept_by_policy.values()).get('errors', 0)}/{sent['error']}, "
          f"slow {Counter(kept_by_policy.values()).get('slow', 0)}/{sent['slow']}, "
          f"forced {Counter(kept_by_policy.values()).get('debug', 0)}/{sent['forced']}, "
          f"plain {baseline}/{plain} (~10% by the consistent probabilistic rule)")
    in_kept = sum(1 for r in records if r.trace_id in kept_by_policy)
    print(f"   {len(records)} log records forwarded: {in_kept} belong to kept traces, "
          f"{len(records) - in_kept} are ERROR logs or carry no trace id")
    dropped_sampled = total(m, "sidecar_items_dropped_total", reason="sampled_out")
    print(f"   dropped by sampling (intended): {dropped_sampled:.0f} spans and log records")

    print("\n== redacted")
    forwarded = "".join(p.read_text() for p in out.glob("*.jsonl"))
    leaks = {p: forwarded.count(p) for p in PII}
    example = next((r.body.string_value for r in records if "classifying request: classify the photo" in r.body.string_value), None)
    print(f"   sent:      {pii_prompt!r} with X-User-ID: {EMAIL}")
    print(f"   forwarded: {example!r}")
    users = Counter(attr(s.attributes, "user.id") for s in spans if attr(s.attributes, "user.id"))
    print(f"   user.id on forwarded spans: {dict(users)}")
    print(f"   PII strings in everything forwarded: {sum(leaks.values())} ({leaks})")
    by_rule = Counter()
    for (name, labels), v in m.items():
        if name == "sidecar_redaction_values_total":
            by_rule[f"{dict(labels).get('rule')}:{dict(labels).get('action')}"] += v
    print(f"   redacted in the sidecar, by rule: {dict(by_rule) or 'none (the app already redacted in-process)'}")

    print("\n== metrics derived from every span before sampling (Prometheus /metrics)")
    calls = total(m, "traces_span_metrics_calls_total", model_id="resnet-demo")
    errors = total(m, "traces_span_metrics_calls_total", model_id="resnet-demo", status_code="STATUS_CODE_ERROR")
    print(f"   model resnet-demo v2: {calls:.0f} forward calls counted, {errors:.0f} errors — the true totals,"
          f" although only {len(kept_by_policy)} traces were kept")
    print("\n== sidecar counters")
    for name in ("received", "accepted", "exported"):
        print(f"   {name:9}", {sig: int(total(m, f'sidecar_items_{name}_total', signal=sig,
                                             kind='receiver' if name != 'exported' else 'exporter'))
                                for sig in ('traces', 'logs', 'metrics')})
    refused = total(m, "sidecar_items_refused_total")
    lost = total(m, "sidecar_items_dropped_total", intended="false")
    print(f"   refused {refused:.0f}, lost (dropped unintentionally) {lost:.0f}")
    print("\n== one structured JSON log line from the app's stdout (what `kubectl logs` shows)")
    lines = (WORK / "app.stdout.jsonl").read_text().splitlines()
    print("  ", next((line for line in lines if '"classified"' in line), lines[0] if lines else "(none)"))
    print(f"\nfiles: {WORK.relative_to(ROOT)}/ (telemetry/*.jsonl, sidecar.log, app.stdout.jsonl)")
    ok = sum(leaks.values()) == 0 and Counter(kept_by_policy.values()).get("errors", 0) == sent["error"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
