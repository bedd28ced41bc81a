"""The compiled rule engine: key rules, value rules, actions and counts.

Everything is decided at construction: every regex is compiled once with RE2 (linear
time, so no rule and no input can stall the pipeline), all value rules are combined
into one alternation for the batch prefilter, and key decisions are cached per key. A
string the prefilter flags is scanned by the rules that match in it only: an RE2 set
names them in one pass, and a regex of those rules alone (capture groups only where a
rule marks its secret; compiled on first use per set of rules, then cached) finds the
matches.

Adapters (``redaction.otlp`` for protobuf, ``redaction.values`` for SDK objects) walk
their data and call :meth:`RedactionEngine.candidates` once per batch of strings; the
protobuf adapter first asks :meth:`RedactionEngine.wire_candidates` which messages can
need the walk at all. The wire path (``sidecar.wire_redaction``) hands over a whole
request's texts already joined, and :meth:`RedactionEngine.scan_joined` scans them in one
pass per rule that matches there.

Strings are scanned as UTF-8 bytes with the raw RE2 object; the Python wrapper's
per-match offset decoding would cost more than the scan.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import itertools
import operator
import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence, TypeVar

import re2

from redaction._config import Action, RedactionConfig, RedactionConfigError, compile_regex
from redaction._detectors import BUILTIN_KEY_PATTERNS, DETECTORS, SEMCONV_MEASUREMENT_KEYS
from redaction._regex import ANCHOR_BOTH as _ANCHOR_BOTH
from redaction._regex import UNANCHORED as _UNANCHORED  # the raw RE2 API is what makes scanning cheap
from redaction._regex import options, regex, regex_set

_MASK, _REPLACE, _DROP, _HASH = Action.MASK, Action.REPLACE, Action.DROP, Action.HASH  # no enum lookup per match

#: Summary attribute names, as the OpenTelemetry Collector's redaction processor writes them.
MASKED_COUNT = "redaction.masked.count"
MASKED_KEYS = "redaction.masked.keys"
REDACTED_COUNT = "redaction.redacted.count"
REDACTED_KEYS = "redaction.redacted.keys"


class _Sentinel:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: A value the rules say to remove entirely.
DROP = _Sentinel("DROP")
#: Key decisions: scan the value with the value rules, or leave the key alone entirely.
SCAN = _Sentinel("SCAN")
IGNORE = _Sentinel("IGNORE")

T = TypeVar("T")
Tally = dict  # (rule, action) -> count, kept per batch by the adapter and merged once


@dataclass(frozen=True, slots=True)
class KeyAction:
    """What happens to the value of a key matched by a key rule (or missing from the allowlist)."""

    rule: str
    action: Action
    replacement: str
    stat: tuple[str, str]


@dataclass(frozen=True, slots=True)
class _ValueRule:
    name: str
    action: Action
    replacement: bytes
    pattern: str
    inner: int  # capturing groups inside the pattern
    has_core: bool  # the pattern's one group is the secret, the rest is context
    validator: object
    stat: tuple[str, str]
    #: what a match becomes inside a name: the mask text, or ``[RULE_NAME]`` where the action
    #: would drop, replace the whole value or hash (none of which suits a groupable name)
    name_token: bytes


@dataclass(frozen=True, slots=True)
class _Scanner:
    """Some of the value rules as one regex: (rule, its outer group, the group that is the secret) in order.

    Built per set of rules that match somewhere in a string: rules that match nowhere in it
    cannot change which alternative wins at any position, so the smaller regex finds exactly
    the matches the one of every rule finds, with a smaller program to run per match, and
    with no capture groups at all where one rule without a core group is left.
    """

    rx: object
    entries: tuple[tuple[_ValueRule, int, int], ...]
    match: object = None  # rx.Match, bound once
    several: bool = False  # more than one entry: the matching rule is the one whose group took part

    def __post_init__(self) -> None:
        object.__setattr__(self, "match", self.rx.Match)
        object.__setattr__(self, "several", len(self.entries) > 1)


class RedactionStats:
    """Values changed per (rule, action). Adapters merge one tally per batch; readers snapshot."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}

    def merge(self, tally: Tally) -> None:
        if not tally:
            return
        with self._lock:
            counts = self._counts
            for k, n in tally.items():
                counts[k] = counts.get(k, 0) + n

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)

    def get(self, rule: str, action: str | Action) -> int:
        action = action.value if isinstance(action, Action) else action
        with self._lock:
            return self._counts.get((rule, action), 0)

    def total(self, action: str | Action | None = None) -> int:
        action = action.value if isinstance(action, Action) else action
        with self._lock:
            return sum(n for (_, a), n in self._counts.items() if action is None or a == action)


