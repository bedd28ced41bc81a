"""Redaction on the wire: the rule engine applied to an encoded OTLP request, answering new bytes.

The object-level adapter (``redaction.otlp.OtlpRedactor``) parses a request and walks its
messages from Python. Here the strings and their keys are located in the encoded request in one
pass (``locate``, which joins each distinct string once: most repeat on every span), all of them
are scanned together with RE2 (``RedactionEngine.scan_joined``), key rules are decided per key from
the engine's cache, and the few replacements are spliced into the bytes with every enclosing length
prefix rewritten (``splice``). The output parses to exactly
what the object-level path makes of the same request (a randomized test holds them to that):
the same masks, drops, hashes and names, and the same summary attributes on changed spans and
log records.

``locate`` and ``splice`` come from the C extension (``sidecar/_wire_redact.c``) when it was
built, else from the pure-Python module (``sidecar/_wire_redact_py.py``); ``SIDECAR_PURE_PYTHON=1``
selects the pure-Python one, as for ``sidecar.wire``. Callers use :func:`redact` and never
branch on which one runs.

    redact(engine, signal: str, request: bytes) -> bytes | None   # None: nothing changed

A request whose changed item already holds summary attributes from an earlier redaction stage
raises :class:`NeedsObjectPath` (the object path merges the counts); malformed input raises
ValueError.
"""

from __future__ import annotations

from types import ModuleType

from redaction._config import Action
from redaction._engine import (
    DROP,
    IGNORE,
    MASKED_COUNT,
    MASKED_KEYS,
    REDACTED_COUNT,
    REDACTED_KEYS,
    SCAN,
    RedactionEngine,
)
from redaction.otlp import _as_text
from sidecar import _wire_redact_py
from sidecar.wire import choose
from sidecar.protowire import VARINTS as _VARINTS
from sidecar.protowire import encode_varint, length_delimited
from sidecar._wire_redact_types import (
    BODY_EMPTY,
    BODY_LABEL,
    HAS_SUMMARY,
    ITEM_SITE,
    KV_SITE,
    LOGS,
    METRICS,
    NAME_SITE,
    SITE,
    STATUS_LABEL,
    TRACES,
    Located,
)

__all__ = ["IMPLEMENTATION", "Located", "NeedsObjectPath", "implementation", "locate", "redact", "splice"]


#: The implementation in use: the C extension, else the pure-Python module.
implementation: ModuleType = choose("sidecar._wire_redact", _wire_redact_py)  # the one selection rule
if getattr(implementation, "SITE", None) != SITE:  # pragma: no cover - an extension built before Located changed
    implementation = _wire_redact_py
#: "c" or "python".
IMPLEMENTATION = "python" if implementation is _wire_redact_py else "c"
locate = implementation.locate
splice = implementation.splice

_SIGNALS = {"traces": TRACES, "logs": LOGS, "metrics": METRICS}
_EMPTY = b"\x00"  # a zero length: what a dropped log body becomes
#: the attributes field of a span (9) and of a log record (6), as a tag byte
_ATTR_TAG = {TRACES: b"\x4a", LOGS: b"\x32"}
#: a changed item's count of dropped values, in the one int that counts its changes ("info" summaries)
_DROPPED = 1 << 32
_DROP, _HASH = Action.DROP, Action.HASH


class NeedsObjectPath(Exception):
    """This request needs the object-level path (a changed item already carries summary attributes)."""




def _kv(key: str, value: bytes) -> bytes:
    """An encoded KeyValue with an encoded AnyValue."""
    return length_delimited(b"\x0a", key.encode()) + length_delimited(b"\x12", value)


def _string_value(s: bytes) -> bytes:
    return length_delimited(b"\x0a", s)


def _int_value(n: int) -> bytes:
    return b"\x18" + encode_varint(n & 0xFFFFFFFFFFFFFFFF)


