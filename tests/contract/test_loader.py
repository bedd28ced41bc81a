"""The config core: otelcol's env expansion, YAML paths and lines in errors, unknown keys rejected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field, ValidationError

from contract.config import ConfigError, ConfigModel, Duration, YamlFile, expand_env, format_problems
from sidecar.config import load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]

SIDECAR = """\
receivers:
  otlp:
    protocols:
      http: {endpoint: 127.0.0.1:4318}
processors:
  batch: {}
exporters:
  otlphttp:
    endpoint: http://127.0.0.1:9
    headers: {x-mlflow-experiment-id: "${env:ID}"}
service:
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [otlphttp]
"""


class Section(ConfigModel):
    name: str = ""
    port: int = 0
    ratio: float = 0.0
    enabled: bool = False
    timeout: Duration = 1.0
    headers: dict[str, str] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)
    anything: object = None


def load(text: str, environ: dict[str, str]) -> Section:
    doc = YamlFile(text, "t.yaml")
    body = doc.value(environ=environ)
    assert doc.problems == []
    try:
        return Section.model_validate(body)
    except ValidationError as e:
        raise doc.error(format_problems(e)) from None


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


# --- env expansion -------------------------------------------------------------------------------


@pytest.mark.parametrize("text,environ,expected", [
    ("name: ${env:N}", {"N": "a"}, "a"),
    ("name: ${N}", {"N": "a"}, "a"),                                  # the bare form otelcol still reads
    ("name: ${env:N:-fallback}", {}, "fallback"),
    ("name: ${env:N:-fallback}", {"N": ""}, ""),                      # set but empty is set
    ("name: x-${env:N}-y", {"N": "a"}, "x-a-y"),                      # inside a longer string
    ("name: $${env:N}", {"N": "a"}, "${env:N}"),                      # $$ escapes
    ("name: 'cost: $$5'", {}, "cost: $5"),
])
def test_references_expand_like_otelcol(text, environ, expected):
    assert load(text, environ).name == expected


def test_a_quoted_reference_stays_a_string():
    for text, value in (('id: "${env:ID}"', "0"), ("id: '${env:ID}'", "true"), ('id: "${env:ID}"', "[x]")):
        got = load(text.replace("id:", "anything:"), {"ID": value}).anything
        assert got == value and type(got) is str


def test_a_whole_unquoted_reference_takes_the_values_yaml_type():
    s = load("port: ${env:P}\nratio: ${env:R}\nenabled: ${env:B}\ntags: ${env:L}\nanything: ${env:A}",
             {"P": "4317", "R": "0.5", "B": "true", "L": "[x, y]", "A": "{k: 1}"})
    assert (s.port, s.ratio, s.enabled, s.tags, s.anything) == (4317, 0.5, True, ["x", "y"], {"k": 1})


def test_what_yaml_would_read_as_a_list_or_bool_stays_text_in_a_string_field():
    # ORDER_MASK unset: the default "[ORDER]" is a YAML list, yet the field wants the text
    s = load("name: ${env:ORDER_MASK:-[ORDER]}\nheaders:\n  flag: ${env:YES}\n  nothing: ${env:NULL}",
             {"YES": "yes", "NULL": "null"})
    assert s.name == "[ORDER]" and s.headers == {"flag": "yes", "nothing": "null"}


def test_a_string_field_gets_the_variables_text_even_unquoted():
    # otelcol keeps the original text for string fields: ID=007 stays "007", not 7
    s = load("name: ${env:ID}\nheaders:\n  h: ${env:ID}\ntags:\n  - ${env:ID}\nport: ${env:ID}\nanything: ${env:ID}",
             {"ID": "007"})
    assert (s.name, s.headers, s.tags) == ("007", {"h": "007"}, ["007"])
    assert s.port == 7 and s.anything == 7


def test_typed_fields_accept_quoted_references():
    s = load('port: "${env:P}"\nratio: "${env:R}"\nenabled: "${env:B}"\ntimeout: "${env:T}"',
             {"P": "4317", "R": "0.25", "B": "true", "T": "200ms"})
    assert (s.port, s.ratio, s.enabled, s.timeout) == (4317, 0.25, True, 0.2)


def test_quoted_id_zero_header_starts_the_sidecar(tmp_path):
    cfg = parse_config(SIDECAR, environ={"ID": "0"})
    assert cfg.exporters["otlphttp"].config.headers == {"x-mlflow-experiment-id": "0"}
    # unquoted (block style: in a {flow} mapping YAML itself needs the quotes)
    block = SIDECAR.replace('{x-mlflow-experiment-id: "${env:ID}"}', "\n      x-mlflow-experiment-id: ${env:ID}")
    unquoted = parse_config(block, environ={"ID": "0"})
    assert unquoted.exporters["otlphttp"].config.headers == {"x-mlflow-experiment-id": "0"}
    path = tmp_path / "sidecar.yaml"
    path.write_text(SIDECAR)
    r = subprocess.run([sys.executable, "-m", "sidecar", "validate", "--config", str(path)],
                       capture_output=True, text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "ID": "0"})
    assert r.returncode == 0, r.stderr


def test_an_unset_variable_names_the_path_and_line(tmp_path):
    path = tmp_path / "sidecar.yaml"
    path.write_text(SIDECAR)
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={})
    p = "exporters.otlphttp.headers.x-mlflow-experiment-id: environment variable ID is not set and has no default"
    assert [x.split(" (use")[0] for x in e.value.problems] == [p]
    assert e.value.located[0].startswith(f"{path}:{line_of(SIDECAR, 'x-mlflow')}: {p}")


def test_an_unsupported_provider_is_an_error_not_a_literal():
    doc = YamlFile("a: ${file:/etc/passwd}")
    doc.value(environ={})
    assert doc.problems and doc.problems[0].startswith("a: unsupported reference '${file:/etc/passwd}'")


# --- errors: YAML path, file:line ----------------------------------------------------------------


def test_unknown_key_is_rejected_with_its_path_and_line(tmp_path):
    text = SIDECAR.replace("batch: {}", "batch:\n    send_batch_sise: 10")
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={"ID": "1"})
    assert e.value.problems == ["processors.batch.send_batch_sise: unknown key"]
    line = line_of(text, "send_batch_sise")
    assert e.value.located == [f"{path}:{line}: processors.batch.send_batch_sise: unknown key"]
    assert f"{path}:{line_of(text, 'send_batch_sise')}: processors.batch.send_batch_sise" in str(e.value)


def test_a_problem_inside_a_list_points_at_the_item():
    text = "name: a\ntags:\n  - x\n  - [nested]\n"
    with pytest.raises(ConfigError) as e:
        load(text, {})
    (p,) = e.value.located
    assert p.startswith("t.yaml:4: tags[1]: ")


def test_a_missing_key_points_at_the_enclosing_mapping():
    doc = YamlFile("a:\n  b:\n    c: 1\n", "f.yaml")
    doc.value()
    assert doc.locate("a.b.d: field required") == "f.yaml:2"


def test_duplicate_keys_are_errors():
    doc = YamlFile("a: 1\nb: 2\na: 3\n")
    assert doc.value() == {"a": 1, "b": 2}
    assert doc.problems == ["a: duplicate key (first on line 1)"]


def test_syntax_error_carries_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("a: 1\nb: 2\n  c: 3\nd: 4\n")
    with pytest.raises(ConfigError) as e:
        YamlFile.read(path)
    (p,) = e.value.problems
    assert p.startswith(f"{path}: not valid YAML: line 3, column ") and "<unicode string>" not in p


def test_validate_command_prints_file_and_line(tmp_path):
    text = SIDECAR.replace("batch: {}", "batch: {timeout: soon}")
    path = tmp_path / "c.yaml"
    path.write_text(text)
    r = subprocess.run([sys.executable, "-m", "sidecar", "validate", "--config", str(path)],
                       capture_output=True, text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "ID": "1"})
    assert r.returncode == 2
    assert f"{path}:{line_of(text, 'soon')}: processors.batch.timeout: expected a duration" in r.stderr


def test_merge_keys_and_anchors_are_read():
    doc = YamlFile("base: &b {name: x, port: 1}\nsection:\n  <<: *b\n  port: 2\n")
    assert doc.value("section") == {"name": "x", "port": 2}


def test_a_value_read_from_the_environment_survives_copy_and_pickle():
    import copy
    import pickle

    value = YamlFile("a: ${env:N}").value(environ={"N": "007"})["a"]
    for clone in (copy.deepcopy(value), pickle.loads(pickle.dumps(value))):
        assert Section(name=clone, port=clone).model_dump(include={"name", "port"}) == {"name": "007", "port": 7}


def test_sections_from_one_reference_and_python_data_are_typed():
    found: list[str] = []
    assert expand_env({"a": "${env:P}", "b": ["${env:L}"]}, "", found, {"P": "1", "L": "[x]"}) == {"a": 1, "b": [["x"]]}
    text = SIDECAR.replace("batch: {}", "batch: ${env:BATCH}")
    cfg = parse_config(text, environ={"ID": "1", "BATCH": "{timeout: 2s}"})
    assert cfg.processors["batch"].config.timeout == 2.0


def test_a_key_yaml_reads_as_a_boolean_is_named_in_the_error():
    with pytest.raises(ConfigError) as e:
        load("headers:\n  on: x\n", {})  # YAML 1.1 reads `on` as true
    assert e.value.located == ["t.yaml:2: headers.True: Input should be a valid string "
                               "(YAML read True; quote the value to keep it text)"]
