"""A buffered trace's fields: the C type (``_trace.c``) and its pure-Python twin start the same and hold
what the processor's loop writes; the C one is never walked by the garbage collector."""

from __future__ import annotations

import gc
import os
import sys

import pytest

from sidecar.processors.tail_sampling import _trace_py, buffer
from sidecar.processors.tail_sampling.buffer import TRACE_OVERHEAD, Trace

try:
    from sidecar.processors.tail_sampling import _trace as _c
except ImportError:  # not built: the twin alone is tested
    _c = None

BASES = [pytest.param(_trace_py.TraceBase, id="python")] + \
    ([pytest.param(_c.TraceBase, id="c")] if _c is not None else [])

DEFAULTS = {"root_deadline": None, "spans_key": None, "spans": None, "more_spans": None, "logs_key": None,
            "logs": None, "more_logs": None, "n_spans": 0, "n_logs": 0, "nbytes": TRACE_OVERHEAD,
            "status_mask": 0, "start": 0, "end": 0, "matched": 0, "rv": None, "segment": -1}


def _subclass(base):
    return type("T", (base,), {"__slots__": ()})


def test_the_extension_is_built_where_ci_installs_a_compiler():
    if os.environ.get("CI") == "true" and not os.environ.get("SIDECAR_PURE_PYTHON"):
        assert _c is not None and buffer._fields is _c


@pytest.mark.parametrize("base", BASES)
def test_a_new_trace_has_its_id_its_arrival_and_the_defaults(base):
    t = _subclass(base)(b"\x01" * 16, 12.5)
    assert (t.trace_id, t.first_seen) == (b"\x01" * 16, 12.5)
    assert {k: getattr(t, k) for k in DEFAULTS} == DEFAULTS
    assert set(base.__slots__ if base is _trace_py.TraceBase else DEFAULTS) >= set(DEFAULTS)


@pytest.mark.parametrize("base", BASES)
def test_fields_hold_what_the_loop_writes(base):
    t = _subclass(base)(b"\x02" * 16, 0.0)
    top = 2 ** 64 - 1  # a span's fixed64 times, as a hostile sender may set them
    t.start, t.end, t.status_mask, t.matched, t.rv = 1, top, 0b110, 1 << 70, 2 ** 56 - 1
    t.spans_key, t.spans, t.n_spans, t.nbytes, t.segment = ("r", "s", ""), (b"a",), 1, 10 ** 12, 7
    t.root_deadline = 3.25
    assert (t.start, t.end, t.status_mask, t.matched, t.rv) == (1, top, 0b110, 1 << 70, 2 ** 56 - 1)
    assert (t.spans_key, t.spans, t.n_spans, t.nbytes, t.segment) == (("r", "s", ""), (b"a",), 1, 10 ** 12, 7)
    assert t.root_deadline == 3.25
    with pytest.raises(AttributeError):
        t.colour = "red"  # no other attributes: a typo in the loop fails loudly


@pytest.mark.skipif(_c is None or buffer._fields is not _c, reason="the C extension is not built or switched off")
def test_the_c_trace_is_not_tracked_and_lets_go_of_what_it_holds():
    held = [b"x"]
    before = sys.getrefcount(held)
    t = Trace(b"\x03" * 16, 1.0)
    t.more_spans = [(("r", "s", ""), held)]
    t.spans = t.logs = t.rv = t.matched = held
    assert not gc.is_tracked(t)
    assert sys.getrefcount(held) == before + 5
    del t
    assert sys.getrefcount(held) == before


def test_traces_are_made_by_the_chosen_base():
    assert isinstance(Trace(b"\x05" * 16, 0.0), buffer._fields.TraceBase)
