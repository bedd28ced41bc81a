"""The app and the sidecar read one file the same way: a rule written with ${env:…} redacts in both."""

from __future__ import annotations

import pytest

from instrumentation.redaction import make_engine
from redaction import RedactionConfigError, RedactionEngine, load_redaction_config
from sidecar.config import ConfigError, load_config

SHARED = """\
receivers:
  otlp:
    protocols:
      http: {endpoint: 127.0.0.1:4318}
processors:
  redaction:
    blocked_values:
      - {name: order_id, pattern: "${env:ORDER_ID_PATTERN}", replacement: "${env:ORDER_MASK:-[ORDER]}"}
      - name: ticket
        pattern: 'TCK-\\d+'
        replacement: ${env:TICKET_MASK}
    summary: ${env:REDACTION_SUMMARY:-silent}
exporters:
  otlphttp:
    endpoint: http://127.0.0.1:9
    headers: {authorization: "Bearer ${env:BACKEND_TOKEN}"}
service:
  pipelines:
    traces:
      receivers: [otlp]
      processors: [redaction]
      exporters: [otlphttp]
"""

ENV = {"ORDER_ID_PATTERN": r"ORD-\d{4}", "TICKET_MASK": "0", "BACKEND_TOKEN": "t0ken"}
TEXT = "refund ORD-1234 for ticket TCK-99 to bob@example.com"


@pytest.fixture
def shared_file(tmp_path):
    path = tmp_path / "sidecar.yaml"
    path.write_text(SHARED)
    return path


def test_the_app_and_the_sidecar_see_identical_rules(shared_file):
    sidecar_rules = load_config(shared_file, environ=ENV).processors["redaction"].config
    app_rules = load_redaction_config(shared_file, environ=ENV)
    assert app_rules == sidecar_rules
    assert [r.pattern for r in app_rules.blocked_values] == [r"ORD-\d{4}", r"TCK-\d+"]
    assert [r.replacement for r in app_rules.blocked_values] == ["[ORDER]", "0"]  # TICKET_MASK=0 stays text
    expected = "refund [ORDER] for ticket 0 to [EMAIL]"
    assert RedactionEngine(sidecar_rules).redact_text(TEXT) == expected
    assert RedactionEngine(app_rules).redact_text(TEXT) == expected


def test_the_apps_engine_reads_the_process_environment(shared_file, monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("ORDER_MASK", raising=False)
    assert make_engine(str(shared_file)).redact_text(TEXT) == "refund [ORDER] for ticket 0 to [EMAIL]"


def test_the_app_needs_only_the_redaction_sections_variables(shared_file):
    """The app's container lacks the exporter's secret; that is the sidecar's business, not the app's."""
    env = {k: v for k, v in ENV.items() if k != "BACKEND_TOKEN"}
    assert load_redaction_config(shared_file, environ=env).blocked_values[0].pattern == r"ORD-\d{4}"
    with pytest.raises(ConfigError) as e:
        load_config(shared_file, environ=env)
    assert e.value.problems[0].startswith("exporters.otlphttp.headers.authorization: "
                                          "environment variable BACKEND_TOKEN")


def test_both_sides_fail_alike_on_a_missing_rule_variable(shared_file):
    env = {k: v for k, v in ENV.items() if k != "ORDER_ID_PATTERN"}
    with pytest.raises(RedactionConfigError) as app:
        load_redaction_config(shared_file, environ=env)
    with pytest.raises(ConfigError) as sidecar:
        load_config(shared_file, environ=env)
    assert app.value.located == sidecar.value.located
    p = app.value.located[0]
    assert p.startswith(f"{shared_file}:8: processors.redaction.blocked_values[0].pattern: environment variable "
                        "ORDER_ID_PATTERN is not set")


def test_a_bad_rule_names_path_and_line_in_the_app(shared_file):
    env = {**ENV, "ORDER_ID_PATTERN": "(unclosed"}
    with pytest.raises(RedactionConfigError) as e:
        load_redaction_config(shared_file, environ=env)
    (p,) = e.value.located
    assert p.startswith(f"{shared_file}:8: processors.redaction.blocked_values[0]")
    assert "invalid regex '(unclosed'" in p


def test_an_unknown_key_in_the_section_names_path_and_line_on_both_sides(tmp_path):
    text = SHARED.replace("    summary:", "    detectors: {emial: false}\n    summary:")
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)
    line = next(i for i, x in enumerate(text.splitlines(), 1) if "emial" in x)
    expected = [f"{path}:{line}: processors.redaction.detectors.emial: unknown key"]
    with pytest.raises(RedactionConfigError) as app:
        load_redaction_config(path, environ=ENV)
    with pytest.raises(ConfigError) as sidecar:
        load_config(path, environ=ENV)
    assert app.value.located == sidecar.value.located == expected
