"""Random OTLP requests for the wire-scanner tests, and a re-encoder that writes them the way other
protobuf writers (or an attacker) may: not canonically, but so the parser reads back the same message.

The generator is not steered around inputs the two scanners once disagreed on: empty model ids, every
value type under every key, duplicate keys, open enum values (span kind 7, status 3, 2**31-1,
negative), and the re-encoder adds unknown fields and groups at every level, wrong wire types, decoy
earlier values, split sub-messages, shuffled field order and over-long varints.
"""

from __future__ import annotations

import random
import struct

from google.protobuf.descriptor import FieldDescriptor as FD
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

TEXTS = ["", "a", "resnet50", "gold", "bronze", "modèle-é", "模型", "🚀 fast", "x" * 300, "v3"]
BASE_NS = 1_700_000_000_000_000_000
#: Keys the configured metrics dimensions and sampling policies look at, and some they do not.
KEYS = ["ml.model.id", "gen_ai.request.model", "ml.model.version", "sampling.force_keep", "user.tier",
        "http.status", "noise", "noise.é", "ml.model"]
#: Open enums: any int32 may arrive, not just the named values.
ENUM_VALUES = [0, 1, 2, 3, 4, 5, 7, 2**31 - 1, -1, -(2**31)]


def rand_value(rng: random.Random, av: AnyValue, depth: int = 0) -> None:
    kind = rng.choice(["str", "bool", "int", "double", "bytes", "none"] + (["array", "kvlist"] if depth < 3 else []))
    if kind == "str":
        av.string_value = rng.choice(TEXTS)
    elif kind == "bool":
        av.bool_value = rng.random() < 0.5
    elif kind == "int":
        av.int_value = rng.choice([0, 1, -1, 503, 2**63 - 1, -(2**63), rng.getrandbits(40)])
    elif kind == "double":
        av.double_value = rng.choice([0.0, -0.5, 1e300, 2.5e-300, 503.0, float("inf"), rng.random() * 1000])
    elif kind == "bytes":
        av.bytes_value = rng.randbytes(rng.randrange(0, 40))
    elif kind == "array":
        for _ in range(rng.randrange(0, 4)):
            rand_value(rng, av.array_value.values.add(), depth + 1)
    elif kind == "kvlist":
        for i in range(rng.randrange(0, 4)):
            rand_value(rng, av.kvlist_value.values.add(key=f"k{i}").value, depth + 1)
    # "none": a KeyValue whose value is unset


def rand_attributes(rng: random.Random, kvs, n_max: int = 6) -> None:
    """Typed values in any order; now and then a key twice (the first occurrence counts)."""
    keys = rng.sample(KEYS, rng.randrange(0, min(n_max, len(KEYS)) + 1))
    if keys and rng.random() < 0.1:
        keys.append(rng.choice(keys))
    for key in keys:
        kv = kvs.add(key=key)
        r = rng.random()
        if key == "sampling.force_keep" and r < 0.7:
            kv.value.bool_value = rng.random() < 0.6
        elif key == "user.tier" and r < 0.7:
            kv.value.string_value = rng.choice(["gold", "silver", "bronze", "é", ""])
        elif key == "http.status" and r < 0.7:
            if rng.random() < 0.5:
                kv.value.int_value = rng.choice([200, 503, 599, 404])
            else:
                kv.value.double_value = rng.choice([200.0, 503.5])
        elif key.startswith(("ml.", "gen_ai.")) and r < 0.8:
            kv.value.string_value = rng.choice(["resnet50", "bert", "v1", "v2", "模型", "", "llama"])
        else:
            rand_value(rng, kv.value)