#: User patterns with these can match a value alone but not inside the joined batch; they turn batching off.
_BATCH_UNSAFE = re2.compile(r"\\[AzZ]|\(\?[a-zA-Z]*-[a-zA-Z]*m")
#: User patterns with anchors or word boundaries cannot run over serialized bytes; they turn the wire prefilter off.
_WIRE_UNSAFE = re2.compile(r"\\[bBAzZ]|\$|(?:^|[^\[])\^")
_KEY_CACHE_MAX = 4096
_SCANNER_CACHE_MAX = 256  # sets of rules that matched together; few in practice
_NEVER = _Sentinel("NEVER")  # no rule at all: every request is clean


#: Held by a thread scanning a whole request (``with SCAN_LOCK:``), shared by every engine of the process.
#: The RE2 binding releases the GIL around each match; with several threads scanning at once, every
#: release hands the GIL to another thread and the match's end waits to get it back: two context switches
#: per match. Four threads redacting PII-dense requests cost 2.5-3x the CPU per span of one thread, and
#: finished later (benchmarks/redaction_threads.py). One scan at a time loses no parallelism the GIL
#: allowed, except the matches themselves.
SCAN_LOCK = threading.Lock()


class RedactionEngine:
    """One compiled set of rules. Thread-safe; share one per process or per processor."""

    def __init__(self, config: RedactionConfig | None = None, *, environ: Mapping[str, str] | None = None):
        self.config = config = config or RedactionConfig()
        self.stats = RedactionStats()
        self.summary = config.summary
        env = os.environ if environ is None else environ
        self._ignored = frozenset(config.ignored_keys) | {MASKED_COUNT, MASKED_KEYS, REDACTED_COUNT, REDACTED_KEYS}
        self._allowed_keys = None if config.allow_all_keys else frozenset(config.allowed_keys)
        self._key_cache: dict[str, object] = {}
        self._key_lock = threading.Lock()

        hash_users: list[str] = []
        self._key_rules = self._compile_key_rules(config, hash_users)
        self._disallowed = KeyAction("allowed_keys", _key_action(config.disallowed_key_action), "[REDACTED]",
                                     ("allowed_keys", _key_action(config.disallowed_key_action).value))
        if not config.allow_all_keys and self._disallowed.action is Action.HASH:
            hash_users.append("disallowed_key_action")
        self._value_rules, alternatives, batch_safe = self._compile_value_rules(config, hash_users)

        self._hmac = None
        if hash_users:
            key = env.get(config.hash_key_env)
            if not key:
                raise RedactionConfigError([
                    f"hash_key_env: environment variable {config.hash_key_env} is not set, "
                    f"but {', '.join(hash_users)} use{'s' if len(hash_users) == 1 else ''} action hash"])
            self._hmac = hmac.new(key.encode(), digestmod=hashlib.sha256)

        self._all: _Scanner | None = None
        self._which = self._which_lines = None
        self._scanners: dict[tuple[int, ...], _Scanner] = {}
        self._prefilter = None
        self._batch_safe = batch_safe
        if alternatives:
            self._all = self._scanner(tuple(range(len(self._value_rules))))
            # with one rule, that rule's scanner is already the smallest
            self._which = _rule_set(self._value_rules) if len(self._value_rules) > 1 else None
            self._which_lines = _rule_set(self._value_rules, lines=True) if self._which is not None else None
            pre = "(?m:" + "|".join(f"(?:{p})" for p in alternatives) + ")"
            self._prefilter = regex(pre, options(never_capture=True))
        self._wire = self._compile_wire_prefilter(config)
        self._allowed_values = None
        if config.allowed_values:
            allowed = "|".join(f"(?:{p})" for p in config.allowed_values)
            compile_regex(allowed)  # the checks every user pattern gets
            self._allowed_values = regex(allowed, options())

    # --- construction ---------------------------------------------------------------------

    @staticmethod
    def _compile_key_rules(config: RedactionConfig, hash_users: list[str]) -> list[tuple[object, KeyAction, bool]]:
        """(regex, action, built-in?) in order; built-in rules skip the semantic-convention measurements."""
        rules: list[tuple[object, KeyAction, bool]] = []
        default = _key_action(config.blocked_key_action)
        if config.builtin_blocked_key_patterns:
            for name, pattern, _ in BUILTIN_KEY_PATTERNS:
                rules.append((compile_regex(pattern), KeyAction(name, default, "[REDACTED]", (name, default.value)),
                              True))
            if default is Action.HASH:
                hash_users.append("blocked_key_action")
        for i, rule in enumerate(config.blocked_key_patterns):
            name = rule.name or f"blocked_key_patterns[{i}]"
            action = _key_action(rule.action) if rule.action is not None else default
            if action is Action.HASH:
                hash_users.append(name)
            rules.append((compile_regex(rule.pattern), KeyAction(name, action, rule.replacement, (name, action.value)),
                          False))
        return rules

    @staticmethod
    def _compile_value_rules(config: RedactionConfig, hash_users: list[str]):
        specs = []  # (name, pattern, action, replacement, validator, has_core)
        for i, rule in enumerate(config.blocked_values):
            specs.append((rule.name or f"blocked_values[{i}]", rule.pattern, rule.action, rule.replacement, None, False))
        for det in DETECTORS:
            dc = getattr(config.detectors, det.name)
            if dc.enabled:
                specs.append((det.name, det.pattern, dc.action, dc.replacement or det.placeholder, det.validator, True))
        rules, alternatives = [], []
        batch_safe = True
        for name, pattern, action, replacement, validator, has_core in specs:
            inner = compile_regex(pattern).groups
            if action is Action.HASH:
                hash_users.append(name)
            if not has_core and _BATCH_UNSAFE.search(pattern):
                batch_safe = False
            token = replacement if action in (Action.MASK, Action.REPLACE) and replacement else f"[{name.upper()}]"
            rules.append(_ValueRule(name, action, replacement.encode(), pattern, inner, has_core and inner == 1,
                                    validator, (name, action.value), token.encode()))
            alternatives.append(f"({pattern})")
        return rules, alternatives, batch_safe

    def _scanner(self, which: tuple[int, ...], lines: bool = False) -> _Scanner:
        """The scanner for the value rules at indices ``which`` (ascending), compiled once and cached.

        ``lines``: for texts joined with newlines (:meth:`scan_joined`): ``^`` and ``$`` match at
        every text's ends.
        """
        key = (which, lines)
        scanner = self._scanners.get(key)
        if scanner is not None:
            return scanner
        rules = [self._value_rules[i] for i in which]
        if len(rules) == 1:
            rule = rules[0]
            # one rule alone: group 0 is its match; no capture group at all unless a core is wanted
            scanner = _Scanner(_compile(rule.pattern, capture=rule.has_core, lines=lines),
                               ((rule, 0, 1 if rule.has_core else 0),))
        else:
            entries, group = [], 1
            for rule in rules:
                entries.append((rule, group, group + 1 if rule.has_core else group))
                group += 1 + rule.inner
            scanner = _Scanner(_compile("|".join(f"({r.pattern})" for r in rules), capture=True, lines=lines),
                               tuple(entries))
        if len(self._scanners) >= _SCANNER_CACHE_MAX:
            self._scanners.clear()  # user rules in the dozens could make many sets: memory stays bounded
        self._scanners[key] = scanner
        return scanner

    @staticmethod
    def _compile_wire_prefilter(config: RedactionConfig):
        """One regex that matches somewhere in every serialized message some rule could change.

        None when that cannot be promised (allowlist mode, user patterns with anchors).
        """
        if not config.allow_all_keys:
            return None
        hints = []
        if config.builtin_blocked_key_patterns:
            hints.extend(hint for _, _, hint in BUILTIN_KEY_PATTERNS)
        for rule in list(config.blocked_key_patterns) + list(config.blocked_values):
            if _WIRE_UNSAFE.search(rule.pattern):
                return None
            hints.append(rule.pattern)
        hints.extend(det.wire_hint for det in DETECTORS if getattr(config.detectors, det.name).enabled)
        if not hints:
            return _NEVER
        # a request's items are scanned as one buffer: a big DFA cache avoids the NFA
        return regex("|".join(f"(?:{h})" for h in hints), options(never_capture=True, max_mem=64 << 20))

    def wire_candidates(self, items: Sequence[T], serialize: Callable[[T], bytes]) -> Iterable[int]:
        """Indices of ``items`` (protobuf messages) that some rule could change; the rest need no walk.

        Every string and key of a protobuf message appears verbatim in its serialization,
        so a scan of the bytes with hints that hold inside every match (no anchors, no
        word boundaries) is a safe test; a hit only means the item must be walked. The
        serializations are joined with nothing between them and scanned once: each one
        starts with a tag byte, which the key hints accept where a key ends.
        ``serialize`` is only called when the answer depends on the bytes: without rules
        nothing is flagged, and where hints cannot be promised (allowlist mode, anchored
        user patterns) everything is.
        """
        wire = self._wire
        if wire is _NEVER:
            return ()
        if wire is None:
            return range(len(items))
        return _hits(wire, list(map(serialize, items)), b"")

    # --- keys -------------------------------------------------------------------------------

    def key_action(self, key: str) -> object:
        """SCAN, IGNORE or the :class:`KeyAction` for ``key``; cached, so the hot path is one dict lookup."""
        decision = self._key_cache.get(key)
        if decision is None:
            decision = self._classify(key)
            with self._key_lock:
                if len(self._key_cache) >= _KEY_CACHE_MAX:
                    self._key_cache.clear()  # unbounded key sets (ids in keys) must not grow memory
                self._key_cache[key] = decision
        return decision

    def _classify(self, key: str) -> object:
        if key in self._ignored:
            return IGNORE
        measurement = key in SEMCONV_MEASUREMENT_KEYS
        for rx, action, builtin in self._key_rules:
            if rx.search(key) is not None and not (builtin and measurement):
                return action
        if self._allowed_keys is not None and key not in self._allowed_keys:
            return self._disallowed
        return SCAN

    def key_replacement(self, action: KeyAction, text: str) -> str:
        """The new value for a key rule that keeps the attribute (replace or hash)."""
        if action.action is Action.HASH:
            return self.hash(text.encode())
        return action.replacement

    # --- values -----------------------------------------------------------------------------

    def hash(self, data: bytes) -> str:
        """HMAC-SHA256 of ``data`` with the configured key, hex: same key, same output, everywhere."""
        h = self._hmac.copy()
        h.update(data)
        return h.hexdigest()

    def candidates(self, bufs: list[bytes]) -> Iterable[int]:
        """Indices of ``bufs`` that may hold a match; every other one is certainly clean.

        The buffers are joined with newlines and scanned once with the multi-line
        prefilter: a pattern that matches inside one value also matches inside the join
        (``^``/``$`` are line anchors there), so clean batches cost one scan in C.
        """
        pre = self._prefilter
        if pre is None or not bufs:
            return ()
        if not self._batch_safe:
            return [i for i, b in enumerate(bufs) if pre.Match(_UNANCHORED, b, 0, len(b))[0][0] >= 0]
        return _hits(pre, bufs, b"\n")

    def scan(self, b: bytes, tally: Tally, *, name: bool = False) -> "bytes | None | _Sentinel":
        """Apply the value rules to one UTF-8 value: None if clean, new bytes, or :data:`DROP`.

        ``name=True`` is for span and event names, which backends group by: every action
        masks only the matched part (``GET /users/[EMAIL]``), so a name is never dropped,
        replaced whole or hashed into a unique value.

        One pass of the rule set names the rules that match somewhere in ``b``; only they
        run, as one regex (see :class:`_Scanner`). An empty answer is checked with every
        rule, as the set also answers "none" when its DFA runs out of memory.
        """
        scanner = self._all
        if scanner is None:
            return None
        which = self._which
        if which is not None:
            hit = which.Match(b)
            if hit:
                if len(hit) > 1:
                    hit.sort()
                which = tuple(hit)
                scanner = self._scanners.get((which, False)) or self._scanner(which)
        match, entries, several = scanner.match, scanner.entries, scanner.several
        rule, _, core = entries[0]
        allowed = self._allowed_values
        n = len(b)
        pos = last = 0
        pieces: list[bytes] | None = None
        while pos < n:
            spans = match(_UNANCHORED, b, pos, n)
            if spans[0][0] < 0:
                break
            if several:
                for rule, group, core in entries:
                    if spans[group][0] >= 0:
                        break
            cs, ce = spans[core]
            if ce <= cs:
                pos = max(spans[0][1], pos + 1)
                continue
            if rule.validator is not None or allowed is not None:
                resume = self._not_secret(rule, b, cs, ce)
                if resume:
                    pos = resume
                    continue
            stat = rule.stat
            tally[stat] = tally.get(stat, 0) + 1
            if name:
                new = rule.name_token
            else:
                action = rule.action
                if action is _MASK:
                    new = rule.replacement
                elif action is _DROP:
                    return DROP
                elif action is _REPLACE:
                    return rule.replacement
                else:
                    new = self.hash(b[cs:ce]).encode()
            if pieces is None:
                pieces = [b[:cs], new]
            else:
                pieces.append(b[last:cs])
                pieces.append(new)
            last = pos = ce
        if pieces is None:
            return None
        pieces.append(b[last:])
        return b"".join(pieces)

    def scan_joined(self, joined: bytes, ends: Sequence[int]) -> "dict[int, tuple[bytes | _Sentinel, Tally]]":
        """:meth:`scan` of many texts at once: {index: (new bytes or :data:`DROP`, its counts)} of those changed.

        Text ``i`` is ``joined[ends[i - 1]:ends[i] - 1]`` (``ends[-1]`` read as 0): each text is
        followed by a newline. The RE2 binding hands the GIL to another thread on every call, so
        one call per match of the whole join, not about three per text, is what makes a PII-dense
        request cheap where receivers run side by side. Each rule that matches in the join runs
        alone (a small program extracts its groups in two fifths of the time the alternation of every
        rule takes) and their matches are merged as the alternation would pick them: the leftmost,
        the first rule on a tie.

        The answers are exactly :meth:`scan`'s on each text alone: the join is scanned with
        ``^``/``$`` as line anchors, and a text where that can differ (a match that runs past its
        end, or a newline inside it) is scanned alone. Where a user pattern holds ``\\A``, ``\\z`` or
        ``(?-m``, which no join can honour, every text is scanned alone.
        """
        pre = self._prefilter
        if pre is None or self._all is None:
            return {}
        if not self._batch_safe:
            texts = [joined[ends[i - 1] if i else 0:ends[i] - 1] for i in range(len(ends))]
            found = {}
            for i in self.candidates(texts):
                self._scan_alone(texts[i], 0, len(texts[i]), i, found)
            return found
        n = len(joined)
        start = pre.Match(_UNANCHORED, joined, 0, n)[0][0]
        if start < 0:
            return {}
        ends = list(ends)
        text = bisect.bisect_right(ends, start)
        pos = ends[text - 1] if text else 0
        which = self._which_lines
        hit = which.Match(joined) if which is not None else None  # none also when its DFA ran out: every rule
        # per rule in rule order: [its scanner's match, the rule, its core group, its next match from pos]
        active = []
        for r in sorted(hit) if hit else range(len(self._value_rules)):
            scanner = self._scanners.get(((r,), True)) or self._scanner((r,), lines=True)
            spans = scanner.match(_UNANCHORED, joined, pos, n)
            if spans[0][0] >= 0:
                active.append([scanner.match, scanner.entries[0][0], scanner.entries[0][2], spans])
        allowed = self._allowed_values
        found: dict = {}
        current = -1  # the text whose matches are being gathered: its start, end, counts and pieces so far
        t_start = t_end = last = 0
        counts: Tally = {}
        pieces: list[bytes] = []
        while active:
            chosen = None
            ms = n
            ended = False
            for entry in active:  # the leftmost next match; a rule's match that pos has passed is searched again
                spans = entry[3]
                if spans[0][0] < pos:
                    spans = entry[3] = entry[0](_UNANCHORED, joined, pos, n)
                    if spans[0][0] < 0:
                        ended = True
                        continue
                if spans[0][0] < ms:
                    chosen, ms = entry, spans[0][0]
            if ended:  # a rule with no match left is not searched again
                active = [entry for entry in active if entry[3][0][0] >= 0]
            if chosen is None:
                break
            _, rule, core, spans = chosen
            me = spans[0][1]
            if ms >= t_end or current < 0:  # a match in a text after the current one
                if pieces:
                    pieces.append(joined[last:t_end])
                    found[current] = (b"".join(pieces), counts)
                    pieces, counts = [], {}
                current = bisect.bisect_right(ends, ms)
                t_start, t_end = ends[current - 1] if current else 0, ends[current] - 1
                if ms == t_end:  # starts on the newline after the text: no text's own match
                    pos = t_end + 1
                    current = -1
                    continue
                last = t_start
                if joined.find(b"\n", t_start, t_end) >= 0:  # lines inside: ^ and $ would mean more here
                    pos = self._scan_alone(joined, t_start, t_end, current, found)
                    current = -1
                    continue
            if me > t_end:  # runs past the text's end: what the text alone makes of it
                pieces, counts = [], {}
                pos = self._scan_alone(joined, t_start, t_end, current, found)
                current = -1
                continue
            cs, ce = spans[core]
            if ce <= cs:
                pos = max(me, pos + 1)
                continue
            if rule.validator is not None or allowed is not None:
                resume = self._not_secret(rule, joined, cs, ce)
                if resume:
                    pos = resume
                    continue
            stat = rule.stat
            counts[stat] = counts.get(stat, 0) + 1
            action = rule.action
            if action is _MASK:
                new = rule.replacement
            elif action is _DROP or action is _REPLACE:
                found[current] = (DROP if action is _DROP else rule.replacement, counts)
                pieces, counts = [], {}
                pos = t_end + 1
                current = -1
                continue
            else:
                new = self.hash(joined[cs:ce]).encode()
            pieces.append(joined[last:cs])
            pieces.append(new)
            last = pos = ce
        if pieces:
            pieces.append(joined[last:t_end])
            found[current] = (b"".join(pieces), counts)
        return found

    def _not_secret(self, rule: _ValueRule, data: bytes, cs: int, ce: int) -> int:
        """0 when ``rule``'s match ``data[cs:ce]`` is a secret, else where scanning resumes: one past its start
        when the rule's validator says no (a longer look-alike may start inside it), after it when it is an
        allowed value."""
        if rule.validator is not None and not rule.validator(data[cs:ce]):
            return cs + 1
        if self._allowed_values is not None and _full_match(self._allowed_values, data[cs:ce]):
            return ce
        return 0

    def _scan_alone(self, joined: bytes, start: int, end: int, index: int, found: dict) -> int:
        """:meth:`scan` of one text of a join, its answer put in ``found``; where scanning the join resumes."""
        counts: Tally = {}
        out = self.scan(joined[start:end], counts)
        if out is not None:
            found[index] = (out, counts)
        return end + 1

    def redact_name(self, text: str, tally: Tally | None = None) -> str:
        """A span, event or metric-label name with every match masked in place (never dropped)."""
        local = {} if tally is None else tally
        b = text.encode()
        if not self.candidates([b]):
            return text
        out = self.scan(b, local, name=True)
        if tally is None:
            self.stats.merge(local)
        return text if out is None else out.decode()

    def redact_text(self, text: str, tally: Tally | None = None) -> "str | _Sentinel":
        """One string through the value rules: the same object if clean, a new string, or :data:`DROP`."""
        local = {} if tally is None else tally
        b = text.encode()
        if not self.candidates([b]):
            return text
        out = self.scan(b, local)
        if tally is None:
            self.stats.merge(local)
        if out is None:
            return text
        return out if out is DROP else out.decode()


