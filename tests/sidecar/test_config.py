"""Config loading: the user-facing contract of YAML paths in every error."""

import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.config import ConfigError, expand_env, parse_config, parse_duration

ROOT = Path(__file__).resolve().parents[2]

MINIMAL = """
receivers:
  otlp:
    protocols:
      grpc: {endpoint: 127.0.0.1:4317}
processors:
  batch: {}
exporters:
  debug: {}
service:
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [debug]
"""


def problems(text: str, environ=None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(text, environ=environ or {})
    return e.value.problems


def test_minimal_config_is_valid():
    cfg = parse_config(MINIMAL, environ={})
    assert list(cfg.service.pipelines) == ["traces"]
    assert cfg.receivers["otlp"].id.type == "otlp"


@pytest.mark.parametrize("path", sorted((ROOT / "collector-config").glob("sidecar*.yaml")))
def test_shipped_configs_are_valid(path):
    parse_config(path.read_text(), environ={})


def test_unknown_key_names_the_yaml_path():
    text = MINIMAL.replace("batch: {}", "batch: {send_batch_sise: 10}")
    assert problems(text) == ["processors.batch.send_batch_sise: unknown key"]


def test_wrong_type_names_the_yaml_path():
    text = MINIMAL.replace("batch: {}", "batch: {timeout: soon}")
    (p,) = problems(text)
    assert p.startswith("processors.batch.timeout: ") and "duration" in p


def test_every_problem_is_listed_at_once():
    text = MINIMAL.replace("batch: {}", "batch: {send_batch_sise: 10}") + "\nbogus: 1\n"
    text = text.replace("exporters: [debug]", "exporters: [debug, otlp/nowhere]")
    found = problems(text)
    assert "bogus: unknown key (expected one of exporters, extensions, processors, receivers, service)" in found
    assert "processors.batch.send_batch_sise: unknown key" in found
    assert any(p.startswith("service.pipelines.traces.exporters[1]: references 'otlp/nowhere'") for p in found)


def test_unknown_component_type():
    text = MINIMAL.replace("debug: {}", "debug: {}\n  kafka: {}")
    (p,) = problems(text)
    assert p.startswith("exporters.kafka: unknown exporter type 'kafka'")


def test_pipeline_without_receivers_or_exporters():
    text = MINIMAL.replace("receivers: [otlp]", "receivers: []").replace("exporters: [debug]", "exporters: []")
    found = problems(text)
    assert "service.pipelines.traces.receivers: a pipeline needs at least one receiver" in found
    assert "service.pipelines.traces.exporters: a pipeline needs at least one exporter" in found


def test_unknown_signal_in_pipeline_id():
    text = MINIMAL.replace("    traces:\n", "    profiles:\n")
    (p,) = problems(text)
    assert p.startswith("service.pipelines.profiles: unknown signal 'profiles'")


def test_dangling_extension_reference():
    text = MINIMAL.replace("service:\n", "service:\n  extensions: [health_check]\n")
    (p,) = problems(text)
    assert p == "service.extensions[0]: references 'health_check', which is not defined under extensions"


def test_processor_reused_in_two_pipelines_of_one_signal():
    text = MINIMAL + """
    traces/2:
      receivers: [otlp]
      processors: [batch]
      exporters: [debug]
"""
    (p,) = problems(text)
    assert p.startswith("service.pipelines.traces/2.processors[0]: processor 'batch' is already used by traces")


def test_env_expansion_with_defaults_and_types():
    found: list[str] = []
    raw = {"a": "${env:PORT}", "b": "${env:MISSING:-fallback}", "c": "x-${HOST}-y", "d": "$$literal",
           "e": ["${env:UNSET}"]}
    out = expand_env(raw, "", found, {"PORT": "4317", "HOST": "h"})
    assert out == {"a": 4317, "b": "fallback", "c": "x-h-y", "d": "$literal", "e": [""]}
    assert found == ["e[0]: environment variable UNSET is not set and has no default (use ${env:UNSET:-default})"]


def test_env_expansion_in_a_config():
    text = MINIMAL.replace("127.0.0.1:4317", "\"${env:GRPC_ENDPOINT:-127.0.0.1:4317}\"")  # quoted inside a flow mapping
    cfg = parse_config(text, environ={"GRPC_ENDPOINT": "127.0.0.1:5317"})
    assert cfg.receivers["otlp"].config.protocols.grpc.endpoint == "127.0.0.1:5317"


@pytest.mark.parametrize("text,seconds", [("5s", 5), ("200ms", 0.2), ("1m", 60), (3, 3), ("1.5h", 5400)])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


def test_not_yaml_and_not_a_mapping():
    assert problems("a: [1, 2")[0].startswith("<config>: not valid YAML")
    assert problems("- 1\n- 2\n") == ["<config>: the top level must be a mapping with receivers, exporters and service"]


def test_validate_command_lists_problems_and_exits_nonzero(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(MINIMAL.replace("batch: {}", "batch: {send_batch_sise: 10}"))
    r = subprocess.run([sys.executable, "-m", "sidecar", "validate", "--config", str(bad)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert "processors.batch.send_batch_sise: unknown key" in r.stderr
    good = tmp_path / "good.yaml"
    good.write_text(MINIMAL)
    r = subprocess.run([sys.executable, "-m", "sidecar", "validate", "--config", str(good)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_a_persistent_queue_must_name_an_enabled_storage_extension():
    text = MINIMAL.replace("debug: {}", "debug: {}\n  otlp: {endpoint: '127.0.0.1:4317', sending_queue: {storage: file_storage}}")
    text = text.replace("exporters: [debug]", "exporters: [debug, otlp]")
    (p,) = problems(text)
    assert p.startswith("exporters.otlp.sending_queue.storage: references extension 'file_storage', which is not enabled")
