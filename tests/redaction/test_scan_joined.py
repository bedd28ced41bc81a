"""Scanning a request's texts joined must answer exactly what scanning each text alone answers.

``RedactionEngine.scan_joined`` runs the value rules once over every text of a request joined
with newlines (one RE2 call per match, not about three per text). Where a join could read a
text differently (``^``/``$`` at a text's ends, a match that runs on into the next text, a
newline inside a text, a match that starts on the newline before a text) it must fall back to
the text alone. These tests hold it to ``scan`` of each text, with its counts, on generated
secrets and near-misses glued by newlines, and on rules written to trip the join.
"""

from __future__ import annotations

import random

import pytest

from redaction import DROP, RedactionConfig, RedactionEngine
from tests.redaction.test_prefilter import SEED, _texts

HMAC_ENV = {"REDACTION_HMAC_KEY": "test-key"}

#: texts that sit differently in a join than alone
EDGES = [
    "(415) 555-0132", "10.1.2.3", "call (415) 555-0132", "(415) 555-0132 is mine", "+1 415 555 0132",
    "first line\ncall (415) 555-0132", "a@b.co\nz@y.io", "10.1.2.3\n", "\n10.1.2.3", "", "\n", "\n\n",
    "LINE7", "LINE7\nLINE8", "x LINE7", "SPACED9 lead", "a SPACED9", "TAIL42", "TAIL42   ", "PAIR", "END",
    "PAIR END", "x PAIR", "x TIE12 y", "TIE345", "DROPME1 and a@b.co",
    "a@b.co then SECRET-XY", "HASHME-3 a@b.co HASHME-4", "ok.allowed@example.com", "bob@example.com",
    "fe80::1", "::1", "4111 1111 1111 1111", "4111 1111 1111 1112", "ünïcode a@b.co ✓", "sk-proj-Ab3dEf6hIj9kLm2nOp5q",
]

CONFIGS = {
    "default": {},
    "actions": {"detectors": {"phone": {"action": "drop"}, "ipv4": {"action": "hash"},
                              "email": {"action": "replace", "replacement": "<e>"}}},
    # user rules written to trip a join: line anchors, a leading \s the newline before a text satisfies,
    # a trailing \s* that runs into the next text, and drop / replace / hash actions
    "tricky": {"blocked_values": [{"name": "line", "pattern": "^LINE[0-9]+$", "action": "replace",
                                   "replacement": "<line>"},
                                  {"name": "spaced", "pattern": "\\sSPACED[0-9]"},
                                  {"name": "tail", "pattern": "TAIL[0-9]+\\s*"},
                                  {"name": "pair", "pattern": "PAIR\\s*END"},
                                  # two rules matching at one place: the first one's match wins, as in one regex
                                  {"name": "tie", "pattern": "TIE[0-9]"},
                                  {"name": "tie_long", "pattern": "TIE[0-9]+", "action": "drop"},
                                  {"name": "dropme", "pattern": "DROPME[0-9]+", "action": "drop"},
                                  {"name": "secret", "pattern": "SECRET-[A-Z]+", "action": "replace",
                                   "replacement": "<s>"},
                                  {"name": "hashme", "pattern": "HASHME-[0-9]+", "action": "hash"}]},
    "one rule": {"detectors": {name: name == "phone" for name in (
        "jwt", "bearer_token", "api_key", "email", "iban", "payment_card", "us_ssn", "phone", "ipv6", "ipv4")}},
    "allowed values": {"allowed_values": ["[a-z]+\\.allowed@example\\.com"]},
}


def engine(name: str) -> RedactionEngine:
    return RedactionEngine(RedactionConfig(**CONFIGS[name]), environ=HMAC_ENV)


def each_alone(eng: RedactionEngine, texts: list[bytes]) -> dict:
    found = {}
    for i, t in enumerate(texts):
        counts: dict = {}
        out = eng.scan(t, counts) if eng.candidates([t]) else None
        if out is not None:
            found[i] = (out, counts)
    return found


def joined(texts: list[bytes]) -> tuple[bytes, list[int]]:
    ends, n = [], 0
    for t in texts:
        n += len(t) + 1
        ends.append(n)
    return b"".join(t + b"\n" for t in texts), ends


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_joined_scan_answers_what_each_text_alone_answers(config):
    eng = engine(config)
    rng = random.Random(f"{SEED}-{config}")
    pool = [t.encode() for t in _texts(rng, 400) + EDGES]
    changed = 0
    for _ in range(300):
        texts = [rng.choice(pool) for _ in range(rng.randint(1, 12))]
        want = each_alone(eng, texts)
        got = eng.scan_joined(*joined(texts))
        assert got == want, f"{config}: {texts!r}"
        changed += len(want)
    assert changed > 150, "the texts must hold what the rules change"


def test_the_join_falls_back_where_it_would_read_a_text_differently():
    eng = engine("tricky")
    texts = [b"LINE7\nLINE8", b"SPACED9 lead", b"TAIL42", b"LINE9", b"x PAIR", b"END"]
    got = eng.scan_joined(*joined(texts))
    # alone: the first is not one line, the second has no space before it, the third's \s* stops at its end,
    # and PAIR and END are two texts
    assert got == {2: (b"[REDACTED]", {("tail", "mask"): 1}), 3: (b"<line>", {("line", "replace"): 1})}


def test_where_two_rules_match_at_one_place_the_first_rule_wins():
    eng = engine("tricky")
    assert eng.scan_joined(*joined([b"x TIE12 y"])) == {0: (b"x [REDACTED]2 y", {("tie", "mask"): 1})}


def test_drop_and_replace_take_the_whole_text_and_count_what_came_before():
    eng = engine("tricky")
    got = eng.scan_joined(*joined([b"HASHME-3 DROPME1 HASHME-4", b"SECRET-AB"]))
    assert got[0] == (DROP, {("hashme", "hash"): 1, ("dropme", "drop"): 1})
    assert got[1] == (b"<s>", {("secret", "replace"): 1})


def test_a_clean_join_changes_nothing():
    eng = engine("default")
    assert eng.scan_joined(*joined([b"resnet50", b"v3", b"POST /v1/predict", b"12345"])) == {}
    assert eng.scan_joined(b"", []) == {}
