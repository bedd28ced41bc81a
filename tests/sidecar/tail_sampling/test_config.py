"""tail_sampling config: the recommended section parses, and every mistake is reported on its YAML path."""

from __future__ import annotations

import pytest

from sidecar.config import ConfigError, parse_config
from sidecar.processors.tail_sampling.config import TailSamplingConfig

PIPELINES = """
receivers:
  otlp:
    protocols:
      grpc: {endpoint: 127.0.0.1:4317}
exporters:
  debug: {}
service:
  pipelines:
    traces:
      receivers: [otlp]
      processors: [tail_sampling]
      exporters: [debug]
    logs:
      receivers: [otlp]
      processors: [tail_sampling]
      exporters: [debug]
"""

RECOMMENDED = """
processors:
  tail_sampling:
    decision_wait: 10s
    decision_wait_after_root_received: 1s
    num_traces: 50000
    max_buffered_bytes: 134217728
    decision_cache: {sampled_cache_size: 100000, non_sampled_cache_size: 100000}
    logs:
      always_keep_severity_at_least: 17
      without_trace_sampling_percentage: 100
    policies:
      - {name: errors, type: status_code, status_code: {status_codes: [ERROR]}}
      - {name: slow, type: latency, latency: {threshold_ms: 2000, upper_threshold_ms: 0}}
      - {name: debug, type: boolean_attribute, boolean_attribute: {key: sampling.force_keep, value: true}}
      - {name: rest, type: probabilistic, probabilistic: {sampling_percentage: 10}}
"""


def problems(processors_yaml: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(processors_yaml + PIPELINES, environ={})
    return e.value.problems


def with_policies(*lines: str) -> str:
    return "processors:\n  tail_sampling:\n    policies:\n" + "".join(f"      - {ln}\n" for ln in lines)


def test_recommended_section_parses_in_a_traces_and_a_logs_pipeline():
    cfg = parse_config(RECOMMENDED + PIPELINES, environ={})
    ts = cfg.processors["tail_sampling"].config
    assert isinstance(ts, TailSamplingConfig)
    assert ts.decision_wait == 10.0 and ts.decision_wait_after_root_received == 1.0
    assert [p.type for p in ts.policies] == ["status_code", "latency", "boolean_attribute", "probabilistic"]
    assert ts.policies[3].section().sampling_percentage == 10


def test_error_names_the_policy_index_and_key():
    text = with_policies(
        "{name: a, type: always_sample}",
        "{name: b, type: status_code, status_code: {status_codes: [ERROR]}}",
        "{name: c, type: latency, latency: {threshold_ms: 0}}",
    )
    assert problems(text) == ["processors.tail_sampling.policies[2].latency.threshold_ms: must be > 0"]


def test_nested_key_must_match_the_type():
    (p,) = problems(with_policies("{name: a, type: latency, status_code: {status_codes: [ERROR]}}"))
    assert p.startswith("processors.tail_sampling.policies[0]: ")
    assert "'latency'" in p and "'status_code'" in p


def test_missing_nested_section_is_named():
    (p,) = problems(with_policies("{name: a, type: probabilistic}"))
    assert p == ("processors.tail_sampling.policies[0]: type 'probabilistic' needs its settings under the key "
                 "'probabilistic'")


def test_unknown_type_and_unknown_key():
    out = problems(with_policies("{name: a, type: sometimes}",
                                 "{name: b, type: probabilistic, probabilistic: {sampling_percentag: 5}}"))
    assert any(p.startswith("processors.tail_sampling.policies[0].type: ") for p in out)
    assert "processors.tail_sampling.policies[1].probabilistic.sampling_percentag: unknown key" in out


def test_sub_policy_errors_have_their_full_path():
    text = with_policies(
        "{name: a, type: and, and: {and_sub_policy: [{name: x, type: always_sample},"
        " {name: y, type: probabilistic, probabilistic: {sampling_percentage: 150}}]}}")
    assert problems(text) == [
        "processors.tail_sampling.policies[0].and.and_sub_policy[1].probabilistic.sampling_percentage: "
        "must be between 0 and 100"]


def test_invalid_regex_fails_at_load():
    (p,) = problems(with_policies(
        "{name: a, type: string_attribute, string_attribute: {key: k, values: ['(unclosed'],"
        " enabled_regex_matching: true}}"))
    assert p == "processors.tail_sampling.policies[0].string_attribute: values[0]: invalid regex '(unclosed': missing )"


def test_composite_references_must_exist():
    (p,) = problems(with_policies(
        "{name: c, type: composite, composite: {max_total_spans_per_second: 100, policy_order: [x, nope],"
        " composite_sub_policy: [{name: x, type: always_sample}], rate_allocation: [{policy: x, percent: 50}]}}"))
    assert p.startswith("processors.tail_sampling.policies[0].composite: ") and "'nope'" in p


def test_duplicate_policy_names_and_empty_policies():
    (p,) = problems(with_policies("{name: a, type: always_sample}", "{name: a, type: always_sample}"))
    assert p.startswith("processors.tail_sampling.policies: ") and "'a'" in p
    (p,) = problems("processors:\n  tail_sampling:\n    policies: []\n")
    assert p == "processors.tail_sampling.policies: must list at least one policy"


def test_adaptive_bounds_are_checked():
    (p,) = problems(with_policies(
        "{name: a, type: adaptive, adaptive: {target_traces_per_second: 5, min_sampling_percentage: 50,"
        " max_sampling_percentage: 10}}"))
    assert p.startswith("processors.tail_sampling.policies[0].adaptive: ") and "min_sampling_percentage" in p


def test_output_limits_are_config_and_checked():
    base = with_policies("{name: a, type: always_sample}")
    cfg = parse_config(base + "    output: {backpressure_items: 10, max_items: 20}\n" + PIPELINES, environ={})
    out = cfg.processors["tail_sampling"].config.output
    assert (out.backpressure_items, out.max_items) == (10, 20)
    (p,) = problems(base + "    output: {backpressure_items: 30, max_items: 20}\n")
    assert p.startswith("processors.tail_sampling.output") and "max_items (20) must be >= backpressure_items (30)" in p
    (p,) = problems(base + "    output: {max_itms: 5}\n")
    assert p == "processors.tail_sampling.output.max_itms: unknown key"
