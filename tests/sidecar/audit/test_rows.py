"""The store rows the C pass makes (``sidecar.wire.audit_rows``) are the rows of the records ``extract`` makes.

What a user relies on: a record reads back the same whichever path made it. The journal's indexer asks
``audit_rows`` first and falls back to :func:`sidecar.audit.records.extract` when it answers None, so for
every request ``audit_rows`` answers either None or exactly ``[row_of(record) for record in extract(...)]``.
Randomized requests cover what records read: several resources and services, entry and inference spans in
any order, traces without their entry span (fragments), every scalar type and arrays in every attribute a
record reads, tags, payloads (tensor ones too), replay spans, events, statuses, times past 2262 and ends
before starts, non-ASCII text. The pure-Python half answers None (the general path), so there the test
shows the fallback; with the C half it also checks that the usual request does not fall back.
"""

import gc
import math
import random

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from contract import attributes as attr
from sidecar import wire
from sidecar.audit.records import PARAMETERS, ROW_LAYOUT, TENSOR_FORMAT, extract, reduce
from sidecar.audit.store import COLUMNS, _record, _row

_TEXT = ["", "a", "resnet", "v2", "ünïcødé ✓", "tab\there", 'quo"te\\', "x" * 300, "emoji 🚀", "None", "0"]
_SCALAR_KEYS = [attr.REQUEST_ID, attr.USER_ID, attr.ML_MODEL_ID, attr.ML_MODEL_VERSION, attr.GEN_AI_REQUEST_MODEL,
                "error.type", "http.response.status_code", "http.status_code", *PARAMETERS]
_PAYLOAD_KEYS = [attr.ML_INPUT_PAYLOAD, attr.GEN_AI_PROMPT, "http.request.body", attr.ML_OUTPUT_PAYLOAD,
                 attr.GEN_AI_COMPLETION, "http.response.body"]


def _scalar(rng: random.Random, v: AnyValue, arrays: bool, odd: float = 0.2) -> None:
    """A scalar of any type; ``arrays``: maybe a list of them; ``odd``: the share of maps, bytes, nested lists."""
    kind = rng.random() * (0.8 + (0.13 if arrays else 0) + odd)
    if kind < 0.4:
        v.string_value = rng.choice(_TEXT)
    elif kind < 0.55:
        v.int_value = rng.choice([0, 1, 200, 399, 400, 503, -7, 2**62])
    elif kind < 0.65:
        v.double_value = rng.choice([0.0, 0.7, -1.5, 1e300, math.inf, -math.inf, math.nan, 3.0])
    elif kind < 0.75:
        v.bool_value = rng.random() < 0.5
    elif kind < 0.8:
        pass  # an empty AnyValue: None
    elif kind < 0.93 and arrays:
        for _ in range(rng.randint(0, 3)):
            _scalar(rng, v.array_value.values.add(), False, 0)
        if rng.random() < odd:
            v.array_value.values.add().array_value.values.add().string_value = "nested"
    elif kind < 0.97:
        kv = v.kvlist_value.values.add()
        kv.key, kv.value.string_value = "k", "v"
    else:
        v.bytes_value = b"\x00\xff"


def _payload(rng: random.Random, v: AnyValue, odd: float) -> None:
    if rng.random() < 0.6:
        v.string_value = rng.choice([f'{{"format": "{TENSOR_FORMAT}", "tensors": []}}', f'{{"format": "{TENSOR_FORMAT}"}}',
                                     '{"x": 1}', "é" * 70 + TENSOR_FORMAT, "é" * 50 + TENSOR_FORMAT, "plain text"])
    else:
        _scalar(rng, v, True, odd)


_JSON_KEYS = frozenset(PARAMETERS) | frozenset(_PAYLOAD_KEYS)  # what records keep as JSON: lists too