def _hits(rx, bufs: list[bytes], sep: bytes) -> Iterable[int]:
    """Indices of ``bufs`` in which ``rx`` matches: one scan of their join with ``sep``, one more per hit.

    A match that starts in one buffer and runs into the next flags the first one only
    (harmless: a hit is a candidate, not a verdict); scanning resumes at the next buffer,
    so a match inside it is still found.
    """
    if not bufs:
        return ()
    if len(bufs) == 1:
        b = bufs[0]
        return (0,) if rx.Match(_UNANCHORED, b, 0, len(b))[0][0] >= 0 else ()
    joined = sep.join(bufs)
    n = len(joined)
    start = rx.Match(_UNANCHORED, joined, 0, n)[0][0]
    if start < 0:
        return ()
    # buffer i and the separator after it end at ends[i] (exclusive); computed in C, not per buffer
    ends = list(itertools.accumulate(map(len, bufs)))
    if sep:
        ends = list(map(operator.add, ends, range(len(sep), len(sep) * (len(ends) + 1), len(sep))))
    hits = []
    while start >= 0:
        i = bisect.bisect_right(ends, start)
        hits.append(i)
        pos = ends[i]
        if pos >= n:
            break
        start = rx.Match(_UNANCHORED, joined, pos, n)[0][0]
    return hits


def _full_match(rx, text: bytes) -> bool:
    """``rx`` matches all of ``text``, seen on its own (``^``, ``$`` and ``\\b`` at its ends)."""
    return rx.Match(_ANCHOR_BOTH, text, 0, len(text))[0][0] >= 0


def _compile(pattern: str, *, capture: bool, lines: bool = False):
    if lines:  # RE2's default DFA budget still: one per rule, and hostile text must not grow them all
        pattern = "(?m)" + pattern
    return regex(pattern, options(never_capture=not capture))


def _rule_set(rules: Sequence[_ValueRule], *, lines: bool = False):
    """An RE2 set of the value rules: one DFA pass says which of them match somewhere in a string.

    ``lines``: for texts joined with newlines, as :func:`_compile`. None if RE2 will not build
    it (the engine then always scans with every rule).
    """
    # RE2's default DFA budget: should a long string exhaust it, the set answers "none" and every rule runs
    try:
        return regex_set(("(?m)" + rule.pattern if lines else rule.pattern for rule in rules), options())
    except re2.error:
        return None


def _key_action(action: Action) -> Action:
    """For a key rule the whole value is the secret, so mask means replace."""
    return Action.REPLACE if action is Action.MASK else action
