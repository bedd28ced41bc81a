"""``python -m sidecar drift``: a reference file from a file exporter's metrics.jsonl, period filters, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sidecar.drift_cli import main
from sidecar.otlp_json import to_json
from sidecar.processors.drift.state import load_reference
from sidecar.signals import Signal
from tests.sidecar.test_drift import App

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_764_662_400 * 10**9  # 2025-12-02T08:00:00Z


def write_period(path: Path) -> None:
    """Three exports an hour apart: 10 values of 1.0, then 20 of 5.0, then 30 of -2.0 (cumulative SDK)."""
    app = App()
    lines = []
    for hour, (n, value) in enumerate(((10, 1.0), (20, 5.0), (30, -2.0))):
        for _ in range(n):
            app.observe("fraud", "3", {"amount": value}, {"country": "de"})
        req = app.export()
        for rm in req.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    for dp in getattr(m, m.WhichOneof("data")).data_points:
                        dp.time_unix_nano = T0 + hour * 3600 * 10**9
        lines.append(to_json(Signal.METRICS, req))
    path.write_text("\n".join(lines) + "\n")


def test_export_whole_file_and_a_period(tmp_path, capsys):
    src = tmp_path / "metrics.jsonl"
    write_period(src)
    out = tmp_path / "ref.json"
    assert main(["export-reference", "--from", str(tmp_path), "--out", str(out), "--as-version", "*"]) == 0
    ref = load_reference(str(out))
    assert ref[("fraud", "*", "amount")].total == 60
    assert ref[("fraud", "*", "country")].categories == {"de": 60}

    # only the second hour: the first export is the baseline of the cumulative series, the third is after it
    assert main(["export-reference", "--from", str(src), "--out", str(out), "--since", "2025-12-02T08:30:00Z",
                 "--until", "2025-12-02T09:30:00Z"]) == 0
    ref = load_reference(str(out))
    amount = ref[("fraud", "3", "amount")]
    assert amount.total == 20 and ref[("fraud", "3", "country")].categories == {"de": 20}
    assert main(["show", str(out)]) == 0
    assert "fraud\t3\tamount\t20\tnumeric" in capsys.readouterr().out


def test_errors_name_what_is_wrong(tmp_path, capsys):
    assert main(["export-reference", "--from", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "r")]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"resourceMetrics": [}\n')
    assert main(["export-reference", "--from", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "metrics.jsonl:1: not an OTLP/JSON metrics request" in capsys.readouterr().err
    src = tmp_path / "m2.jsonl"
    write_period(src)
    assert main(["export-reference", "--from", str(src), "--out", str(tmp_path / "r"), "--model-id", "other"]) == 1
    assert "no ml.drift.* data points matched" in capsys.readouterr().err


def test_the_module_entry_point(tmp_path):
    src = tmp_path / "metrics.jsonl"
    write_period(src)
    out = tmp_path / "ref.json"
    proc = subprocess.run([sys.executable, "-m", "sidecar", "drift", "export-reference", "--from", str(src),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["format"] == "otel-sidecar-drift-reference/1"
