"""The RE2 objects redaction matches with: this package's binding when it is built, else google-re2's.

google-re2's raw ``RE2.Match`` and ``Set.Match`` release the GIL around every call. Redacting a
request makes a few dozen calls of a few microseconds each, and in a sidecar whose other threads
wait for the GIL each release hands it to one of them: beside one busy thread a call cost 16-56 µs
of CPU against 2 alone (docs/benchmarks.md). ``redaction/_re2_gil.cpp`` matches a text shorter
than 256 KiB with the GIL held, as CPython's ``re`` does, and a longer one with it released.

Both answer with the same shapes (``Match(anchor, text, pos, endpos)`` -> a (start, end) per group,
``Set.Match(text)`` -> indices), so the engine never branches on which one runs. The binding is
built by ``pip install -e .`` where libre2-dev is installed (scripts/setup.sh installs it); without
it, or with ``SIDECAR_PURE_PYTHON=1`` (:mod:`contract.accelerators`), google-re2's objects are used,
and the test suite runs once each way. Patterns are validated by google-re2 first (``_config``);
one this build's RE2 refuses (an older libre2) gets google-re2's object instead.
"""

from __future__ import annotations

from typing import Iterable

import re2

from contract.accelerators import choose

_binding = choose("redaction._re2_gil", None)
#: "re2_gil" (this package's binding) or "google-re2", for diagnostics and the benchmarks.
IMPLEMENTATION = "google-re2" if _binding is None else "re2_gil"
#: the anchors of ``Match``, as either binding takes them
UNANCHORED, ANCHOR_BOTH = re2._Anchor.UNANCHORED, re2._Anchor.ANCHOR_BOTH  # noqa: SLF001


def options(**values) -> re2.Options:
    """RE2 options with ``values`` set, and ``log_errors`` off: a refused pattern or an exhausted DFA budget
    is the caller's to report (the engine counts it), not a line on stderr per request."""
    opts = re2.Options()
    opts.log_errors = False
    for name, value in values.items():
        setattr(opts, name, value)
    return opts


def _values(options: re2.Options) -> tuple:
    """``options`` as the binding takes them (see its header comment)."""
    return (options.max_mem, int(options.encoding == re2.Options.Encoding.LATIN1), options.posix_syntax,
            options.longest_match, options.literal, options.never_nl, options.dot_nl, options.never_capture,
            options.case_sensitive, options.perl_classes, options.word_boundary, options.one_line)


def regex(pattern: str, options: re2.Options):
    """The raw compiled ``pattern``; raises ``re2.error`` when RE2 refuses it."""
    if _binding is not None:
        try:
            return _binding.RE2(pattern.encode(), _values(options))
        except ValueError:
            pass  # this libre2 refuses what google-re2's accepts, or says why below
    return re2.compile(pattern, options)._regexp  # noqa: SLF001 - the raw object: no str handling per call


def regex_set(patterns: Iterable[str], options: re2.Options, anchor=UNANCHORED):
    """A compiled raw set of ``patterns`` (``Match(text)`` -> the indices that match); raises ``re2.error``."""
    patterns = list(patterns)
    if _binding is not None:
        try:
            ours = _binding.Set(anchor, _values(options))
            for p in patterns:
                ours.Add(p.encode())
            if ours.Compile():
                return ours
        except ValueError:
            pass
    theirs = re2.Set(anchor, options)
    for p in patterns:
        theirs.Add(p)
    theirs.Compile()
    return theirs._set  # noqa: SLF001 - the raw set: no str handling per call
