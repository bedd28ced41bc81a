"""redaction's RE2 binding (redaction/_re2_gil.cpp) answers exactly as google-re2's, which it stands in for.

The engine matches with whichever ``redaction._regex`` chose: the binding in the C pass of the suite,
google-re2's objects under SIDECAR_PURE_PYTHON=1. Here the binding's ``Match`` and ``Set.Match`` are
compared with google-re2's on the built-in detectors and on patterns written to find differences
(anchors, word boundaries, line mode, optional groups, UTF-8), at every position of generated texts,
on short texts (matched with the GIL held) and long ones (released).
"""

from __future__ import annotations

import importlib.util
import os
import random

import pytest
import re2

from contract.accelerators import pure_python_requested
from redaction import _regex
from redaction._detectors import DETECTORS

BUILT = importlib.util.find_spec("redaction._re2_gil") is not None
PURE = pure_python_requested()
needs_binding = pytest.mark.skipif(not BUILT, reason="redaction._re2_gil is not built (no libre2-dev)")

ANCHORS = (re2._Anchor.UNANCHORED, re2._Anchor.ANCHOR_START, re2._Anchor.ANCHOR_BOTH)  # noqa: SLF001
PATTERNS = [det.pattern for det in DETECTORS] + [
    r"(?m)^\w+@\w+$", r"\bkey-(\d+)?\b", r"(a)|(b)(c)?", r"[^\n]*x", r"(?i)straße|ÄÖ", r"\s*sk_\w{4,}\s*", r"(?s).",
]
ALPHABET = ["a", "b", "c", "x", " ", "\n", "@", "-", "1", "9", "key-12", "sk_live_abcd", "ä", "ß",
            "jane@example.com", "4111 1111 1111 1111", "+1 415 555 0100", "10.0.0.1"]


def options(**values) -> re2.Options:
    o = re2.Options()
    o.log_errors = False
    for k, v in values.items():
        setattr(o, k, v)
    return o


def binding_regex(pattern: str, opts: re2.Options):
    from redaction import _re2_gil

    return _re2_gil.RE2(pattern.encode(), _regex._values(opts))  # noqa: SLF001


def binding_set(patterns: list[str], opts: re2.Options):
    from redaction import _re2_gil

    s = _re2_gil.Set(re2._Anchor.UNANCHORED, _regex._values(opts))  # noqa: SLF001
    for p in patterns:
        s.Add(p.encode())
    assert s.Compile()
    return s


def google_set(patterns: list[str], opts: re2.Options):
    s = re2.Set.SearchSet(opts)
    for p in patterns:
        s.Add(p)
    s.Compile()
    return s._set  # noqa: SLF001 - the raw set, as the engine calls it


def texts(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 12))).encode() for _ in range(n)]


def test_the_binding_runs_unless_the_pure_python_path_is_asked_for():
    compiled = type(_regex.regex("a", options())).__module__, type(_regex.regex_set(["a"], options())).__module__
    if PURE:
        assert _regex.IMPLEMENTATION == "google-re2" and compiled == ("re2._re2", "re2._re2")
    elif BUILT or os.environ.get("CI") == "true":  # CI installs libre2-dev: the C pass must run the binding
        assert _regex.IMPLEMENTATION == "re2_gil" and compiled == ("redaction._re2_gil", "redaction._re2_gil")


@needs_binding
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("capture", [True, False], ids=["groups", "never_capture"])
def test_match_gives_google_re2s_answer_at_every_position(pattern, capture):
    opts = options(never_capture=not capture)
    ours, theirs = binding_regex(pattern, opts), re2.compile(pattern, opts)._regexp  # noqa: SLF001
    for text in texts(40, seed=hash(pattern) & 0xFFFF):
        n = len(text)
        for anchor in ANCHORS:
            for pos, end in [(0, n), (n, n), (n + 1, n), (-1, n), (0, n + 1)] + \
                    [(p, e) for p in range(n + 1) for e in (p, n, min(n, p + 3))]:
                assert ours.Match(anchor, text, pos, end) == theirs.Match(anchor, text, pos, end), \
                    (pattern, text, anchor, pos, end)


@needs_binding
def test_long_texts_match_alike_with_the_gil_released():
    from redaction import _re2_gil

    rng = random.Random(7)
    filler = b"".join(rng.choice(ALPHABET).encode() for _ in range(_re2_gil.GIL_HELD_BYTES // 3))
    text = filler + b"\nmail jane@example.com here\n" + filler
    assert len(text) > _re2_gil.GIL_HELD_BYTES
    for pattern in PATTERNS:
        ours = binding_regex(pattern, options())
        theirs = re2.compile(pattern, options())._regexp  # noqa: SLF001
        for pos in (0, len(filler), len(text) - 5):
            assert ours.Match(re2._Anchor.UNANCHORED, text, pos, len(text)) == \
                theirs.Match(re2._Anchor.UNANCHORED, text, pos, len(text)), pattern  # noqa: SLF001
    lines = ["(?m)" + p for p in PATTERNS]
    assert sorted(binding_set(lines, options()).Match(text)) == sorted(google_set(lines, options()).Match(text))


@needs_binding
def test_a_set_says_which_patterns_match_as_google_re2s_does():
    ours, theirs = binding_set(PATTERNS, options()), google_set(PATTERNS, options())
    for text in texts(300, seed=3):
        assert sorted(ours.Match(text)) == sorted(theirs.Match(text)), text


@needs_binding
def test_a_pattern_this_libre2_refuses_falls_back_to_google_re2():
    # named groups in the (?<name>) form came to RE2 after the libre2 Debian 12 ships; google-re2 takes them
    pattern = r"(?<digits>\d+)"
    rx = _regex.regex(pattern, options())
    assert rx.Match(re2._Anchor.UNANCHORED, b"ab 42", 0, 5)[0] == (3, 5)  # noqa: SLF001
    s = _regex.regex_set([pattern, "x"], options())
    assert sorted(s.Match(b"x 1")) == [0, 1]


def test_a_pattern_neither_accepts_raises_re2s_error():
    with pytest.raises(re2.error):
        _regex.regex("(a", options())
    with pytest.raises(re2.error):
        _regex.regex_set(["(a"], options())


@needs_binding
def test_bad_arguments_are_refused_with_a_reason():
    from redaction import _re2_gil

    with pytest.raises(TypeError, match="12 values"):
        _re2_gil.RE2(b"a", (1, 2))
    with pytest.raises(ValueError, match="missing \\)"):
        _re2_gil.RE2(b"(a", _regex._values(options()))  # noqa: SLF001
    rx = _re2_gil.RE2(b"a", _regex._values(options()))  # noqa: SLF001
    with pytest.raises(ValueError, match="anchor"):
        rx.Match(7, b"a", 0, 1)
    with pytest.raises(TypeError):
        rx.Match(0, "a str", 0, 1)
    s = _re2_gil.Set(0, _regex._values(options()))  # noqa: SLF001
    with pytest.raises(ValueError, match="before Compile"):
        s.Match(b"a")
    s.Add(b"a")
    assert s.Compile() is True
    with pytest.raises(ValueError, match="after Compile"):
        s.Add(b"b")
