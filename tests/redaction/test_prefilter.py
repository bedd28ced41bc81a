"""The serialized-bytes prefilter may skip work, never a secret.

``OtlpRedactor`` walks only the spans, log records, metrics, resources and scopes whose
serialization a wire hint flags, so every hint must be a necessary condition for its
rule: whenever the walk would change something, the item must be flagged, wherever the
string sits and whatever binary bytes surround it. hypothesis is not installed, so the
inputs come from a seeded random generator: secrets of every detector's shape in many
spellings, glued to noise, and noise alone from an alphabet that makes near-misses.
"""

from __future__ import annotations

import ipaddress
import random
import string

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from redaction import RedactionConfig, RedactionEngine
from redaction._detectors import BUILTIN_KEY_PATTERNS
from redaction.otlp import OtlpRedactor

SEED = 20240607
B64 = string.ascii_letters + string.digits + "_-"
ALNUM = string.ascii_letters + string.digits
UPPER_ALNUM = string.ascii_uppercase + string.digits
NOISE = "0123456789" * 4 + " -.:+()@/_=\t\n" * 2 + "abcdefxyzAEFXZ" + "eyJ" + "é€"


def _luhn_complete(rng: random.Random, length: int) -> str:
    digits = [rng.choice("23456")] + [rng.choice(string.digits) for _ in range(length - 2)]
    total = 0
    for i, c in enumerate(reversed(digits)):  # positions counted from the check digit's left neighbour
        d = int(c) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return "".join(digits) + str((10 - total % 10) % 10)


def _card(rng: random.Random) -> str:
    shape = rng.randrange(3)
    if shape == 0:
        return _luhn_complete(rng, rng.randint(13, 19))
    sep = rng.choice(" -")
    if shape == 1:
        d = _luhn_complete(rng, 16)
        return sep.join(d[i:i + 4] for i in range(0, 16, 4))
    d = _luhn_complete(rng, 15)
    return f"{d[:4]}{sep}{d[4:10]}{sep}{d[10:]}"


def _iban(rng: random.Random) -> str:
    country = "".join(rng.choice(string.ascii_uppercase) for _ in range(2))
    bban = "".join(rng.choice(UPPER_ALNUM) for _ in range(rng.randint(11, 26)))
    num = "".join(str(ord(c) - 55) if c.isalpha() else c for c in bban + country + "00")
    s = f"{country}{98 - int(num) % 97:02d}{bban}"
    return " ".join(s[i:i + 4] for i in range(0, len(s), 4)) if rng.random() < 0.5 else s


def _phone(rng: random.Random) -> str:
    d = lambda n: "".join(rng.choice(string.digits) for _ in range(n))  # noqa: E731
    sep = rng.choice(" .-")
    return rng.choice([
        f"({d(3)}) {d(3)}-{d(4)}", f"{d(3)}{sep}{d(3)}{sep}{d(4)}", f"+1 {d(3)} {d(3)} {d(4)}",
        f"+1-{d(3)}-{d(3)}-{d(4)}", f"+{rng.randint(1, 9)}{d(rng.randint(7, 13))}",
        f"+{rng.randint(1, 9)}{d(1)} {d(2)} {d(4)} {d(4)}", f"+{rng.randint(1, 9)} ({d(3)}) {d(3)}-{d(2)}",
        f"+{rng.randint(1, 9)}{d(2)}-{d(3)}-{d(3)}-{d(rng.randint(1, 4))}",
    ])


def _ipv6(rng: random.Random) -> str:
    groups = [rng.choice([0, 0, rng.getrandbits(16), rng.getrandbits(8)]) for _ in range(8)]
    addr = ipaddress.IPv6Address(b"".join(g.to_bytes(2, "big") for g in groups))
    return addr.compressed if rng.random() < 0.7 else addr.exploded


