"""The rule engine on plain strings and mappings: detectors, actions, key rules, hashing, config errors."""

from __future__ import annotations

import time

import pytest

from redaction import (
    DETECTOR_NAMES,
    DROP,
    RedactionConfig,
    RedactionConfigError,
    RedactionEngine,
    load_redaction_config,
)
from redaction.values import redact_roots
from tests.redaction.corpus import LOOKALIKES, PII, PREFIX, SUFFIX, secret_core, sentence

KEY = {"REDACTION_HMAC_KEY": "k1-test-key"}


@pytest.fixture(scope="module")
def engine() -> RedactionEngine:
    return RedactionEngine()


@pytest.mark.parametrize(("detector", "secret"), PII, ids=[f"{d}:{s[:18]}" for d, s in PII])
def test_every_detector_masks_only_the_secret(engine, detector, secret):
    before = engine.stats.get(detector, "mask")
    out = engine.redact_text(sentence(secret))
    assert secret_core(secret) not in out
    assert out.startswith(PREFIX + " ") and out.endswith(" " + SUFFIX)
    assert engine.stats.get(detector, "mask") == before + 1


def test_mask_keeps_surrounding_text(engine):
    assert engine.redact_text("classify the photo sent by bob@example.com please") == \
        "classify the photo sent by [EMAIL] please"


def test_several_secrets_in_one_value(engine):
    text = " ".join(sentence(s) for _, s in PII)
    out = engine.redact_text(text)
    for _, secret in PII:
        assert secret_core(secret) not in out
    assert out.count(PREFIX) == len(PII)


@pytest.mark.parametrize("text", LOOKALIKES)
def test_lookalikes_are_left_alone(engine, text):
    assert engine.redact_text(text) is text


def test_four_part_dotted_quad_is_treated_as_an_address(engine):
    # documented decision: 1.2.3.4 cannot be told from an address; semver never matches
    assert engine.redact_text("1.2.3.4") == "[IP]"
    assert engine.redact_text("2.13.0") == "2.13.0"


def test_detectors_switch_off_by_name():
    eng = RedactionEngine(RedactionConfig(detectors={"email": False, "ipv4": {"enabled": False}}))
    assert eng.redact_text("bob@example.com from 10.0.0.1") == "bob@example.com from 10.0.0.1"
    assert eng.redact_text("ssn 123-45-6789") == "ssn [SSN]"


def test_actions_replace_drop_and_custom_replacement():
    eng = RedactionEngine(RedactionConfig(detectors={
        "email": {"action": "replace", "replacement": "<email removed>"},
        "us_ssn": {"action": "drop"},
        "phone": {"replacement": "<tel>"},
    }))
    assert eng.redact_text("write to bob@example.com today") == "<email removed>"
    assert eng.redact_text("ssn 123-45-6789") is DROP
    assert eng.redact_text("call 555-867-5309 now") == "call <tel> now"


def test_blocked_values_and_allowed_values():
    eng = RedactionEngine(RedactionConfig(
        blocked_values=["patient-[0-9]{6}", {"name": "internal_host", "pattern": r"[a-z0-9-]+\.corp\.internal"}],
        allowed_values=[r".+@example\.org"],
    ))
    out = eng.redact_text("patient-123456 at db-1.corp.internal mailed ops@example.org and eve@evil.com")
    assert out == "[REDACTED] at [REDACTED] mailed ops@example.org and [EMAIL]"
    assert eng.stats.get("blocked_values[0]", "mask") == 1
    assert eng.stats.get("internal_host", "mask") == 1


def test_hash_is_stable_across_instances_and_differs_by_key():
    cfg = RedactionConfig(detectors={"email": {"action": "hash"}})
    a = RedactionEngine(cfg, environ=KEY).redact_text("user jane@example.com")
    b = RedactionEngine(cfg, environ=dict(KEY)).redact_text("user jane@example.com")
    c = RedactionEngine(cfg, environ={"REDACTION_HMAC_KEY": "another-key"}).redact_text("user jane@example.com")
    assert a == b and a != c
    digest = a.split(" ", 1)[1]
    assert len(digest) == 64 and int(digest, 16) >= 0 and "jane" not in a
    # a known vector: HMAC-SHA256(key, message), hex
    import hashlib
    import hmac
    assert digest == hmac.new(b"k1-test-key", b"jane@example.com", hashlib.sha256).hexdigest()


def test_hash_without_key_fails_start_up():
    cfg = RedactionConfig(blocked_key_patterns=[{"name": "user", "pattern": "^user\\.id$", "action": "hash"}])
    with pytest.raises(RedactionConfigError) as e:
        RedactionEngine(cfg, environ={})
    assert "REDACTION_HMAC_KEY" in str(e.value) and "user" in str(e.value)
    RedactionEngine(RedactionConfig(), environ={})  # no rule hashes: no key needed


def test_key_rules_builtin_and_actions():
    eng = RedactionEngine(RedactionConfig(blocked_key_patterns=[
        {"name": "user_id", "pattern": "^user\\.id$", "action": "hash"},
        {"pattern": "^x-internal$", "action": "drop"},
    ]), environ=KEY)
    attrs = {
        "http.request.header.authorization": "Basic dXNlcjpwYXNz", "db.password": "hunter2",
        "access_token": "opaque", "x-api-key": "k", "session.id": "s-1", "cookie": "a=b",
        "user.id": "u-42", "x-internal": "yes",
        "gen_ai.usage.input_tokens": 512, "token_count": 3, "ml.model.id": "resnet50",
    }
    out = redact_roots(eng, [attrs], [None], {})
    new = out.roots[0]
    for k in ("http.request.header.authorization", "db.password", "access_token", "x-api-key", "session.id", "cookie"):
        assert new[k] == "[REDACTED]", k
    assert new["user.id"] == eng.hash(b"u-42") and len(new["user.id"]) == 64
    assert "x-internal" not in new
    assert new["gen_ai.usage.input_tokens"] == 512 and new["token_count"] == 3 and new["ml.model.id"] == "resnet50"
    assert sorted(out.dropped) == ["x-internal"]
    assert attrs["db.password"] == "hunter2"  # the input is never mutated


