"""Wire-level redaction (``sidecar.wire_redaction``): its two halves (C ``sidecar._wire_redact``, Python
``sidecar._wire_redact_py``) against the object-level redactor (``redaction.otlp.OtlpRedactor``).

One test class runs once per implementation (the PyTest / CTest pattern of CPython's test_json). The
randomized test puts PII in random places of random traces, logs and metrics (names, status
messages, nested maps and arrays, bodies, exemplars) under configs with key rules, drop, hash, mask,
replace, an allowlist and every summary level, and holds the wire result to the object result,
parsed message for parsed message, counts included.
"""

from __future__ import annotations

import random
import sys

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from redaction import RedactionConfig, RedactionEngine
from redaction.otlp import OtlpRedactor
from sidecar import _wire_redact_py, wire_redaction
from sidecar._wire_redact_types import LOGS, METRICS, SITE, TRACES, Located

try:
    from sidecar import _wire_redact as _c
except ImportError:  # pragma: no cover - the extension is built by `pip install -e .`
    _c = None

IMPLEMENTATIONS = [pytest.param(_wire_redact_py, id="python"),
                   pytest.param(_c, id="c", marks=pytest.mark.skipif(_c is None, reason="C extension not built"))]
TYPES = {"traces": ExportTraceServiceRequest, "logs": ExportLogsServiceRequest, "metrics": ExportMetricsServiceRequest}
HMAC_ENV = {"REDACTION_HMAC_KEY": "test-key"}

PII = ["alice@example.com", "card 4111 1111 1111 1111 ok", "call (415) 555-0132 now", "Bearer abcdefgh12345678",
       "key sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8t here", "from 10.1.2.3", "DROPME42", "SECRET-ABC and more",
       "HASHME-7 in text", "eyJhbGciOi.eyJzdWIiOi.sig", "ssn 123-45-6789"]
#: where a request's texts, scanned joined (``RedactionEngine.scan_joined``), could read differently from each alone
JOIN_EDGES = ["(415) 555-0132", "10.1.2.3", "line one\ncall (415) 555-0132", "a@b.co\n", "DROPME42\nnext"]
PLAIN = ["", "resnet50", "v3", "POST /v1/predict", "user-17", "8x3x224x224", "1.2.3", "token_count", "ünïcode ✓"]
KEYS = ["user.id", "prompt", "http.route", "ml.model.id", "authorization", "x-api-key", "db.password",
        "session_id", "access_token", "gen_ai.usage.input_tokens", "internal.trace", "notes", "allowed.one"]

CONFIGS = {
    "default": {},
    "debug": {"summary": "debug"},
    "silent": {"summary": "silent"},
    "rules": {"summary": "debug",
              "blocked_values": [{"name": "dropme", "pattern": "DROPME[0-9]+", "action": "drop"},
                                 {"name": "secret", "pattern": "SECRET-[A-Z]+", "action": "replace",
                                  "replacement": "<s>"},
                                 {"name": "hashme", "pattern": "HASHME-[0-9]+", "action": "hash"}],
              "blocked_key_patterns": [{"name": "internal", "pattern": "^internal\\.", "action": "drop"},
                                       {"name": "notes", "pattern": "^notes$", "action": "hash"}],
              "detectors": {"phone": {"action": "drop"}, "ipv4": {"action": "hash"}}},
    "allowlist": {"allow_all_keys": False, "summary": "debug", "disallowed_key_action": "drop",
                  "allowed_keys": ["user.id", "prompt", "http.route", "allowed.one", "ml.model.id"],
                  "ignored_keys": ["notes"]},
    # an anchored user pattern: texts cannot be scanned joined (the engine's batch-unsafe case)
    "anchored": {"summary": "debug", "blocked_values": [{"name": "lead", "pattern": "\\ADROPME[0-9]+\\z",
                                                         "action": "replace", "replacement": "<lead>"}]},
    # line anchors and a match that can run on into the next text: texts are scanned joined, with fallbacks
    "line-anchored": {"blocked_values": [{"name": "line", "pattern": "^DROPME[0-9]+$", "action": "replace",
                                          "replacement": "<line>"},
                                         {"name": "pair", "pattern": "now\\s*[A-Z]", "action": "drop"}]},
    "allowlist-hash": {"allow_all_keys": False, "disallowed_key_action": "hash", "allowed_keys": ["prompt"]},
}


def engine(name: str) -> RedactionEngine:
    return RedactionEngine(RedactionConfig(**CONFIGS[name]), environ=HMAC_ENV)


# --- random requests -------------------------------------------------------------------------------


