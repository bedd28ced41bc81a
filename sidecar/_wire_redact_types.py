"""The result of the wire-level string locator (``sidecar.wire_redaction``), shared by its C and
pure-Python halves: the C extension imports this class, so both halves return the same type.

Positions are byte offsets into the request. Several ints describe one thing, flat, as the bytes
of native int64s (read them with ``memoryview(sites).cast("q")[i * SITE:(i + 1) * SITE]``), so the
C half builds no object per position.
"""

from __future__ import annotations

from typing import NamedTuple

#: ints per occurrence of a text in ``Located.sites``: len_start, end, drop_start, drop_end, item, key_start,
#: key_end, next (the next occurrence of the same text, -1 after the last)
SITE = 8
#: ints per name in ``Located.name_sites``: len_start, end, item, is_event
NAME_SITE = 4
#: ints per KeyValue in ``Located.kv_sites``: start (its tag), length start, end, item, first_text, end_text
KV_SITE = 6
#: ints per item (span / log record) in ``Located.items``: content start, content end, flags
ITEM_SITE = 3
#: ``key_start`` of a text that is a log body (or inside one, outside any map), and of a status message
BODY_LABEL, STATUS_LABEL = -1, -2
#: ``key_end`` of a text that is the log body itself: its drop range runs from the body's length prefix
#: to its end, and a drop writes a zero length there (an empty body, as clearing it does)
BODY_EMPTY = -3
#: ``Located.items`` flag: the item already has a ``redaction.*`` attribute (written by an earlier stage)
HAS_SUMMARY = 1
#: The ``signal`` argument of ``locate``.
TRACES, LOGS, METRICS = 0, 1, 2


class Located(NamedTuple):
    """Every string of one request that redaction looks at, and where it sits on the wire.

    The texts are the non-empty string values (attribute values at any depth of maps and arrays,
    log bodies, span status messages). Each distinct text is in ``text`` once, in the order of its
    first occurrence, joined with newlines (as ``b"\\n".join(texts)``, ready for one RE2 scan; a
    request repeats most of its strings on every span); text *i* ends one byte before
    ``text_ends[i]`` and first occurs as occurrence ``firsts[i]``. For each occurrence, in wire
    order, ``sites`` holds where its length prefix starts and its content ends in the request (a
    replacement rewrites that range), the range to remove when a rule drops it (its KeyValue, its
    array element, or the string field itself), its item (-1 for resources, scopes and metric
    points), where its key is in the request (or a ``*_LABEL``) and the next occurrence of the same
    text (-1 after the last).

    ``names``: non-empty span and event names, for name mode. ``keys``: the keys of the KeyValues
    (at any depth) whose decision in the ``decisions`` map passed in was not the ``scan`` marker; an
    unknown key's value is walked too (``first_text``/``end_text`` say which texts it holds), a known
    one's is not (``first_text``/``end_text`` count occurrences). ``items``: each span or log
    record, in order.
    """

    text: bytes
    text_ends: bytes
    sites: bytes
    names: list
    name_sites: bytes
    keys: list
    kv_sites: bytes
    items: bytes
    firsts: bytes