def redact(engine: RedactionEngine, signal: str, request: bytes) -> "bytes | None":
    """``request`` redacted by ``engine``: new bytes, or None when no rule changed anything.

    Counts go to ``engine.stats`` as on the object path.
    """
    sig = _SIGNALS.get(signal)
    if sig is None:
        raise ValueError(f"unknown signal {signal!r}")
    cache = engine._key_cache  # noqa: SLF001 - the engine's per-key decisions; misses go through key_action
    loc = locate(request, sig, cache, SCAN)
    tally: dict = {}
    edits: list = []
    summary = engine.summary
    # changed items: item -> labels (masked, dropped) for "debug"; item -> masked + dropped * _DROPPED for "info",
    # whose summary holds only the counts (no key is decoded for it)
    changed: dict | None = None if summary == "silent" else {}
    labels = summary == "debug"
    skip = _key_rules(engine, request, loc, tally, edits, changed, labels)
    text = loc.text
    if loc.text_ends:
        ends = memoryview(loc.text_ends).cast("q")
        firsts = memoryview(loc.firsts).cast("q")
        sites = memoryview(loc.sites).cast("q")
        append = edits.append
        # each distinct text is scanned once (a user id on every span), and its result applied to each of its
        # occurrences that no key rule took
        for i, (out, counts) in engine.scan_joined(text, ends).items():
            dropped = out is DROP
            if not dropped:
                out = _VARINTS[len(out)] + out if len(out) < 16384 else encode_varint(len(out)) + out
            uses = 0
            occurrence = firsts[i]
            while occurrence >= 0:
                base = occurrence * SITE  # len_start, end, drop_start, drop_end, item, key_start, key_end, next
                if skip and occurrence in skip:
                    occurrence = sites[base + 7]
                    continue
                uses += 1
                if dropped:
                    append((sites[base + 2], sites[base + 3], _EMPTY if sites[base + 6] == BODY_EMPTY else b"", -1))
                else:
                    append((sites[base], sites[base + 1], out, -1))
                if changed is not None:
                    item = sites[base + 4]
                    if item >= 0:
                        if labels:
                            _note(changed, item, _label(request, sites[base + 5], sites[base + 6]), dropped)
                        else:
                            changed[item] = changed.get(item, 0) + (_DROPPED if dropped else 1)
                occurrence = sites[base + 7]
            if uses:
                for stat, n in counts.items():
                    tally[stat] = tally.get(stat, 0) + n * uses
    names = loc.names
    if names:
        name_sites = memoryview(loc.name_sites).cast("q")
        for i in engine.candidates(names):
            out = engine.scan(names[i], tally, name=True)
            if out is None:
                continue
            base = i * NAME_SITE  # len_start, end, item, is_event
            edits.append((name_sites[base], name_sites[base + 1], encode_varint(len(out)) + out, -1))
            if changed is not None:
                item = name_sites[base + 2]
                if labels:
                    _note(changed, item, "event.name" if name_sites[base + 3] else "span.name", False)
                else:
                    changed[item] = changed.get(item, 0) + 1
    if not edits:
        engine.stats.merge(tally)
        return None
    if changed:
        _summaries(engine, sig, loc, changed, edits, labels)
    # edits never overlap on input the protobuf parser reads as one value per field; where they do
    # (two values in one KeyValue, one of them dropped) splice raises ValueError: the object path
    new = splice(request, edits)
    engine.stats.merge(tally)
    return new


def _key_rules(engine: RedactionEngine, request: bytes, loc: Located, tally: dict, edits: list,
               changed: "dict | None", labels: bool) -> "set[int] | None":
    """Apply key rules to the KeyValues ``locate`` reported; the indices of texts no longer to scan."""
    keys = loc.keys
    if not keys:
        return None
    cache_get = engine._key_cache.get  # noqa: SLF001
    kv_sites = memoryview(loc.kv_sites).cast("q").tolist()
    skip: set[int] | None = None
    covered = -1  # KeyValues inside one a key rule already took are its value, not attributes
    for k, key in enumerate(keys):
        base = k * KV_SITE  # start, len_start, end, item, first, last
        start = kv_sites[base]
        if start < covered:
            continue
        decision = cache_get(key)
        if decision is None:
            decision = engine.key_action(key)
        if decision is SCAN:
            continue
        end = kv_sites[base + 2]
        covered = end
        first, last = kv_sites[base + 4], kv_sites[base + 5]
        if last > first:
            skip = skip or set()
            skip.update(range(first, last))
        if decision is IGNORE:
            continue
        stat = decision.stat
        tally[stat] = tally.get(stat, 0) + 1
        action = decision.action
        dropped = action is _DROP
        if dropped:
            edits.append((start, end, b"", -1))
        elif action is _HASH:
            new = engine.key_replacement(decision, _as_text(_parse_kv(request, kv_sites[base + 1], end).value))
            # the KeyValue's new length and content; its tag stays as it was written
            edits.append((kv_sites[base + 1], end, _varint_len(_kv(key, _string_value(new.encode()))), -1))
        else:  # the same few (key, replacement) pairs over and over: encoded once
            new = decision.replacement
            encoded = _REPLACED.get((key, new))
            if encoded is None:
                if len(_REPLACED) >= 1024:
                    _REPLACED.clear()
                encoded = _REPLACED[(key, new)] = _varint_len(_kv(key, _string_value(new.encode())))
            edits.append((kv_sites[base + 1], end, encoded, -1))
        if changed is not None:
            item = kv_sites[base + 3]
            if item >= 0:
                if labels:
                    _note(changed, item, key, dropped)
                else:
                    changed[item] = changed.get(item, 0) + (_DROPPED if dropped else 1)
    return skip


