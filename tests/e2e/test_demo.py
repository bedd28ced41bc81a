"""The main job keeps working: the demo runs the default config end to end and finds no leak."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(240)]


def test_demo_keeps_errors_slow_and_forced_requests_and_forwards_no_pii():
    r = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "examples" / "run_demo.py")],
                       capture_output=True, text=True, cwd=ROOT, timeout=200)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "errors 8/8, slow 4/4, forced 5/5" in out
    assert "PII strings in everything forwarded: 0" in out
    assert "8 errors — the true totals" in out
