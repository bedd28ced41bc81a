"""The pure-Python half of wire-level redaction (``sidecar.wire_redaction``): the same two functions as
``sidecar/_wire_redact.c``.

    locate(request: bytes, signal: int, decisions: dict, scan: object) -> Located
    splice(request: bytes, edits: list[tuple]) -> bytes

``locate`` walks the encoded request once and reports every string redaction looks at, with its
position (see ``sidecar._wire_redact_types.Located``). ``splice`` applies byte-range edits and
rewrites the length prefix of every message that encloses one, copying everything else as it is.
Malformed input raises ValueError. The tests run one test class against both halves.
"""

from __future__ import annotations

from array import array

from sidecar._wire_py import _LEN, _bad, _skip, _tag, _varint
from sidecar.protowire import encode_varint
from sidecar._wire_redact_types import (
    BODY_EMPTY,
    BODY_LABEL,
    HAS_SUMMARY,
    LOGS,
    METRICS,
    SITE,
    STATUS_LABEL,
    TRACES,
    Located,
)

_MAX_DEPTH = 100
_SUMMARY_PREFIX = b"redaction."
#: metric data field -> (data point attributes field, exemplars field or 0)
_POINT_FIELDS = {5: (7, 5), 7: (7, 5), 9: (9, 8), 10: (1, 11), 11: (7, 0)}