def text(rng: random.Random) -> str:
    if rng.random() < 0.35:
        return rng.choice(PLAIN) + " " + rng.choice(PII) if rng.random() < 0.3 else rng.choice(PII)
    return rng.choice(PLAIN)


def any_value(rng: random.Random, v: AnyValue, depth: int = 0) -> None:
    r = rng.random()
    if r < 0.55 or depth > 2:
        v.string_value = text(rng)
    elif r < 0.62:
        v.int_value = rng.randrange(-5, 10**12)
    elif r < 0.67:
        v.bool_value = rng.random() < 0.5
    elif r < 0.72:
        v.double_value = rng.random()
    elif r < 0.76:
        v.bytes_value = text(rng).encode()
    elif r < 0.88:
        values = v.array_value.values
        for _ in range(rng.randrange(4)):
            any_value(rng, values.add(), depth + 1)
    else:
        attrs(rng, v.kvlist_value.values, depth + 1, n=3)


def attrs(rng: random.Random, kvs, depth: int = 0, n: int = 5) -> None:
    for _ in range(rng.randrange(n + 1)):
        kv = kvs.add(key=rng.choice(KEYS))
        if rng.random() < 0.95:
            any_value(rng, kv.value, depth)


def holder(rng: random.Random, resource, scope) -> None:
    attrs(rng, resource.attributes, n=3)
    scope.name = "lib"
    attrs(rng, scope.attributes, n=2)


def rand_traces(rng: random.Random) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    for _ in range(rng.randrange(1, 3)):
        rs = req.resource_spans.add()
        ss = rs.scope_spans.add()
        holder(rng, rs.resource, ss.scope)
        for _ in range(rng.randrange(6)):
            span = ss.spans.add(trace_id=rng.randbytes(16), span_id=rng.randbytes(8), name=text(rng), kind=2)
            attrs(rng, span.attributes)
            for _ in range(rng.randrange(3)):
                ev = span.events.add(name=text(rng), time_unix_nano=5)
                attrs(rng, ev.attributes, n=2)
            for _ in range(rng.randrange(2)):
                attrs(rng, span.links.add(trace_id=rng.randbytes(16), span_id=rng.randbytes(8)).attributes, n=2)
            if rng.random() < 0.4:
                span.status.code = 2
                span.status.message = text(rng)
            if rng.random() < 0.1:
                span.attributes.add(key="redaction.masked.count").value.int_value = 1
    return req


def rand_logs(rng: random.Random) -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    for _ in range(rng.randrange(1, 3)):
        rl = req.resource_logs.add()
        sl = rl.scope_logs.add()
        holder(rng, rl.resource, sl.scope)
        for _ in range(rng.randrange(6)):
            rec = sl.log_records.add(severity_number=9, severity_text="INFO", event_name=text(rng))
            if rng.random() < 0.9:
                any_value(rng, rec.body)
            attrs(rng, rec.attributes)
    return req


def rand_metrics(rng: random.Random) -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    sm = rm.scope_metrics.add()
    holder(rng, rm.resource, sm.scope)
    for _ in range(rng.randrange(5)):
        m = sm.metrics.add(name=text(rng), description=text(rng))
        attrs(rng, m.metadata, n=2)
        kind = rng.choice(["gauge", "sum", "histogram", "exponential_histogram", "summary"])
        points = getattr(m, kind).data_points
        for _ in range(rng.randrange(3)):
            dp = points.add()
            attrs(rng, dp.attributes, n=3)
            if kind != "summary":
                for _ in range(rng.randrange(2)):
                    attrs(rng, dp.exemplars.add().filtered_attributes, n=2)
    return req


RANDOM = {"traces": rand_traces, "logs": rand_logs, "metrics": rand_metrics}


def object_path(config: str, signal: str, data: bytes):
    eng = engine(config)
    msg = TYPES[signal].FromString(data)
    OtlpRedactor(eng).redact(signal, msg)
    return msg, eng.stats.snapshot()


# --- one class, two implementations ----------------------------------------------------------------


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request, monkeypatch):
    """``sidecar.wire_redaction`` running on one implementation."""
    monkeypatch.setattr(wire_redaction, "locate", request.param.locate)
    monkeypatch.setattr(wire_redaction, "splice", request.param.splice)
    return request.param