def _varint_len(payload: bytes) -> bytes:
    return encode_varint(len(payload)) + payload


def _parse_kv(request: bytes, len_start: int, end: int):
    """The KeyValue whose length prefix starts at ``len_start`` (for hashing a value that is not a string)."""
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.common.v1.common_pb2 import KeyValue

    pos = len_start
    while request[pos] & 0x80:
        pos += 1
    try:
        return KeyValue.FromString(request[pos + 1:end])
    except DecodeError as e:  # malformed input is a ValueError, as everywhere on this path
        raise ValueError(f"malformed protobuf: {e}") from None


#: a key rule's new KeyValue content by (key, replacement); bounded
_REPLACED: dict = {}


def _label(request: bytes, key_start: int, key_end: int) -> str:
    if key_start == BODY_LABEL:
        return "body"
    if key_start == STATUS_LABEL:
        return "status.message"
    return request[key_start:key_end].decode()


def _note(changed: dict, item: int, key: str, dropped: bool) -> None:
    entry = changed.get(item)
    if entry is None:
        entry = changed[item] = ([], [])
    entry[1 if dropped else 0].append(key)


#: encoded summary attributes by (signal, counts) or (signal, masked keys, count, dropped keys, count); bounded
_SUMMARY_CACHE: dict = {}


def _summaries(engine: RedactionEngine, sig: int, loc: Located, changed: dict, edits: list, labels: bool) -> None:
    """Append the summary attributes to each changed span or log record, as ``redaction.otlp._summarize`` does."""
    items = memoryview(loc.items).cast("q")
    cache = _SUMMARY_CACHE
    tag = _ATTR_TAG[sig]
    append = edits.append
    for item, entry in changed.items():
        base = item * ITEM_SITE  # content start, content end, flags
        if items[base + 2] & HAS_SUMMARY:
            raise NeedsObjectPath("a changed item already carries redaction summary attributes")
        if labels:
            masked, dropped = entry
            key = (sig, tuple(sorted(set(masked))), len(masked), tuple(sorted(set(dropped))), len(dropped))
        else:
            key = (sig, entry)
        encoded = cache.get(key)
        if encoded is None:
            if labels:
                encoded = _summary(tag, len(masked), len(dropped), masked, dropped)
            else:
                encoded = _summary(tag, entry % _DROPPED, entry // _DROPPED, None, None)
            if len(cache) >= 1024:
                cache.clear()
            cache[key] = encoded
        end = items[base + 1]
        append((end, end, encoded, items[base]))


def _summary(tag: bytes, n_masked: int, n_dropped: int, masked: "list | None", dropped: "list | None") -> bytes:
    """The summary attributes: the counts, and with the keys (``debug``) their sorted names."""
    parts = []
    for keys_name, n, keys, count_name in ((MASKED_KEYS, n_masked, masked, MASKED_COUNT),
                                           (REDACTED_KEYS, n_dropped, dropped, REDACTED_COUNT)):
        if not n:
            continue
        parts.append(length_delimited(tag, _kv(count_name, _int_value(n))))
        if keys is not None:
            parts.append(length_delimited(tag, _kv(keys_name, _string_value(",".join(sorted(set(keys))).encode()))))
    return b"".join(parts)