def _secret(rng: random.Random) -> str:
    r = lambda alphabet, lo, hi: "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    kind = rng.randrange(12)
    if kind == 0:
        tld = r(string.ascii_letters, 2, 6)
        sub = "." + r(ALNUM, 1, 5) if rng.random() < 0.3 else ""
        return f"{r(ALNUM + '._%+-', 1, 12)}@{r(ALNUM + '-', 1, 10)}{sub}.{tld}"
    if kind == 1:
        return _card(rng)
    if kind == 2:
        return f"{rng.randint(1, 899):03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
    if kind == 3:
        return _phone(rng)
    if kind == 4:
        return ".".join(str(rng.randrange(256)) for _ in range(4))
    if kind == 5:
        return _ipv6(rng)
    if kind == 6:
        return f"eyJ{r(B64, 4, 30)}.eyJ{r(B64, 4, 40)}.{r(B64, 0, 43)}"
    if kind == 7:
        scheme = rng.choice(["Bearer", "bearer", "BASIC", "Basic"]) + rng.choice([" ", "  ", "\t"])
        return f"{scheme}{r(ALNUM + '._~+/-', 8, 40)}{'=' * rng.randint(0, 2)}"
    if kind == 8:
        return rng.choice([
            f"sk-{rng.choice(['', 'proj-', 'ant-', 'live-', 'test-'])}{r(B64, 16, 40)}",
            f"{rng.choice('sr')}k_{rng.choice(['live', 'test'])}_{r(ALNUM, 16, 30)}",
            rng.choice(["AKIA", "ASIA", "AGPA", "AIDA", "AROA", "ANPA", "APKA"]) + r(UPPER_ALNUM, 16, 16),
            f"gh{rng.choice('pousr')}_{r(ALNUM, 36, 40)}", f"github_pat_{r(ALNUM + '_', 22, 40)}",
            f"xox{rng.choice('abposr')}-{r(ALNUM + '-', 10, 30)}", f"AIza{r(B64, 35, 35)}", f"hf_{r(ALNUM, 30, 40)}",
        ])
    if kind == 9:
        return _iban(rng)
    # near-misses: digit runs, dotted and coloned numbers, grouped digits
    return r(NOISE, 1, 40)