def rand_traces(rng: random.Random, trace_ids: list[bytes]) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    for _ in range(rng.randrange(1, 4)):
        rs = req.resource_spans.add()
        if rng.random() < 0.8:  # else no resource at all
            rs.resource.attributes.add(key="service.name").value.string_value = rng.choice(["svc", "", "séance"])
            rand_attributes(rng, rs.resource.attributes, 3)
        if rng.random() < 0.3:
            rs.schema_url = "https://opentelemetry.io/schemas/1.26.0"
        for _ in range(rng.randrange(1, 3)):
            ss = rs.scope_spans.add()
            if rng.random() < 0.7:
                ss.scope.name = rng.choice(["torch", "http", ""])
                ss.scope.version = "0.1"
            if rng.random() < 0.2:
                ss.schema_url = "s"
            tid = rng.choice(trace_ids)
            for _ in range(rng.randrange(0, 12)):
                if rng.random() < 0.4:  # runs of one trace, interleaved traces, traceless spans
                    tid = rng.choice(trace_ids + [b""])
                sp = ss.spans.add(trace_id=tid)
                if rng.random() < 0.9:
                    sp.span_id = rng.randbytes(8)
                if rng.random() < 0.6:
                    sp.parent_span_id = rng.randbytes(8)
                sp.flags = rng.choice([0, 0, 0x100, 0x300, 0x301, rng.getrandbits(32)])
                sp.trace_state = rng.choice(["", "", "", "vendor=x", "ot=rv:00112233445566",
                                             "ot=th:8;rv:ffffffffffffff,a=b", "ot=rv:zz"])
                sp.name = rng.choice(["forward", "preprocess", "POST /predict", "", "推理"])
                sp.kind = rng.choice(ENUM_VALUES) if rng.random() < 0.2 else rng.randrange(0, 6)
                start = rng.choice([0, BASE_NS + rng.getrandbits(30), 2**64 - 5])
                sp.start_time_unix_nano = start
                sp.end_time_unix_nano = rng.choice(
                    [0, min(2**64 - 1, start + rng.choice([1, 10**6, 6 * 10**7, 2 * 10**9])), start // 2])
                rand_attributes(rng, sp.attributes)
                if rng.random() < 0.4:
                    sp.status.code = rng.choice(ENUM_VALUES) if rng.random() < 0.3 else rng.choice([0, 1, 2])
                    if rng.random() < 0.5:
                        sp.status.message = rng.choice(TEXTS)
                if rng.random() < 0.3:  # events and links carry the same keys: they must not count
                    ev = sp.events.add(name="exception", time_unix_nano=start)
                    rand_attributes(rng, ev.attributes)
                    link = sp.links.add(trace_id=rng.randbytes(16), span_id=rng.randbytes(8), trace_state="l=1")
                    rand_attributes(rng, link.attributes)
                sp.dropped_attributes_count = rng.choice([0, 0, 3])
    return req


def rand_logs(rng: random.Random, trace_ids: list[bytes]) -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    for _ in range(rng.randrange(1, 3)):
        rl = req.resource_logs.add()
        if rng.random() < 0.8:
            rl.resource.attributes.add(key="service.name").value.string_value = "svc"
        for _ in range(rng.randrange(1, 3)):
            sl = rl.scope_logs.add()
            if rng.random() < 0.5:
                sl.scope.name = "app"
            tid = rng.choice(trace_ids)
            for _ in range(rng.randrange(0, 8)):
                if rng.random() < 0.5:
                    tid = rng.choice(trace_ids + [b""])
                rec = sl.log_records.add(trace_id=tid, severity_number=rng.choice([0, 5, 9, 9, 13, 17, 21, 24, 99, -3]),
                                         time_unix_nano=BASE_NS + rng.getrandbits(30))
                rec.body.string_value = rng.choice(TEXTS)
                rand_attributes(rng, rec.attributes, 3)
    return req


def trace_pool(rng: random.Random, n: int = 12) -> list[bytes]:
    return [rng.randbytes(16) for _ in range(n)]


# --- a non-canonical encoder -----------------------------------------------------------------------

_VARINT_TYPES = {FD.TYPE_INT32, FD.TYPE_INT64, FD.TYPE_UINT32, FD.TYPE_UINT64, FD.TYPE_BOOL, FD.TYPE_ENUM}
_FIXED = {FD.TYPE_FIXED64: "<Q", FD.TYPE_SFIXED64: "<q", FD.TYPE_DOUBLE: "<d",
          FD.TYPE_FIXED32: "<I", FD.TYPE_SFIXED32: "<i", FD.TYPE_FLOAT: "<f"}


def varint(n: int, pad: int = 0) -> bytes:
    """``n`` as a varint, with ``pad`` redundant continuation bytes (parsers accept up to 10 bytes)."""
    n &= (1 << 64) - 1
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    for _ in range(min(pad, 10 - len(out))):
        out[-1] |= 0x80
        out.append(0)
    return bytes(out)


def tag(field: int, wt: int, pad: int = 0) -> bytes:
    t = varint(field << 3 | wt)
    return varint(field << 3 | wt, min(pad, 5 - len(t)))


class Reencoder:
    """Writes a message so that the parser reads back exactly that message, but not canonically."""

    def __init__(self, rng: random.Random, p: float = 0.15):
        self.rng = rng
        self.p = p

    def _pad(self) -> int:
        return self.rng.randrange(1, 4) if self.rng.random() < self.p else 0

    def _chance(self) -> bool:
        return self.rng.random() < self.p

    def unknown(self, depth: int = 0) -> bytes:
        """A field the schema does not know: any wire type, a group with fields (and groups) inside."""
        field = self.rng.choice([17, 50, 99, 1000, 2**29 - 1])
        wt = self.rng.choice([0, 1, 2, 5, 3] if depth < 3 else [0, 1, 2, 5])
        if wt == 0:
            return tag(field, 0) + varint(self.rng.getrandbits(64))
        if wt == 1:
            return tag(field, 1) + self.rng.randbytes(8)
        if wt == 5:
            return tag(field, 5) + self.rng.randbytes(4)
        if wt == 2:
            payload = self.rng.randbytes(self.rng.randrange(0, 12))
            return tag(field, 2) + varint(len(payload)) + payload
        inner = b"".join(self.unknown(depth + 1) for _ in range(self.rng.randrange(0, 3)))
        return tag(field, 3) + inner + tag(field, 4)

    def _scalar(self, fd, value) -> bytes:
        if fd.type in _VARINT_TYPES:
            return tag(fd.number, 0, self._pad()) + varint(int(value), self._pad())
        if fd.type == FD.TYPE_SINT32 or fd.type == FD.TYPE_SINT64:
            return tag(fd.number, 0) + varint((value << 1) ^ (value >> 63))
        if fd.type in _FIXED:
            fmt = _FIXED[fd.type]
            return tag(fd.number, 1 if struct.calcsize(fmt) == 8 else 5) + struct.pack(fmt, value)
        payload = value.encode() if isinstance(value, str) else value
        return tag(fd.number, 2, self._pad()) + varint(len(payload), self._pad()) + payload

    def _wrong_wire_type(self, fd) -> bytes:
        """An occurrence of a singular known field with another wire type: the parser keeps it as unknown."""
        if fd.type in _VARINT_TYPES or fd.type in (FD.TYPE_SINT32, FD.TYPE_SINT64):
            return tag(fd.number, 2) + b"\x01\x07"
        return tag(fd.number, 0) + varint(7)

    def _decoy(self, fd) -> bytes:
        """An earlier occurrence of a singular scalar with another value: the last one wins."""
        if fd.type == FD.TYPE_BOOL:
            return self._scalar(fd, self.rng.random() < 0.5)
        if fd.type in _VARINT_TYPES:
            return self._scalar(fd, self.rng.choice([0, 1, 7, 2**31 - 1, -1]))
        if fd.type in _FIXED:
            return self._scalar(fd, 0.5 if fd.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT) else 1)
        if fd.type in (FD.TYPE_SINT32, FD.TYPE_SINT64):
            return self._scalar(fd, -1)
        return self._scalar(fd, "decoy" if fd.type == FD.TYPE_STRING else b"\x01decoy")

    def chunks(self, msg) -> list[tuple[int, bytes]]:
        """(field number, encoded occurrence) for each field occurrence of ``msg``, with extras."""
        out: list[tuple[int, bytes]] = []
        for fd, value in msg.ListFields():
            repeated = fd.is_repeated
            for v in (value if repeated else [value]):
                if fd.type == FD.TYPE_MESSAGE:
                    parts = [c for _, c in self.chunks(v)]
                    if not repeated and len(parts) > 1 and self._chance():  # two occurrences merge
                        cut = self.rng.randrange(1, len(parts))
                        for piece in (parts[:cut], parts[cut:]):
                            body = b"".join(piece)
                            out.append((fd.number, tag(fd.number, 2, self._pad()) + varint(len(body), self._pad()) + body))
                        continue
                    body = b"".join(parts)
                    out.append((fd.number, tag(fd.number, 2, self._pad()) + varint(len(body), self._pad()) + body))
                else:
                    if not repeated and self._chance():
                        out.append((fd.number, self._decoy(fd)))
                    out.append((fd.number, self._scalar(fd, v)))
                if not repeated and self._chance():
                    out.append((-1, self._wrong_wire_type(fd)))
        for _ in range(sum(self._chance() for _ in range(2))):
            out.insert(self.rng.randrange(len(out) + 1), (-1, self.unknown()))
        if self._chance():  # shuffle, keeping the order of each field's own occurrences
            by_field: dict[int, list[bytes]] = {}
            for f, c in out:
                by_field.setdefault(f, []).append(c)
            order = [f for f, _ in out]
            self.rng.shuffle(order)
            out = [(f, by_field[f].pop(0)) for f in order]
        return out

    def encode(self, msg) -> bytes:
        data = b"".join(c for _, c in self.chunks(msg))
        parsed = type(msg).FromString(data)
        parsed.DiscardUnknownFields()
        assert parsed == msg, "the re-encoding must parse back to the same message"
        return data
