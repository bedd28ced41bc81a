"""The first hour: the demo tells the whole story, and the trace viewer reads what it kept.

The demo runs once (real sidecar, real instrumented FastAPI + torch app, real traffic);
its report is checked, then ``python -m sidecar traces`` is run against its data.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]


def _run(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, **kw)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    r = _run([str(ROOT / "examples" / "run_demo.py"), "--work-dir", str(work)], timeout=240)
    return r, work


def traces_cli(work, *args):
    return _run(["-m", "sidecar", "traces", *args, "--dir", str(work / "telemetry")], timeout=60)


def test_demo_succeeds_keeps_every_error_and_forwards_no_pii(demo):
    r, _ = demo
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "OK: every error trace kept, nothing lost, no PII" in out
    failed = sum(int(n) for n in re.findall(r"\b500: (\d+)", out))
    assert failed > 0
    assert f"errors kept {failed}/{failed}, slow kept 4/4, forced kept 5/5" in out
    assert "PII strings in everything forwarded and in the app's stdout: 0" in out
    assert "alice@example.com" not in out.split("sent:")[1].split("\n", 1)[1]  # only in the "sent" line
    assert "Warning" not in out and "warning" not in out and "Traceback" not in out


def test_report_has_per_version_figures_and_names_the_canary_for_the_alert(demo):
    out = demo[0].stdout
    rows = {m[0]: m for m in re.findall(
        r"resnet-demo\s+(v\d)\s+(\d+)\s+(\d+)\s+([\d.]+)%\s+([\d.]+)ms\s+([\d.]+)ms\s+([\d.]+)ms\s+(WOULD FIRE|quiet)", out)}
    assert set(rows) == {"v1", "v2"}, out
    v1, v2 = rows["v1"], rows["v2"]
    assert int(v1[1]) > int(v2[1]) > 0  # the canary gets a quarter of the traffic
    assert float(v1[3]) <= 2.0 < float(v2[3])
    assert float(v2[4]) > float(v1[4])  # p50: the canary is slower
    assert all(float(a) <= float(b) <= float(c) for _, _, _, _, a, b, c, _ in rows.values())  # p50 <= p95 <= p99
    assert (v1[7], v2[7]) == ("quiet", "WOULD FIRE")
    assert re.search(r"resnet-demo v2: error rate [\d.]+% at [\d.]+ req/s would trip ModelVersionErrorRateHigh", out)
    assert re.search(r"resnet-demo v1: error rate [\d.]+% at [\d.]+ req/s would not trip", out)


def test_report_counts_sampling_in_traces_per_policy_and_signal_and_redactions_as_integers(demo):
    out = demo[0].stdout
    kept = dict(re.findall(r"kept\s+(\w+)\s+(\d+)\s+\d+\s+\d+", out))
    assert {"errors", "slow", "debug", "baseline"} <= set(kept), out
    dropped = re.search(r"dropped\s+sampled_out\s+(\d+)\s+(\d+)\s+(\d+)", out)
    traces, spans, logs = map(int, dropped.groups())
    assert 0 < traces < spans  # traces, not items: every request is at least two spans
    redactions = dict((k, (int(a), int(s))) for k, a, s in re.findall(r"(\w+:\w+)\s+(\d+)\s+(\d+)\s*\n", out))
    assert redactions["email:mask"][0] > 0 and redactions["payment_card:mask"][0] > 0, out


def test_report_draws_a_kept_error_trace_with_its_logs_in_place(demo):
    out = demo[0].stdout
    section = out.split("one kept error trace")[1].split("sidecar counters")[0]
    assert re.search(r"trace [0-9a-f]{32} .* ERROR", section)
    assert "└─ POST /classify  [server]" in section
    assert re.search(r"ml\.forward resnet-demo  \[internal\] .* ERROR: FloatingPointError", section)
    assert re.search(r"≡ \+[\d.]+ms INFO classifying request", section)
    assert re.search(r"≡ \+[\d.]+ms ERROR ", section)
    assert "python -m sidecar traces show" in out


PSI_ALERT, JS_ALERT = 0.25, 0.1  # deploy/prometheus/alerts.yaml: ModelVersionInputDrift, ModelVersionCategoryDrift
SHIFTED = ("v2", "input.0[7].mean")  # examples/demo_app.py: the canary's column 7, shifted halfway through


def _drift_scores(work):
    """stat -> {(version, feature): value} of resnet-demo from the sidecar's /metrics at the end of the demo."""
    out = {}
    for family in text_string_to_metric_families((work / "sidecar-metrics.txt").read_text()):
        if family.name.startswith("sidecar_drift_"):
            for s in family.samples:
                if s.labels.get("model_id") == "resnet-demo":
                    stat = family.name.removeprefix("sidecar_drift_") + s.labels.get("window", "")
                    out.setdefault(stat, {})[(s.labels["model_version"], s.labels["feature"])] = s.value
    return out