def _len_field(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """(content start, content end) of a length-delimited value whose tag was just read."""
    n, start = _varint(data, pos, end)
    if n > end - start:
        raise _bad("length past the end of the buffer")
    return start, start + n


class _Locator:
    __slots__ = ("data", "decisions", "scan", "texts", "text_end", "text_ends", "firsts", "last", "occurrences", "sites",
                 "names", "name_sites", "keys", "kv_sites", "items")

    def __init__(self, data: bytes, decisions: dict, scan: object):
        self.data, self.decisions, self.scan = data, decisions, scan
        self.texts: list = []  # each distinct text once
        self.text_end = 0
        self.text_ends: list = []
        self.firsts: list = []  # per distinct text: its first occurrence
        self.last: dict = {}  # text -> its last occurrence so far
        self.occurrences = 0
        self.sites: list = []
        self.names: list = []
        self.name_sites: list = []
        self.keys: list = []
        self.kv_sites: list = []
        self.items: list = []

    # --- generic walks ------------------------------------------------------------------------

    def children(self, pos: int, end: int, wanted) -> list[tuple[int, int, int, int, int]]:
        """(field, tag start, length start, content start, content end) of each length-delimited field in ``wanted``."""
        data = self.data
        out = []
        while pos < end:
            tag_start = pos
            field, wt, pos = _tag(data, pos, end)
            if wt == _LEN:
                cs, ce = _len_field(data, pos, end)
                if field in wanted:
                    out.append((field, tag_start, pos, cs, ce))
                pos = ce
            else:
                pos = _skip(data, pos, end, field, wt)
        return out

    def attrs(self, pos: int, end: int, field: int, item: int, depth: int, top: bool = False) -> int:
        """The KeyValues in ``field`` of the message at [pos, end); HAS_SUMMARY when ``top`` and one is a summary."""
        flags = 0
        for _, ts, ls, cs, ce in self.children(pos, end, (field,)):
            flags |= self.kv(ts, ls, cs, ce, item, depth, top)
        return flags

    def kv(self, kv_start: int, ls: int, cs: int, ce: int, item: int, depth: int, top: bool) -> int:
        if depth > _MAX_DEPTH:
            raise _bad("nested too deep")
        data = self.data
        key_start = key_end = cs
        values = []
        for field, _, _, vs, ve in self.children(cs, ce, (1, 2)):
            if field == 1:
                key_start, key_end = vs, ve
            else:
                values.append((vs, ve))
        raw_key = data[key_start:key_end]
        key = raw_key.decode()
        decision = self.decisions.get(key)
        if decision is self.scan:
            for vs, ve in values:
                self.value(vs, ve, kv_start, ce, item, key_start, key_end, depth + 1)
        else:
            first = self.occurrences
            record = len(self.kv_sites)
            self.keys.append(key)
            self.kv_sites.extend((kv_start, ls, ce, item, first, first))
            if decision is None:
                for vs, ve in values:
                    self.value(vs, ve, kv_start, ce, item, key_start, key_end, depth + 1)
                self.kv_sites[record + 5] = self.occurrences
        return HAS_SUMMARY if top and raw_key.startswith(_SUMMARY_PREFIX) else 0

    def value(self, pos: int, end: int, drop_start: int, drop_end: int, item: int, key_start: int, key_end: int,
              depth: int) -> None:
        """An AnyValue at [pos, end); a string in it is removed with [drop_start, drop_end) (``key_end``
        BODY_EMPTY: that range is a log body from its length prefix, which a drop sets to zero)."""
        if depth > _MAX_DEPTH:
            raise _bad("nested too deep")
        for field, ts, ls, cs, ce in self.children(pos, end, (1, 5, 6)):
            if field == 1:
                if ce > cs:
                    self.text(ls, cs, ce, drop_start, drop_end, item, key_start, key_end)
            elif field == 5:
                for _, es, _, vs, ve in self.children(cs, ce, (1,)):
                    self.value(vs, ve, es, ve, item, key_start, BODY_LABEL if key_end == BODY_EMPTY else key_end,
                               depth + 1)
            else:
                self.attrs(cs, ce, 1, item, depth + 1)

    def text(self, ls: int, cs: int, ce: int, drop_start: int, drop_end: int, item: int, key_start: int,
             key_end: int) -> None:
        text = self.data[cs:ce]
        occurrence = self.occurrences
        self.occurrences += 1
        last = self.last.get(text)
        if last is None:
            self.texts.append(text)
            self.text_end += ce - cs + 1
            self.text_ends.append(self.text_end)
            self.firsts.append(occurrence)
        else:
            self.sites[last * SITE + SITE - 1] = occurrence
        self.last[text] = occurrence
        self.sites.extend((ls, ce, drop_start, drop_end, item, key_start, key_end, -1))

    def name(self, ls: int, cs: int, ce: int, item: int, is_event: int) -> None:
        if ce > cs:
            self.names.append(self.data[cs:ce])
            self.name_sites.extend((ls, ce, item, is_event))

    def holder(self, pos: int, end: int, field: int) -> None:
        """A resource (attributes: 1) or a scope (attributes: 3)."""
        self.attrs(pos, end, field, -1, 0)

    def groups(self, item) -> None:
        """request -> resource groups -> scope groups -> ``item(pos, end)`` for each item (field 2 of a scope group)."""
        for _, _, _, rs, re_ in self.children(0, len(self.data), (1,)):
            for field, _, _, cs, ce in self.children(rs, re_, (1, 2)):
                if field == 1:
                    self.holder(cs, ce, 1)
                    continue
                for f2, _, _, ss, se in self.children(cs, ce, (1, 2)):
                    if f2 == 1:
                        self.holder(ss, se, 3)
                    else:
                        item(ss, se)

    # --- the signals --------------------------------------------------------------------------

    def span(self, pos: int, end: int) -> None:
        item = len(self.items) // 3
        flags = 0
        for field, ts, ls, cs, ce in self.children(pos, end, (5, 9, 11, 13, 15)):
            if field == 5:
                self.name(ls, cs, ce, item, 0)
            elif field == 9:
                flags |= self.kv(ts, ls, cs, ce, item, 0, True)
            elif field == 11:
                for f2, t2, l2, c2, e2 in self.children(cs, ce, (2, 3)):
                    if f2 == 2:
                        self.name(l2, c2, e2, item, 1)
                    else:
                        self.kv(t2, l2, c2, e2, item, 0, False)
            elif field == 13:
                self.attrs(cs, ce, 4, item, 0)
            else:
                for _, t2, l2, c2, e2 in self.children(cs, ce, (2,)):
                    if e2 > c2:
                        self.text(l2, c2, e2, t2, e2, item, STATUS_LABEL, STATUS_LABEL)
        self.items.extend((pos, end, flags))

    def log_record(self, pos: int, end: int) -> None:
        item = len(self.items) // 3
        flags = 0
        for field, ts, ls, cs, ce in self.children(pos, end, (5, 6)):
            if field == 5:  # a dropped body string empties the body (every value in it), as clearing the body does
                self.value(cs, ce, ls, ce, item, BODY_LABEL, BODY_EMPTY, 0)
            else:
                flags |= self.kv(ts, ls, cs, ce, item, 0, True)
        self.items.extend((pos, end, flags))

    def metric(self, pos: int, end: int) -> None:
        for field, _, _, cs, ce in self.children(pos, end, tuple(_POINT_FIELDS)):
            attrs_field, exemplars_field = _POINT_FIELDS[field]
            for _, _, _, ps, pe in self.children(cs, ce, (1,)):
                for f2, t2, l2, c2, e2 in self.children(ps, pe, (attrs_field, exemplars_field)):
                    if f2 == attrs_field:
                        self.kv(t2, l2, c2, e2, -1, 0, False)
                    else:
                        self.attrs(c2, e2, 7, -1, 0)


def locate(request: bytes, signal: int, decisions: dict, scan: object) -> Located:
    """Every string of ``request`` redaction looks at (see ``Located``)."""
    if not isinstance(request, bytes):
        raise TypeError(f"request must be bytes, not {type(request).__name__}")
    if not isinstance(decisions, dict):
        raise TypeError("decisions must be a dict")
    loc = _Locator(request, decisions, scan)
    if signal == TRACES:
        loc.groups(loc.span)
    elif signal == LOGS:
        loc.groups(loc.log_record)
    elif signal == METRICS:
        loc.groups(loc.metric)
    else:
        raise ValueError(f"unknown signal {signal!r}")
    return Located(b"\n".join(loc.texts), _int64s(loc.text_ends), _int64s(loc.sites), loc.names,
                   _int64s(loc.name_sites), loc.keys, _int64s(loc.kv_sites), _int64s(loc.items), _int64s(loc.firsts))


def _int64s(values: list) -> bytes:
    return array("q", values).tobytes()


# --- splice ---------------------------------------------------------------------------------------




def _order(edit) -> tuple:
    """Replacements by start; an append sorts with the replacements at its position, before them,
    the innermost message's first."""
    start, _, _, owner = edit
    return (start, 0, -owner) if owner >= 0 else (start, 1, 0)


def splice(request: bytes, edits: list) -> bytes:
    """``request`` with each edit applied and every enclosing length prefix rewritten.

    An edit is ``(start, end, data, owner)``: with ``owner == -1`` it replaces bytes [start, end);
    otherwise it appends ``data`` to the message whose content starts at ``owner`` and ends at
    ``start == end``. Edits may come in any order but must not overlap, and a replacement must
    cover whole fields, or a length-delimited field from its length prefix to its end.
    """
    if not isinstance(request, bytes):
        raise TypeError(f"request must be bytes, not {type(request).__name__}")
    if not edits:
        return request
    size = len(request)
    for start, end, data, owner in edits:
        if not isinstance(data, bytes):
            raise TypeError("an edit's data must be bytes")
        if start < 0 or end < start or end > size or owner >= size or owner < -1:
            raise ValueError("edits overlap or lie outside the request")
    edits = sorted(edits, key=_order)
    out: list[bytes] = []
    _splice(request, 0, len(request), edits, 0, len(edits), out)
    return b"".join(out)


def _splice(data: bytes, pos: int, end: int, edits: list, i: int, j: int, out: list) -> None:
    """Write the message at [pos, end) with ``edits[i:j]`` (all inside it) applied."""
    tail = []
    copied = cursor = pos
    while i < j:
        edit = edits[i]
        if edit[3] == pos:
            if edit[0] != end:
                raise ValueError("an append must be at the end of its message")
            tail.append(edit[2])
            i += 1
            continue
        key = edit[0] if edit[3] < 0 else edit[3]
        while True:  # the field holding the edit
            if cursor >= end or key < cursor:
                raise ValueError("edits overlap or lie outside the request")
            fs = cursor
            field, wt, cursor = _tag(data, cursor, end)
            if wt == _LEN:
                ls = cursor
                cs, cursor = _len_field(data, cursor, end)
            else:
                ls = cs = -1
                cursor = _skip(data, cursor, end, field, wt)
            if key < cursor:
                break
        fe = cursor
        m = i
        nested = cs >= 0
        while m < j:
            e = edits[m]
            if e[3] < 0:
                if e[0] >= fe:
                    break
                if e[0] < cs:
                    nested = False
            elif not fs <= e[3] < fe or e[3] == pos:
                break
            m += 1
        out.append(data[copied:fs])
        if nested:
            sub: list[bytes] = []
            _splice(data, cs, fe, edits, i, m, sub)
            content = b"".join(sub)
            out.append(data[fs:ls])
            out.append(encode_varint(len(content)))
            out.append(content)
        else:
            p = fs
            for e in edits[i:m]:
                if e[3] >= 0 or e[0] < p or e[1] > fe or e[1] < e[0]:
                    raise ValueError("edits overlap or split a field")
                out.append(data[p:e[0]])
                out.append(e[2])
                p = e[1]
            out.append(data[p:fe])
        copied = fe
        i = m
    out.append(data[copied:end])
    out.extend(tail)
