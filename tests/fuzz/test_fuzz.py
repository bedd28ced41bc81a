"""A short fuzz run in CI: hostile OTLP over real sockets never crashes, hangs, gets a 5xx or fails a stage.

The same harness runs long from the command line (``python -m tests.fuzz.harness --inputs 1000000``).
The suite runs once per scanner path, so this covers the C scanner and SIDECAR_PURE_PYTHON=1.
"""

from __future__ import annotations

import os

import pytest

from tests.fuzz.harness import run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_hostile_otlp_gets_clear_answers(tmp_path):
    pure = os.environ.get("SIDECAR_PURE_PYTHON", "") in ("1", "true", "yes")
    report = run(3000, pure, seed=7, clients=1, workdir=tmp_path)
    findings = "\n".join(" ".join(map(str, f)) for f in report.kept)
    assert report.inputs == 3000
    assert (report.crashes, report.hangs, report.server_errors, report.redaction_errors, report.pipeline_errors) \
        == (0, 0, 0, 0, 0), findings
    # the answers are the documented ones: most hostile input is rejected as invalid, some is accepted
    assert report.outcomes["grpc:INVALID_ARGUMENT"] + report.outcomes["http:400"] > 1000
    assert report.outcomes["grpc:OK"] + report.outcomes["http:200"] > 100
    assert report.peak_rss_mib < 400, "the shipped memory_limiter's hard limit"