def test_drift_rises_for_the_canarys_shifted_feature_only(demo):
    r, work = demo
    scores = _drift_scores(work)
    psi, js = scores["psi"], scores["js"]
    # both windows hold hundreds of the canary's forwards: its reference (before the shift) and current (after)
    assert scores["samplesreference"][SHIFTED] >= 250 and scores["samplescurrent"][SHIFTED] >= 250
    assert psi[SHIFTED] > PSI_ALERT and js[SHIFTED] > JS_ALERT
    others = {k: v for k, v in psi.items() if k != SHIFTED}
    for version in ("v1", "v2"):  # every input column of both versions was scored (64 columns, mean and std)
        assert sum(1 for (ver, f) in others if ver == version and f.startswith("input.0[")) >= 127, sorted(psi)
    assert max(others.values()) < PSI_ALERT, sorted(others.items(), key=lambda kv: -kv[1])[:5]
    categorical = {k: v for k, v in js.items() if k not in psi}
    assert {("v1", "output.label"), ("v2", "output.label")} <= set(categorical)
    assert max(categorical.values()) < JS_ALERT, categorical

    section = r.stdout.split("drift per model version")[1].split("tail sampling")[0]
    assert "had column 7 shifted by +1.0 (v1's never changed)" in section
    drifted = re.findall(r"resnet-demo\s+(v\d)\s+(\S+)\s+([\d.]+)\s+([\d.]+)\s+\d+/\d+\s+DRIFTED", section)
    assert [(v, f) for v, f, _, _ in drifted] == [SHIFTED], section
    assert float(drifted[0][2]) == pytest.approx(psi[SHIFTED], abs=1e-3)
    n_v1 = sum(1 for ver, _ in psi if ver == "v1")
    n_v2 = sum(1 for ver, _ in psi if ver == "v2")
    assert re.search(rf"resnet-demo v2: DRIFTED input\.0\[7\]\.mean \(PSI {psi[SHIFTED]:.2f} > 0\.25\); its other "
                     rf"{n_v2 - 1} numeric features stayed under PSI 0\.25", section), section
    assert f"resnet-demo v1: no drift: all {n_v1} numeric features stayed under PSI 0.25" in section, section


def _kept(work):
    r = traces_cli(work, "ls", "-n", "0", "--json")
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_traces_ls_lists_the_kept_traces_newest_first(demo):
    r, work = demo
    rows = _kept(work)
    assert len(rows) >= 30
    assert [x["start"] for x in rows] == sorted((x["start"] for x in rows), reverse=True)
    assert {"v1", "v2"} <= {x["model_version"] for x in rows}
    assert all(re.fullmatch(r"[0-9a-f-]{36}", x["request_id"]) for x in rows if x["root"] == "POST /classify")
    table = traces_cli(work, "ls", "--errors")
    lines = table.stdout.splitlines()
    assert lines[0].startswith("TIME (UTC)") and len(lines) > 1
    assert all(" ERROR " in line for line in lines[1:])


def test_traces_show_by_trace_id_and_by_request_id_draw_the_same_tree(demo):
    _, work = demo
    err = next(x for x in _kept(work) if x["status"] == "ERROR" and x["model_version"] == "v2")
    by_id = traces_cli(work, "show", err["trace_id"])
    by_request = traces_cli(work, "show", err["request_id"])
    by_prefix = traces_cli(work, "show", err["trace_id"][:12])
    assert by_id.returncode == 0, by_id.stderr
    assert by_id.stdout == by_request.stdout == by_prefix.stdout
    assert f"trace {err['trace_id']}" in by_id.stdout
    assert f"request id: {err['request_id']}" in by_id.stdout
    assert "ERROR: FloatingPointError: canary v2" in by_id.stdout
    assert "≡ " in by_id.stdout  # its logs, in place
    assert "request.id = " not in by_id.stdout
    with_attrs = traces_cli(work, "show", err["trace_id"], "--attributes")
    assert f"request.id = {err['request_id']}" in with_attrs.stdout
    assert "ml.model.version = v2" in with_attrs.stdout
    assert "exception.type = FloatingPointError" in with_attrs.stdout
    missing = traces_cli(work, "show", "no-such-request")
    assert missing.returncode == 1 and "no trace with trace id or request id 'no-such-request'" in missing.stderr


def test_traces_tail_prints_traces_written_after_it_started(demo):
    _, work = demo
    lines = (work / "telemetry" / "traces.jsonl").read_text().splitlines()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    tail = subprocess.Popen([sys.executable, "-m", "sidecar", "traces", "tail", "--dir", str(work / "telemetry"),
                             "--interval", "0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert tail.stdout.readline().startswith("TIME (UTC)")  # the header: it has read what was there
        new_id = "f" * 32
        old_id = json.loads(lines[0])["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"]
        with open(work / "telemetry" / "traces.jsonl", "a") as f:
            f.write(lines[0].replace(old_id, new_id) + "\n")
        deadline = time.monotonic() + 30
        line = ""
        while new_id not in line and time.monotonic() < deadline:
            line = tail.stdout.readline()
        assert new_id in line
    finally:
        tail.kill()
        tail.wait()


def test_every_traces_subcommand_has_help_and_version():
    for sub in ([], ["ls"], ["show"], ["tail"]):
        h = _run(["-m", "sidecar", "traces", *sub, "--help"])
        assert h.returncode == 0 and "usage: python -m sidecar traces" in h.stdout
        v = _run(["-m", "sidecar", "traces", *sub, "--version"])
        assert v.returncode == 0 and re.fullmatch(r"otel-sidecar \d+\.\d+\.\d+\S*\n", v.stdout)
    assert _run(["-m", "sidecar", "--version"]).stdout.startswith("otel-sidecar ")


def test_a_taken_port_ends_the_demo_with_one_line_that_points_at_the_log(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _run([str(ROOT / "examples" / "run_demo.py"), "--work-dir", str(tmp_path), "--otlp-grpc-port", str(port)],
                 timeout=120)
    assert r.returncode == 1
    errors = [line for line in r.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stdout
    assert f"127.0.0.1:{port}" in errors[0] and "in use" in errors[0]
    assert errors[0].endswith(f"full log: {tmp_path / 'sidecar.log'}")
    assert "Traceback" not in r.stdout + r.stderr