def test_allowlist_mode_and_ignored_keys():
    eng = RedactionEngine(RedactionConfig(allow_all_keys=False, allowed_keys=["ml.model.id", "note"],
                                          ignored_keys=["debug.raw"]))
    tally: dict = {}
    out = redact_roots(eng, [{"ml.model.id": "m", "note": "mail bob@example.com", "other": "x",
                              "debug.raw": "bob@example.com"}], [None], tally)
    assert out.roots[0] == {"ml.model.id": "m", "note": "mail [EMAIL]", "debug.raw": "bob@example.com"}
    assert tally == {("allowed_keys", "drop"): 1, ("email", "mask"): 1}


def test_nested_bodies_and_sequences():
    eng = RedactionEngine()
    body = {"msg": "from 10.1.2.3", "user": {"email": "a@b.io", "password": "p"}, "tags": ["ok", "bob@x.io"],
            "n": 1, "raw": b"bob@x.io"}
    out = redact_roots(eng, [None, body], [None, "body"], {})
    assert out.roots[1] == {"msg": "from [IP]", "user": {"email": "[EMAIL]", "password": "[REDACTED]"},
                            "tags": ["ok", "[EMAIL]"], "n": 1, "raw": b"bob@x.io"}
    assert redact_roots(eng, [{"a": "clean"}, "clean body"], [None, "body"], {}) is None


def test_catastrophic_pattern_runs_in_linear_time():
    eng = RedactionEngine(RedactionConfig(blocked_values=["(a+)+$"], detectors={n: False for n in DETECTOR_NAMES}))
    hostile = "a" * 100_000 + "!"
    t0 = time.perf_counter()
    assert eng.redact_text(hostile) is hostile  # no match: the '!' defeats the anchor
    assert eng.redact_text("a" * 100_000) == "[REDACTED]"
    assert time.perf_counter() - t0 < 2.0  # generous: a backtracking engine would not finish at all


def test_config_errors_name_rule_and_yaml_path(tmp_path):
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        "processors:\n"
        "  redaction:\n"
        "    blocked_values: ['ok', '(foo']\n"
        "    blocked_key_patterns: [{name: bad_key, pattern: '[a'}]\n"
        "    allowed_values: ['(?<=x)y']\n"
        "    detectors: {emial: true, phone: {action: scramble}}\n"
        "    summary: loud\n")
    with pytest.raises(RedactionConfigError) as e:
        load_redaction_config(path)
    problems = e.value.problems
    assert "processors.redaction.blocked_values[1]: invalid regex '(foo': missing )" in problems
    assert "processors.redaction.blocked_key_patterns[0]: rule 'bad_key': invalid regex '[a': missing ]" in problems
    assert any(p.startswith("processors.redaction.allowed_values[0]: invalid regex '(?<=x)y'") for p in problems)
    assert "processors.redaction.detectors.emial: unknown key" in problems
    assert any(p.startswith("processors.redaction.detectors.phone.action:") for p in problems)
    assert any(p.startswith("processors.redaction.summary:") for p in problems)


def test_load_config_from_section_dict_and_code(tmp_path):
    section = tmp_path / "redaction.yaml"
    section.write_text("detectors: {email: false}\nsummary: debug\n")
    assert load_redaction_config(section).detectors.email.enabled is False
    assert load_redaction_config({"summary": "silent"}).summary == "silent"
    cfg = RedactionConfig(summary="debug")
    assert load_redaction_config(cfg) is cfg
    with pytest.raises(RedactionConfigError, match="matches the empty string"):
        load_redaction_config({"blocked_values": ["x*"]})


def test_batch_prefilter_never_misses_a_value(engine):
    # candidates() must flag every value that scan() would change, wherever it sits in the batch
    values = [t for t in LOOKALIKES] + [sentence(s) for _, s in PII] + ["1.2.3.4", "x", "555-867-5309"]
    bufs = [v.encode() for v in values]
    flagged = set(engine.candidates(bufs))
    for i, b in enumerate(bufs):
        if engine.scan(b, {}) is not None:
            assert i in flagged, values[i]


def test_anchored_user_patterns_still_match_every_value():
    eng = RedactionEngine(RedactionConfig(blocked_values=[r"^secret-\d+$", r"\Atop-\w+\z"]))
    out = redact_roots(eng, [{"a": "x", "b": "secret-42", "c": "top-level", "d": "no secret-42"}], [None], {})
    assert out.roots[0] == {"a": "x", "b": "[REDACTED]", "c": "[REDACTED]", "d": "no secret-42"}


def test_genai_latency_keys_are_measurements_not_tokens():
    """``gen_ai.server.time_to_first_token`` ends in "token" but holds a latency: it stays readable."""
    from redaction import RedactionConfig, RedactionEngine
    from redaction._engine import SCAN

    engine = RedactionEngine(RedactionConfig())
    assert engine.key_action("gen_ai.server.time_to_first_token") is SCAN
    assert engine.key_action("gen_ai.server.time_per_output_token") is SCAN
    assert engine.key_action("access_token") is not SCAN
    assert engine.key_action("x-auth-token") is not SCAN