class TestWireRedaction:
    @pytest.mark.parametrize("config", sorted(CONFIGS))
    @pytest.mark.parametrize("signal", sorted(RANDOM))
    def test_same_output_as_the_object_path(self, impl, signal, config, monkeypatch):
        monkeypatch.setattr(sys.modules[__name__], "PII", PII + JOIN_EDGES)
        rng = random.Random(f"{signal}-{config}")
        wire_changed = 0
        for _ in range(60):
            data = RANDOM[signal](rng).SerializeToString()
            want, want_stats = object_path(config, signal, data)
            eng = engine(config)
            try:
                new = wire_redaction.redact(eng, signal, data)
            except wire_redaction.NeedsObjectPath:
                continue
            got = TYPES[signal].FromString(data if new is None else new)
            assert got == want, f"{signal}/{config}: wire and object redaction differ"
            assert eng.stats.snapshot() == want_stats
            wire_changed += new is not None
        assert wire_changed > 10, "the generator must put PII where rules change it"

    def test_locates_every_string_with_its_key(self, impl):
        req = ExportLogsServiceRequest()
        rec = req.resource_logs.add().scope_logs.add().log_records.add()
        rec.body.kvlist_value.values.add(key="inner").value.array_value.values.add().string_value = "a@b.co"
        rec.attributes.add(key="k").value.string_value = "v"
        rec.attributes.add(key="authorization").value.string_value = "secret"
        rec.attributes.add(key="new.key").value.string_value = "x"
        rec.attributes.add(key="again").value.string_value = "a@b.co"
        data = req.SerializeToString()
        from redaction._engine import SCAN
        loc = impl.locate(data, LOGS, {"inner": SCAN, "k": SCAN, "authorization": object(), "again": SCAN}, SCAN)
        assert isinstance(loc, Located)
        # the authorization value is not walked (its key decides); a text that occurs again is joined once
        assert loc.text == b"a@b.co\nv\nx"
        assert list(memoryview(loc.text_ends).cast("q")) == [7, 9, 11]
        assert list(memoryview(loc.firsts).cast("q")) == [0, 1, 2]
        assert loc.keys == ["authorization", "new.key"]
        sites = memoryview(loc.sites).cast("q")
        assert len(sites) == 4 * SITE
        labels = [data[sites[i * SITE + 5]:sites[i * SITE + 6]] for i in range(4)]
        assert labels == [b"inner", b"k", b"new.key", b"again"]
        assert [sites[i * SITE + SITE - 1] for i in range(4)] == [3, -1, -1, -1]  # a@b.co occurs again as the 4th
        assert [data[sites[i * SITE] + 1:sites[i * SITE + 1]] for i in range(4)] == [b"a@b.co", b"v", b"x", b"a@b.co"]
        assert len(memoryview(loc.items).cast("q")) == 3

    def test_every_occurrence_of_a_repeated_text_is_redacted(self, impl):
        """A text scanned once for the whole request: each occurrence gets the result, counted once each,
        except the ones a key rule took (their KeyValue goes as a whole)."""
        req = ExportTraceServiceRequest()
        spans = req.resource_spans.add().scope_spans.add().spans
        for i in range(3):
            span = spans.add(name=f"s{i}")
            span.attributes.add(key="user.id").value.string_value = "bob@example.com"
            span.attributes.add(key="db.password").value.array_value.values.add().string_value = "bob@example.com"
        data = req.SerializeToString()
        eng = engine("default")
        eng.key_action("user.id")  # db.password is not decided yet: locate walks its value too
        new = wire_redaction.redact(eng, "traces", data)
        got = ExportTraceServiceRequest.FromString(new).resource_spans[0].scope_spans[0].spans
        assert [kv.value.string_value for sp in got for kv in sp.attributes if kv.key == "user.id"] == ["[EMAIL]"] * 3
        assert [kv.value.string_value for sp in got for kv in sp.attributes if kv.key == "db.password"] == \
            ["[REDACTED]"] * 3
        assert eng.stats.get("email", "mask") == 3 and eng.stats.get("password", "replace") == 3
        want, want_stats = object_path("default", "traces", data)
        assert ExportTraceServiceRequest.FromString(new) == want and eng.stats.snapshot() == want_stats

    def test_a_locate_started_inside_another_gets_its_own_memory(self, impl):
        """Python code run during a locate (here a decisions key's ``__eq__``) may locate another request;
        both get what they get alone (the C half keeps its working memory from one call to the next)."""
        from redaction._engine import SCAN
        rng = random.Random("nested")
        outer, inner = rand_traces(rng).SerializeToString(), rand_logs(rng).SerializeToString()
        want_outer, want_inner = impl.locate(outer, TRACES, {}, SCAN), impl.locate(inner, LOGS, {}, SCAN)
        assert want_outer.keys and want_inner.text
        seen = []

        class Nosy:
            """Hashes like a key of the outer request, equals nothing, and locates the inner one when compared."""

            def __hash__(self):
                return hash(want_outer.keys[0])

            def __eq__(self, other):
                seen.append(impl.locate(inner, LOGS, {}, SCAN))
                return False

        assert impl.locate(outer, TRACES, {Nosy(): SCAN}, SCAN) == want_outer
        assert seen and all(loc == want_inner for loc in seen)
        assert impl.locate(outer, TRACES, {}, SCAN) == want_outer

    def test_splice_rewrites_every_enclosing_length(self, impl):
        req = ExportTraceServiceRequest()
        span = req.resource_spans.add().scope_spans.add().spans.add(name="n")
        span.attributes.add(key="a").value.kvlist_value.values.add(key="b").value.string_value = "short"
        data = req.SerializeToString()
        from redaction._engine import SCAN
        loc = impl.locate(data, TRACES, {"a": SCAN, "b": SCAN}, SCAN)
        sites, items = memoryview(loc.sites).cast("q"), memoryview(loc.items).cast("q")
        len_start, end = sites[0], sites[1]
        long = b"x" * 300  # a two-byte length prefix: every enclosing prefix grows
        new = impl.splice(data, [(len_start, end, bytes([0xAC, 0x02]) + long, -1),
                                 (items[1], items[1], b"\x4a\x03\x0a\x01z", items[0])])
        got = ExportTraceServiceRequest.FromString(new).resource_spans[0].scope_spans[0].spans[0]
        assert got.attributes[0].value.kvlist_value.values[0].value.string_value == long.decode()
        assert [kv.key for kv in got.attributes] == ["a", "z"] and got.name == "n"

    @pytest.mark.parametrize("bad", [b"\x0a\x05\x0a", b"\x0a\x02\x12\xff", b"\x0f", b"\x0a\x01\x07"])
    def test_malformed_input_is_a_value_error(self, impl, bad):
        with pytest.raises(ValueError):
            impl.locate(bad, TRACES, {}, object())

    def test_mutated_bytes_raise_value_error_or_come_back_redacted(self, impl):
        """Flipped, cut and inserted bytes: locate and splice answer ValueError or bytes, never crash."""
        rng = random.Random(11)
        eng = engine("rules")
        outcomes = set()
        for _ in range(400):
            signal = rng.choice(sorted(RANDOM))
            data = bytearray(RANDOM[signal](rng).SerializeToString())
            for _ in range(rng.randrange(1, 4)):
                if data:
                    j = rng.randrange(len(data))
                    op = rng.random()
                    if op < 0.4:
                        data[j] = rng.randrange(256)
                    elif op < 0.7:
                        del data[j:j + rng.randrange(1, 8)]
                    else:
                        data[j:j] = rng.randbytes(rng.randrange(1, 5))
            try:
                out = wire_redaction.redact(eng, signal, bytes(data))
                outcomes.add("redacted" if out is not None else "clean")
            except (ValueError, wire_redaction.NeedsObjectPath):
                outcomes.add("refused")
            bad = [(rng.randrange(-2, len(data) + 3), rng.randrange(-2, len(data) + 3), b"xyz",
                    rng.choice([-1, rng.randrange(-2, len(data) + 2)])) for _ in range(rng.randrange(1, 4))]
            try:
                impl.splice(bytes(data), bad)
            except ValueError:
                pass
        assert outcomes == {"redacted", "refused"}  # the generator puts PII in nearly every request

    def test_metrics_metadata_and_names_are_left_alone(self, impl):
        req = ExportMetricsServiceRequest()
        m = req.resource_metrics.add().scope_metrics.add().metrics.add(name="a@b.co", description="a@b.co")
        m.metadata.add(key="user.id").value.string_value = "a@b.co"
        m.gauge.data_points.add().attributes.add(key="user.id").value.string_value = "a@b.co"
        new = wire_redaction.redact(engine("default"), "metrics", req.SerializeToString())
        got = ExportMetricsServiceRequest.FromString(new).resource_metrics[0].scope_metrics[0].metrics[0]
        assert got.name == got.description == got.metadata[0].value.string_value == "a@b.co"
        assert got.gauge.data_points[0].attributes[0].value.string_value == "[EMAIL]"

    def test_an_earlier_summary_asks_for_the_object_path(self, impl):
        req = ExportTraceServiceRequest()
        span = req.resource_spans.add().scope_spans.add().spans.add(name="n")
        span.attributes.add(key="redaction.masked.count").value.int_value = 2
        span.attributes.add(key="user.id").value.string_value = "a@b.co"
        with pytest.raises(wire_redaction.NeedsObjectPath):
            wire_redaction.redact(engine("default"), "traces", req.SerializeToString())

    def test_overlapping_edits_hand_the_request_to_the_object_path(self, impl):
        """Two values in one KeyValue (the parser merges them): a drop of the KeyValue and a mask inside it."""
        def field(tag: int, payload: bytes) -> bytes:
            return bytes([tag, len(payload)]) + payload

        kv = field(0x0A, b"user.id") + field(0x12, field(0x0A, b"DROPME42")) + field(0x12, field(0x0A, b"a@b.co"))
        data = field(0x0A, field(0x12, field(0x12, field(0x4A, kv))))
        want, _ = object_path("rules", "traces", data)
        assert want.resource_spans[0].scope_spans[0].spans[0].attributes[0].value.string_value == "[EMAIL]"
        eng = engine("rules")
        with pytest.raises(ValueError):
            wire_redaction.redact(eng, "traces", data)
        assert eng.stats.snapshot() == {}  # nothing counted twice when the object path takes over

    def test_clean_request_is_not_copied(self, impl):
        data = rand_traces(random.Random(3)).SerializeToString()
        eng = RedactionEngine(RedactionConfig(detectors={n: {"enabled": False} for n in
                                                         type(RedactionConfig().detectors).model_fields},
                                              builtin_blocked_key_patterns=False))
        assert wire_redaction.redact(eng, "traces", data) is None