def _attributes(rng: random.Random, attrs, inference: bool, odd: float) -> None:
    keys = rng.sample(_SCALAR_KEYS, rng.randint(0, 6))
    if inference:
        keys.append(rng.choice([attr.ML_MODEL_ID, attr.GEN_AI_REQUEST_MODEL]))
    keys += rng.sample(_PAYLOAD_KEYS, rng.choice([0, 1, 2, 3]))
    keys += [f"tag.{rng.choice(['intent', 'tenant', 'ü', 'a', 'b'])}" for _ in range(rng.choice([0, 0, 1, 2, 3]))]
    keys += [f"tag.t{i}" for i in range(12 if rng.random() < odd else 0)]
    if rng.random() < odd:
        keys.append("replay")
    if rng.random() < 0.1 and keys:
        keys.append(rng.choice(keys))  # a repeated key: the last one counts
    keys += ["unrelated.key"] * rng.randint(0, 2)
    for key in keys:
        kv = attrs.add(key=key)
        if key in _PAYLOAD_KEYS:
            _payload(rng, kv.value, odd)
        elif key == "replay":
            kv.value.bool_value = rng.random() < 0.7
        elif key in (attr.ML_MODEL_ID, attr.GEN_AI_REQUEST_MODEL, attr.ML_MODEL_VERSION) and rng.random() < 0.7:
            kv.value.string_value = rng.choice(["resnet", "llm", "", "2.4.1"])
        else:
            _scalar(rng, kv.value, key in _JSON_KEYS or rng.random() < odd, odd)


def _request(rng: random.Random) -> bytes:
    """One request; a third are plain (every trace has its entry span first, no odd value), the rest not."""
    req = ExportTraceServiceRequest()
    odd = rng.choice([0.0, 0.03, 0.2])
    traces = [rng.getrandbits(128).to_bytes(16, "big") for _ in range(rng.randint(1, 5))]
    entered: set[bytes] = set()
    for _ in range(rng.randint(1, 3)):
        rs = req.resource_spans.add()
        service = rng.random()
        if service < 0.8:
            rs.resource.attributes.add(key="service.name").value.string_value = rng.choice(["a", "b", "ü"])
        elif service < 0.9:
            rs.resource.attributes.add(key="service.name").value.int_value = 3
        for _ in range(rng.randint(1, 2)):
            ss = rs.scope_spans.add()
            for _ in range(rng.randint(0, 8)):
                trace = rng.choice(traces)
                sp = ss.spans.add(trace_id=trace, span_id=rng.getrandbits(64).to_bytes(8, "big"),
                                  name=rng.choice(_TEXT[:6]))
                role = rng.random() if odd or trace in entered else 0.0
                entered.add(trace)
                if role < 0.35:
                    sp.kind = rng.choice([2, 5, 2])
                    if rng.random() < 0.5:
                        sp.parent_span_id = b"\x01" * 8
                elif role < 0.45:
                    sp.kind = 1  # a root span of a batch job
                else:
                    sp.kind = rng.choice([1, 3])
                    sp.parent_span_id = b"\x02" * 8
                sp.start_time_unix_nano = rng.choice([0, 1_750_000_000_000_000_000, 2**64 - 1, 2**63 + 5])
                sp.end_time_unix_nano = max(0, min(2**64 - 1, sp.start_time_unix_nano
                                                   + rng.choice([-10, 0, 41_700_000, 2**63])))
                if rng.random() < 0.3:
                    sp.status.code = rng.choice([0, 1, 2, 2, 7])
                    sp.status.message = rng.choice(["", "boom", "é" * 250])
                _attributes(rng, sp.attributes, role >= 0.45 and rng.random() < 0.7, odd)
                if rng.random() < odd / 2:
                    ev = sp.events.add(name="gen_ai.content.prompt")
                    ev.attributes.add(key=attr.GEN_AI_PROMPT).value.string_value = "hello"
    return req.SerializeToString()