def _texts(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        glue = rng.choice(["", " ", ",", "(", ":", "=", "\n"])
        parts = [_secret(rng) for _ in range(rng.randint(1, 3))]
        text = glue.join(parts)
        if rng.random() < 0.5:
            text = "".join(rng.choice(NOISE) for _ in range(rng.randint(0, 6))) + glue + text
        if rng.random() < 0.5:
            text = text + glue + "".join(rng.choice(NOISE) for _ in range(rng.randint(0, 6)))
        out.append(text)
    return out


def _as_is(b: bytes) -> bytes:
    return b


@pytest.fixture(scope="module")
def engine() -> RedactionEngine:
    return RedactionEngine(RedactionConfig(summary="silent"))


def test_wire_hints_flag_every_string_a_rule_changes_between_binary_bytes(engine):
    rng = random.Random(SEED)
    texts = _texts(rng, 6000)
    changed = 0
    for text in texts:
        if engine.redact_text(text, {}) == text:
            continue
        changed += 1
        # the string as it sits in a serialized message: tags, lengths and binary ids around it
        item = rng.randbytes(rng.randint(0, 24)) + text.encode() + rng.randbytes(rng.randint(0, 24))
        neighbours = [rng.randbytes(rng.randint(0, 40)) for _ in range(4)]
        k = rng.randrange(5)
        items = neighbours[:k] + [item] + neighbours[k:]
        assert k in set(engine.wire_candidates(items, _as_is)), text
    assert changed > 4000  # the generator really produces secrets, not only near-misses


def test_tight_hints_still_skip_ids_timestamps_and_token_counts(engine):
    # what the hints are tight for: per-item prefiltering only pays if ordinary items are not flagged
    clean = [b"request.id\x12\x12\n\x10" + f"{n:016x}".encode() for n in (0x4f3a12345678b9c0, 0x1234567890abcdef)]
    clean += [b"\x12\x19gen_ai.usage.input_tokens\x12\x03\x18\x80\x04", b"at 2024-01-15T10:30:00.123Z",
              b"build 20240115.3 sku 1234-5678 +1 23 v1.2.3", b"\x0a\x10" + bytes(range(16))]
    assert list(engine.wire_candidates(clean, _as_is)) == []


# --- the whole adapter: walking only flagged items gives exactly the result of walking everything ---

KEYS = ["note", "prompt", "user.id", "request.id", "http.route", "gen_ai.usage.input_tokens", "token_count",
        "access_token", "X-Auth-TOKEN", "sessionid", "session.key", "sessions", "db.password", "apiKey",
        "Authorization", "cookie", "client_secret", "private-key", "aws.credentials", "tokenizer"]


def _fill(rng: random.Random, attrs, texts: list[str], depth: int = 0) -> None:
    for _ in range(rng.randint(0, 5)):
        kv = attrs.add(key=rng.choice(KEYS) + rng.choice(["", "", ".x", "s"]))
        roll = rng.random()
        if roll < 0.1:
            continue  # a key without a value: key rules still apply
        if roll < 0.6:
            kv.value.string_value = rng.choice(texts)
        elif roll < 0.7:
            kv.value.int_value = rng.getrandbits(63)
        elif roll < 0.8 and depth < 2:
            _fill(rng, kv.value.kvlist_value.values, texts, depth + 1)
        elif roll < 0.9:
            for _ in range(rng.randint(0, 3)):
                kv.value.array_value.values.add().string_value = rng.choice(texts)
        else:
            kv.value.bytes_value = rng.randbytes(rng.randint(0, 20))


def _traces(rng: random.Random, texts: list[str]) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    for _ in range(rng.randint(1, 2)):
        rs = req.resource_spans.add()
        _fill(rng, rs.resource.attributes, texts)
        for _ in range(rng.randint(1, 2)):
            ss = rs.scope_spans.add()
            ss.scope.name = "scope"
            _fill(rng, ss.scope.attributes, texts)
            for _ in range(rng.randint(0, 12)):
                span = ss.spans.add(trace_id=rng.randbytes(16), span_id=rng.randbytes(8), name="op",
                                    start_time_unix_nano=rng.getrandbits(63))
                _fill(rng, span.attributes, texts)
                for _ in range(rng.randint(0, 2)):
                    _fill(rng, span.events.add(name="exception").attributes, texts)
                for _ in range(rng.randint(0, 1)):
                    _fill(rng, span.links.add(trace_id=rng.randbytes(16), span_id=rng.randbytes(8)).attributes, texts)
                if rng.random() < 0.3:
                    span.status.code = 2
                    span.status.message = rng.choice(texts)
    return req


def _logs(rng: random.Random, texts: list[str]) -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    rl = req.resource_logs.add()
    _fill(rng, rl.resource.attributes, texts)
    sl = rl.scope_logs.add()
    _fill(rng, sl.scope.attributes, texts)
    for _ in range(rng.randint(0, 12)):
        lr = sl.log_records.add(time_unix_nano=rng.getrandbits(63), trace_id=rng.randbytes(16),
                                span_id=rng.randbytes(8), severity_number=rng.choice([9, 17]))
        _fill(rng, lr.attributes, texts)
        roll = rng.random()
        if roll < 0.5:
            lr.body.string_value = rng.choice(texts)
        elif roll < 0.8:
            _fill(rng, lr.body.kvlist_value.values, texts)
    return req


def _metrics(rng: random.Random, texts: list[str]) -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    _fill(rng, rm.resource.attributes, texts)
    sm = rm.scope_metrics.add()
    for kind in rng.sample(["gauge", "sum", "histogram", "exponential_histogram", "summary"], 3):
        m = sm.metrics.add(name=f"m.{kind}")
        dp = getattr(m, kind).data_points.add(time_unix_nano=rng.getrandbits(63))
        _fill(rng, dp.attributes, texts)
        if kind != "summary":
            _fill(rng, dp.exemplars.add(trace_id=rng.randbytes(16)).filtered_attributes, texts)
    return req


@pytest.mark.parametrize("builder", [_traces, _logs, _metrics], ids=["traces", "logs", "metrics"])
@pytest.mark.parametrize("summary", ["silent", "debug"])
def test_prefiltered_redaction_equals_walking_everything(builder, summary):
    rng = random.Random(SEED + len(summary))
    texts = _texts(rng, 300) + ["clean text", "", "v1.2.3", "inference done"]
    config = RedactionConfig(summary=summary)
    fast = OtlpRedactor(RedactionEngine(config))
    walk_all = OtlpRedactor(RedactionEngine(config), prefilter=False)
    changed = 0
    for _ in range(150):
        req = builder(rng, texts)
        other = type(req)()
        other.CopyFrom(req)
        before = req.SerializeToString()
        tally = fast.redact(builder.__name__[1:], req)
        assert tally == walk_all.redact(builder.__name__[1:], other)
        assert req.SerializeToString() == other.SerializeToString()
        changed += req.SerializeToString() != before
    assert changed > 100


def test_every_builtin_key_pattern_flags_its_items_with_or_without_a_value(engine):
    # without a value, a key is followed by whatever tag comes next: a letter ('J', the next
    # attribute) or, for span flags (field 16), the two bytes 0x85 0x01
    for name, _, _ in BUILTIN_KEY_PATTERNS:
        key = {"api_key": "x-api-key", "private_key": "private_key", "password": "db.passwd",
               "token": "refresh_token", "session": "session_id"}.get(name, name.upper())
        for with_value, follower in ((True, "attribute"), (False, "attribute"), (False, "flags")):
            req = ExportTraceServiceRequest()
            span = req.resource_spans.add().scope_spans.add().spans.add(trace_id=b"\x01" * 16)
            kv = span.attributes.add(key=key)
            if with_value:
                kv.value.int_value = 7
            if follower == "flags":
                span.flags = 0x301
                assert key.encode() + b"\x85\x01" in req.SerializeToString()
            else:
                span.attributes.add(key="next").value.string_value = "x"
            redacted = OtlpRedactor(engine).redact_traces(req)
            assert redacted == {(name, "replace"): 1}, (key, with_value, follower)