def strings(msg) -> set[str]:
    """Every string value in ``msg``, at any depth."""
    out = set()
    for fd, value in msg.ListFields():
        values = value if isinstance(value, (list, tuple)) or hasattr(value, "__len__") and not isinstance(
            value, (str, bytes)) and not hasattr(value, "ListFields") else [value]
        for v in values:
            if isinstance(v, str):
                out.add(v)
            elif hasattr(v, "ListFields"):
                out |= strings(v)
    return out


@pytest.mark.parametrize("signal", sorted(RANDOM))
def test_non_canonical_input_never_yields_corrupt_bytes_or_a_leak(signal):
    """Unknown fields and groups, decoy earlier values, split sub-messages, over-long varints and tags
    (tests/sidecar/wire_gen.py): the output parses, both halves agree byte for byte, counts match the
    object path, and every string left is one the object path left or one no rule changes."""
    from tests.sidecar.wire_gen import Reencoder

    rng = random.Random(f"noncanonical-{signal}")
    for n in range(60):
        config = sorted(CONFIGS)[n % len(CONFIGS)]
        data = Reencoder(rng, p=0.25).encode(RANDOM[signal](rng))
        want, want_stats = object_path(config, signal, data)
        outs = []
        for half in [_wire_redact_py] + ([_c] if _c is not None else []):
            eng = engine(config)
            try:
                outs.append(_redact_with(half, eng, signal, data))
            except (wire_redaction.NeedsObjectPath, ValueError) as e:
                outs.append(type(e))  # handed to the object path
        assert all(o == outs[0] for o in outs), "the C and the Python half differ"
        if isinstance(outs[0], type):
            continue  # handed to the object path
        got = TYPES[signal].FromString(data if outs[0] is None else outs[0])
        assert eng.stats.snapshot() == want_stats
        check = engine(config)
        for value in strings(got) - strings(want):
            assert check.redact_text(value) == value, f"{value!r} survived wire redaction ({config})"


def _redact_with(half, eng, signal, data):
    saved = wire_redaction.locate, wire_redaction.splice
    wire_redaction.locate, wire_redaction.splice = half.locate, half.splice
    try:
        return wire_redaction.redact(eng, signal, data)
    finally:
        wire_redaction.locate, wire_redaction.splice = saved


@pytest.mark.skipif(_c is None, reason="C extension not built")
@pytest.mark.parametrize("signal", sorted(RANDOM))
def test_both_halves_locate_alike(signal):
    """The C and the Python half return equal results on the same bytes and the same decisions."""
    rng = random.Random(signal)
    eng = engine("rules")
    from redaction._engine import SCAN
    for _ in range(80):
        data = RANDOM[signal](rng).SerializeToString()
        sig = {"traces": TRACES, "logs": LOGS, "metrics": METRICS}[signal]
        decisions = dict(list(eng._key_cache.items())[: rng.randrange(len(eng._key_cache) + 1)])
        assert _c.locate(data, sig, decisions, SCAN) == _wire_redact_py.locate(data, sig, decisions, SCAN)
        try:  # fills the key cache as the run goes on
            wire_redaction.redact(eng, signal, data)
        except wire_redaction.NeedsObjectPath:
            pass
