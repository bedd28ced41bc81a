"""``RedactionEngine.scan`` runs only the rules that match somewhere in a string; its output must not change.

The reference below is the straightforward definition: every value rule in one regex,
one capture group each, the winning rule found by its group, run from each position
on. The engine instead asks an RE2 set which rules match at all and scans with those
alone (fewer groups, often none). Seeded random texts of every detector's shape, their
near-misses and user rules with groups, anchors and overlapping shapes go through both,
for every action, in value and name mode; outputs and counts must be identical.
"""

from __future__ import annotations

import random

import pytest
import re2

from redaction import DROP, Action, RedactionConfig, RedactionEngine
from tests.redaction.corpus import LOOKALIKES, PII, sentence
from tests.redaction.test_prefilter import SEED, _texts

KEY = {"REDACTION_HMAC_KEY": "k1-test-key"}
UNANCHORED, BOTH = re2._Anchor.UNANCHORED, re2._Anchor.ANCHOR_BOTH  # noqa: SLF001 - the raw API the engine uses

#: User rules that overlap the detectors (digits, ``@``), carry their own groups, anchors and flags.
USER_RULES = [
    {"name": "order", "pattern": r"order[ #]([0-9]{3,})"},
    {"name": "digits", "pattern": r"[0-9]{3}-[0-9]{2}"},
    {"name": "start", "pattern": r"^(?i:ab)c?"},
    {"name": "end", "pattern": r"(x)(y)?z$"},
    {"name": "at", "pattern": r"\w+@\w+"},
    {"name": "word", "pattern": r"\bdead\b"},
]

CONFIGS = {
    "default": {},
    "user rules first": {"blocked_values": USER_RULES},
    "every action": {
        "blocked_values": [dict(r, action=a) for r, a in zip(USER_RULES, ["mask", "replace", "hash", "mask", "drop",
                                                                          "mask"])],
        "detectors": {"email": {"action": "hash"}, "phone": {"action": "replace"}, "ipv4": {"action": "drop"},
                      "jwt": False, "us_ssn": {"replacement": "<ssn>"}},
        "allowed_values": [r"8\.8\.4\.4", r"[a-z]+@example\.com", r"^\d+\.\d+\.\d+\.\d*[02468]$"],
    },
    "one rule": {"detectors": {n: False for n in ("jwt", "bearer_token", "api_key", "iban", "payment_card", "us_ssn",
                                                  "phone", "ipv6", "ipv4")}},
}


def _reference(engine: RedactionEngine, b: bytes, tally: dict, name: bool):
    """Every rule in one regex with capture groups, as the engine scanned before it chose rules per string."""
    rules = engine._value_rules  # noqa: SLF001
    opts = re2.Options()
    opts.log_errors = False
    full = re2.compile("|".join(f"({r.pattern})" for r in rules), opts)._regexp  # noqa: SLF001
    groups, g = [], 1
    for r in rules:
        groups.append((r, g, g + 1 if r.has_core else g))
        g += 1 + r.inner
    allowed = engine._allowed_values  # noqa: SLF001
    n = len(b)
    pos = last = 0
    pieces = None
    while pos < n:
        spans = full.Match(UNANCHORED, b, pos, n)
        if spans[0][0] < 0:
            break
        rule, _, core = next(e for e in groups if spans[e[1]][0] >= 0)
        cs, ce = spans[core]
        if ce <= cs:
            pos = max(spans[0][1], pos + 1)
            continue
        text = b[cs:ce]
        if rule.validator is not None and not rule.validator(text):
            pos = cs + 1
            continue
        if allowed is not None and allowed.Match(BOTH, text, 0, len(text))[0][0] >= 0:
            pos = ce
            continue
        tally[rule.stat] = tally.get(rule.stat, 0) + 1
        pieces = [] if pieces is None else pieces
        if name:
            pieces += [b[last:cs], rule.name_token]
        elif rule.action is Action.DROP:
            return DROP
        elif rule.action is Action.REPLACE:
            return rule.replacement
        else:
            pieces += [b[last:cs], rule.replacement if rule.action is Action.MASK else engine.hash(text).encode()]
        last = pos = ce
    return None if pieces is None else b"".join(pieces) + b[last:]


def _corpus() -> list[bytes]:
    rng = random.Random(SEED + 13)
    extra = ["order #12345 by ab@cd", "abc 123-45 dead xyz", "ABc\nxz", "dead:beef dead", "x" * 3 + "z"]
    texts = _texts(rng, 3000) + [sentence(s) for _, s in PII] + LOOKALIKES + extra
    return [t.encode() for t in texts]


@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
@pytest.mark.parametrize("name", [False, True], ids=["value", "name"])
def test_scan_with_the_rules_that_match_equals_every_rule_in_one_regex(config, name):
    engine = RedactionEngine(RedactionConfig(**CONFIGS[config]), environ=KEY)
    changed = 0
    for b in _corpus():
        want_tally, got_tally = {}, {}
        want = _reference(engine, b, want_tally, name)
        got = engine.scan(b, got_tally, name=name)
        assert (got, got_tally) == (want, want_tally), b
        changed += want is not None
    assert changed > 1000 if config != "one rule" else changed > 100  # the corpus exercises the rules


def test_a_set_that_answers_none_falls_back_to_every_rule():
    """RE2's set also answers "no rule" when its DFA runs out of memory: that must not pass a secret."""
    engine = RedactionEngine(RedactionConfig(), environ=KEY)

    class _OutOfMemory:
        def Match(self, text):  # noqa: N802 - RE2's name
            return []

    engine._which = _OutOfMemory()  # noqa: SLF001
    for b in _corpus()[:500]:
        want_tally, got_tally = {}, {}
        assert (engine.scan(b, got_tally), got_tally) == (_reference(engine, b, want_tally, False), want_tally)
    assert engine.redact_text("mail jane@example.com") == "mail [EMAIL]"