def _rows(data: bytes) -> tuple[list[tuple], bool]:
    """What extract makes, as rows, and whether it left fragments."""
    extraction = extract(data)
    return [_row(rec, 42) for rec in extraction.records], bool(extraction.fragments)


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y))
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("seed", range(6))
def test_rows_are_the_rows_of_the_records_extract_makes(seed):
    rng = random.Random(seed)
    answered = 0
    for _ in range(400):
        data = _request(rng)
        if rng.random() < 0.5:
            data = reduce(data)[0]  # what the audit branch journals
        expected, fragments = _rows(data)
        rows = wire.audit_rows(data, ROW_LAYOUT, 42)
        if rows is None:
            continue
        answered += 1
        assert not fragments, "a request with fragments needs the general path"
        assert len(rows) == len(expected)
        for got, want in zip(rows, expected):
            assert _same(got, want), "\n".join(f"{c}: {g!r} != {w!r}" for c, g, w in zip(COLUMNS, got, want)
                                             if g != w)
        # as the SQLite store asks for them: a missing text as 0, as _row puts it, and read back as None
        zeroed = wire.audit_rows(data, ROW_LAYOUT, 42, 0)
        assert all(_same(got, _row(rec, 42, 0)) for got, rec in zip(zeroed, extract(data).records, strict=True))
        assert all(_same(got, tuple(0 if v is None else v for v in row)) for got, row in zip(zeroed, rows, strict=True))
        assert [_record(got) for got in zeroed[:3]] == [_record(row) for row in rows[:3]]
    if wire.IMPLEMENTATION == "c":
        assert answered > 100, "the C pass left most requests to the general path"
    else:
        assert answered == 0


def _inference_request(shapes_as_arrays: bool) -> bytes:
    """Requests as instrumentation.torch sends them: a server span and forward spans with lists of shapes."""
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "classifier"
    ss = rs.scope_spans.add()
    for t in range(20):
        tid = t.to_bytes(16, "big")
        server = ss.spans.add(trace_id=tid, span_id=b"s" * 8, name="POST /predict", kind=2,
                              start_time_unix_nano=1, end_time_unix_nano=41_700_001)
        server.attributes.add(key=attr.REQUEST_ID).value.string_value = f"req-{t}"
        server.attributes.add(key="http.response.status_code").value.int_value = 200
        for i in range(3):
            fwd = ss.spans.add(trace_id=tid, span_id=bytes([i]) * 8, parent_span_id=b"s" * 8, name="ml.forward",
                               kind=1, start_time_unix_nano=2, end_time_unix_nano=3)
            fwd.attributes.add(key=attr.ML_MODEL_ID).value.string_value = "resnet"
            fwd.attributes.add(key=attr.ML_MODEL_VERSION).value.string_value = "2.4.1"
            shapes = fwd.attributes.add(key=attr.ML_INPUT_SHAPES).value
            if shapes_as_arrays:
                shapes.array_value.values.add().string_value = "8x3x224x224"
            else:
                shapes.string_value = "8x3x224x224"
    return req.SerializeToString()


@pytest.mark.skipif(wire.IMPLEMENTATION != "c", reason="the pure-Python half leaves every request to extract")
@pytest.mark.parametrize("arrays", [False, True])
def test_the_usual_request_is_made_in_the_c_pass(arrays):
    data = _inference_request(arrays)
    rows = wire.audit_rows(data, ROW_LAYOUT, 42)
    assert rows is not None and rows == _rows(data)[0]
    assert not any(gc.is_tracked(row) for row in rows)  # texts and numbers: the cyclic collector skips them
    assert rows[0][COLUMNS.index("parameters")] == ('{"input_shapes": ["8x3x224x224"]}' if arrays
                                                    else '{"input_shapes": "8x3x224x224"}')


def test_damaged_bytes_get_rows_or_none_and_never_a_crash():
    """A journal entry damaged on disk: the C pass reads only within bounds and answers None (extract then says
    what is wrong, and the entry is kept with its error) or rows; it never crashes nor raises."""
    rng = random.Random(99)
    answered = 0
    for _ in range(1500):
        data = bytearray(_request(rng))
        for _ in range(rng.randint(1, 4)):
            op, i = rng.random(), rng.randrange(max(1, len(data)))
            if op < 0.5 and data:
                data[i] = rng.randrange(256)
            elif op < 0.75:
                data[i:i] = rng.randbytes(rng.randint(1, 9))
            else:
                del data[i:i + rng.randint(1, 9)]
        rows = wire.audit_rows(bytes(data), ROW_LAYOUT, 42)
        assert rows is None or all(isinstance(r, tuple) and len(r) == len(COLUMNS) for r in rows)
        answered += rows is not None
    assert answered > (50 if wire.IMPLEMENTATION == "c" else -1)
