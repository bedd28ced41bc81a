"""What one audit record is, and how it is read off the OTLP spans: pure functions over the protobuf.

**One record per request served**, identified by its *entry span*: a span of kind SERVER
or CONSUMER, or a span without a parent (a batch job, a plain SDK app). The record is
keyed by that span's (trace_id, span_id), so a retried export never duplicates it.

The model facts usually sit on other spans of the same trace: the *inference spans*
(``ml.forward`` spans carrying ``ml.model.id``, generation spans carrying
``gen_ai.request.model``). Their fields (model id and version, parameters, shapes, token
counts, tensor payloads) are merged into the record of their trace: directly when the
entry span is in the same export request, otherwise by the store (see
:meth:`sidecar.audit.store.AuditStore.write`), which keeps such a *fragment* until its
entry span arrives. Fields already on the entry span win over a fragment's.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any, Iterable

from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from sidecar import wire

from contract import attributes as attr

REQUEST_ID = attr.REQUEST_ID
USER_ID = attr.USER_ID
TAG_PREFIX = attr.TAG_PREFIX
MODEL_ID = attr.ML_MODEL_ID
MODEL_VERSION = attr.ML_MODEL_VERSION
GENAI_MODEL = attr.GEN_AI_REQUEST_MODEL
#: replayable tensor payloads (instrumentation/replay.py writes them when capture is on)
INPUT_PAYLOAD = attr.ML_INPUT_PAYLOAD
OUTPUT_PAYLOAD = attr.ML_OUTPUT_PAYLOAD
#: the "format" value of a replayable tensor payload
TENSOR_FORMAT = "ml.tensors/v1"
#: the span attribute tail sampling sets on the spans of a trace it keeps
POLICY_ATTRIBUTE = attr.SAMPLING_POLICY

#: set on the spans of ``python -m instrumentation.replay``
REPLAY = "replay"

#: span attribute -> parameter name in the record
PARAMETERS = {
    attr.GEN_AI_REQUEST_TEMPERATURE: "temperature",
    attr.GEN_AI_REQUEST_TOP_P: "top_p",
    attr.GEN_AI_REQUEST_TOP_K: "top_k",
    attr.GEN_AI_REQUEST_SEED: "seed",
    attr.GEN_AI_REQUEST_MAX_TOKENS: "max_tokens",
    attr.GEN_AI_USAGE_INPUT_TOKENS: "input_tokens",
    attr.GEN_AI_USAGE_OUTPUT_TOKENS: "output_tokens",
    attr.GEN_AI_RESPONSE_FINISH_REASONS: "finish_reasons",
    attr.ML_BATCH_SIZE: "batch_size",
    attr.ML_INPUT_SHAPES: "input_shapes",
    attr.ML_OUTPUT_SHAPES: "output_shapes",
    attr.ML_INPUT_DTYPES: "input_dtypes",
    attr.ML_DEVICE: "device",
}
_INPUT_SOURCES = (INPUT_PAYLOAD, attr.GEN_AI_PROMPT, "http.request.body")
_OUTPUT_SOURCES = (OUTPUT_PAYLOAD, attr.GEN_AI_COMPLETION, "http.response.body")
_MAX_UNIX_NANO = 2**63 - 1  # the largest time a signed 64-bit SQL integer column holds

_HTTP_STATUS = ("http.response.status_code", "http.status_code")
_PARAMETER_KEYS = frozenset(PARAMETERS)
_PAYLOAD_KEYS = frozenset(_INPUT_SOURCES + _OUTPUT_SOURCES)
_USED = frozenset({REQUEST_ID, USER_ID, MODEL_ID, MODEL_VERSION, GENAI_MODEL, REPLAY, "error.type", *PARAMETERS,
                   *_INPUT_SOURCES, *_OUTPUT_SOURCES, *_HTTP_STATUS})
_STATUS = {Status.STATUS_CODE_UNSET: "UNSET", Status.STATUS_CODE_OK: "OK", Status.STATUS_CODE_ERROR: "ERROR"}
#: what the wire scanner reads off each span (sidecar.wire.audit_spans): the attributes a record uses
_KEYS = tuple(sorted(k.encode() for k in _USED))
_EVENT_KEYS = (attr.GEN_AI_PROMPT.encode(), attr.GEN_AI_COMPLETION.encode())
_TAG_PREFIX = TAG_PREFIX.encode()
_POLICY_KEY = (POLICY_ATTRIBUTE.encode(),)


def _sorted_json_encoder():
    """``json.dumps(d, sort_keys=True)``, without building an encoder per call nor its Python wrappers: the C
    encoder called directly when the json module has it (a fifth less per record), else one shared encoder."""
    from json import encoder

    plain = json.JSONEncoder(sort_keys=True)
    if encoder.c_make_encoder is None:  # pragma: no cover - CPython builds the accelerator
        return plain.encode
    c = encoder.c_make_encoder({}, plain.default, encoder.encode_basestring_ascii, None, ": ", ", ", True, False,
                               True)
    return lambda d: "".join(c(d, 0))


#: JSON as records are stored (sorted keys); of a scalar, what ``json.dumps`` gives
SORTED_JSON = _sorted_json_encoder()

_PARAMETERS_BY_NAME = sorted(PARAMETERS.items(), key=lambda item: item[1])
#: how sidecar.wire.audit_rows makes the store rows of a request's records in C: the span attribute keys by
#: role (request id, user id, model id, model version, gen_ai model, replay, error.type, the two HTTP status
#: keys, the input and the output payload sources, then the parameters sorted by name), the parameters'
#: names, the tag prefix, the event keys, the service key, the intent tag, the tensor format, the status
#: names and the JSON encoder: every fact of the mapping stays here, the C pass only follows it
ROW_LAYOUT = (
    tuple(k.encode() for k in (REQUEST_ID, USER_ID, MODEL_ID, MODEL_VERSION, GENAI_MODEL, REPLAY, "error.type",
                               *_HTTP_STATUS, *_INPUT_SOURCES, *_OUTPUT_SOURCES, *(k for k, _ in _PARAMETERS_BY_NAME))),
    tuple(name for _, name in _PARAMETERS_BY_NAME), _TAG_PREFIX, _EVENT_KEYS, attr.SERVICE_NAME.encode(),
    attr.INTENT_TAG.encode(), TENSOR_FORMAT,
    (_STATUS[Status.STATUS_CODE_UNSET], _STATUS[Status.STATUS_CODE_OK], _STATUS[Status.STATUS_CODE_ERROR]),
    SORTED_JSON,
)


@dataclass
class AuditRecord:
    """One request on record. ``parameters`` and ``tags`` are flat JSON objects."""

    trace_id: str
    span_id: str
    time_unix_nano: int
    service: str = ""
    span_name: str = ""
    request_id: str | None = None
    model_id: str | None = None
    model_version: str | None = None
    user_id: str | None = None
    intent: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    latency_ms: float = 0.0
    status: str = "UNSET"
    error_code: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    input_payload: str | None = None
    output_payload: str | None = None
    trace_kept: bool = False
    kept_policy: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Every field, JSON-ready (the ``--format jsonl`` line and the replay input); a shallow copy."""
        d = {name: getattr(self, name) for name in _FIELDS}
        d["tags"], d["parameters"] = dict(self.tags), dict(self.parameters)
        return d

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "AuditRecord":
        names = {f.name for f in fields(cls)}
        unknown = set(obj) - names - {"recorded_unix_nano"}
        if unknown:
            raise ValueError(f"unknown audit record field(s): {', '.join(sorted(unknown))}")
        missing = {"trace_id", "span_id", "time_unix_nano"} - set(obj)
        if missing:
            raise ValueError(f"audit record lacks {', '.join(sorted(missing))}")
        return cls(**{k: v for k, v in obj.items() if k in names})


_FIELDS = tuple(f.name for f in fields(AuditRecord))


@dataclass
class Fragment:
    """Model facts from an inference span whose entry span was not in the same export request."""

    trace_id: str
    span_id: str
    service: str
    fields: dict[str, Any]


@dataclass
class Extraction:
    records: list[AuditRecord]
    fragments: list[Fragment]


# --- attribute values -------------------------------------------------------------------------


def _value(v) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind)


def _decoded(attrs: dict[str, Any]) -> dict[str, Any]:
    """The scanner's values as records hold them: an AnyValue left encoded (bytes) is parsed here."""
    for key, v in attrs.items():
        if type(v) is bytes:
            attrs[key] = _value(AnyValue.FromString(v))
    return attrs


def hash_user_id(user_id: str, salt: str) -> str:
    """A stable pseudonym: the same user maps to the same value under one salt, and back to nothing."""
    return "sha256:" + hashlib.sha256((salt + "\0" + user_id).encode()).hexdigest()[:32]


def _is_inference(attrs: dict[str, Any]) -> bool:
    return MODEL_ID in attrs or GENAI_MODEL in attrs


def _span_facts(span: wire.AuditSpan, attrs: dict[str, Any]) -> dict[str, Any]:
    """The record fields one span provides (absent keys: the span says nothing about them)."""
    out: dict[str, Any] = {}
    if span.events:
        for key, v in span.events.items():  # generation spans carry prompt and completion as events
            if key not in attrs:
                attrs[key] = _value(AnyValue.FromString(v)) if type(v) is bytes else v
    model = attrs.get(MODEL_ID) or attrs.get(GENAI_MODEL)
    if model is not None:
        out["model_id"] = str(model)
    if MODEL_VERSION in attrs:
        out["model_version"] = str(attrs[MODEL_VERSION])
    present = _PARAMETER_KEYS.intersection(attrs)
    if present:
        out["parameters"] = {PARAMETERS[key]: attrs[key] for key in present}
    if not _PAYLOAD_KEYS.isdisjoint(attrs):
        for key, sources in (("input_payload", _INPUT_SOURCES), ("output_payload", _OUTPUT_SOURCES)):
            for src in sources:
                value = attrs.get(src)
                if value is not None:
                    out[key] = value if isinstance(value, str) else json.dumps(value)
                    break
    return out


def is_tensor_payload(text: str | None) -> bool:
    """Whether a payload is in the replayable tensor form (``{"format": "ml.tensors/v1", ...}``)."""
    return text is not None and TENSOR_FORMAT in text[:64]


def merge(target: dict[str, Any], facts: dict[str, Any]) -> dict[str, Any]:
    """Add ``facts`` to record fields ``target`` without overwriting what is set; parameters merge per key.

    A replayable tensor payload replaces any other (an HTTP body): it is what replay needs.
    """
    for key, value in facts.items():
        if key == "parameters":
            params = dict(value)
            params.update(target.get("parameters") or {})
            target["parameters"] = params
        elif key in ("input_payload", "output_payload"):
            old = target.get(key)
            if old is None or (is_tensor_payload(value) and not is_tensor_payload(old)):
                target[key] = value
        elif target.get(key) is None:
            target[key] = value
    return target


def _error_code(span: wire.AuditSpan, attrs: dict[str, Any]) -> str | None:
    for key in _HTTP_STATUS:
        code = attrs.get(key)
        if isinstance(code, int) and code >= 400:
            return str(code)
    if attrs.get("error.type"):
        return str(attrs["error.type"])
    if span.status_code == Status.STATUS_CODE_ERROR:
        return (span.status_message or "error")[:200]
    return None


def reduce(request: bytes) -> tuple[bytes, int]:
    """The encoded ExportTraceServiceRequest with only what :func:`extract` reads, and how many spans it
    kept: entry spans and spans carrying a record's attributes, each with its ids, parent, name, kind,
    times, status and only those attributes (:func:`sidecar.wire.audit_subset`), less repeats: a span of a
    trace whose record attributes equal those of a span of that trace kept just before it (a generate
    loop's forward spans: their facts are merged once). ``extract`` gives the same records from it as from
    the whole request, and fragments with the same facts, so a redaction in between scans only what a record
    can hold, once (the ``audit_fields`` processor)."""
    return wire.audit_subset(request, _KEYS, _TAG_PREFIX, _EVENT_KEYS)


@functools.lru_cache(maxsize=256)  # a pod's requests carry one resource, or a few: parse each once
def _service(resource: bytes) -> str:
    service = ""
    for kv in Resource.FromString(resource).attributes:
        if kv.key == attr.SERVICE_NAME:
            service = kv.value.string_value
    return service


def extract(request, *, user_id_salt: str | None = None) -> Extraction:
    """The audit records (one per entry span) and leftover fragments of one ExportTraceServiceRequest,
    given encoded (the received bytes: the usual case) or as a message.

    Only entry spans and spans carrying a record's attributes become Python objects, with only those
    attributes (:func:`sidecar.wire.audit_spans`); every other span costs one C scan and nothing else.
    ``user_id_salt`` set: user ids are replaced by :func:`hash_user_id` before anything is kept.
    """
    data = request if isinstance(request, bytes) else request.SerializeToString()
    entries: list[tuple[wire.AuditSpan, dict, str, dict]] = []
    facts_by_trace: dict[bytes, list[tuple[wire.AuditSpan, str, dict]]] = {}
    last: tuple | None = None  # (trace, service, attrs, facts) of the previous inference span
    for group in wire.audit_spans(data, _KEYS, _TAG_PREFIX, _EVENT_KEYS):
        service = _service(group.resource)
        for span in group.spans:
            attrs = _decoded(span.attributes) if span.encoded else span.attributes
            if attrs.get(REPLAY) is True:  # instrumentation.replay re-running a record: not a request
                continue
            if span.entry:
                entries.append((span, attrs, service, _span_facts(span, attrs)))
            elif _is_inference(attrs):
                tid = span.trace_id
                # the model spans of one request usually say the same: their facts are read once
                if (last is not None and last[0] == tid and last[1] == service and last[2] == attrs
                        and not span.events):
                    facts = last[3]
                else:
                    facts = _span_facts(span, attrs)
                    last = (tid, service, attrs if not span.events else None, facts)
                facts_by_trace.setdefault(tid, []).append((span, service, facts))
    records: list[AuditRecord] = []
    claimed: set[bytes] = set()
    for span, attrs, service, own in entries:
        fields_ = merge({}, own)
        merged = None
        for _s, fsvc, facts in facts_by_trace.get(span.trace_id, ()):
            if fsvc == service:
                if facts is not merged:  # merging the same facts again changes nothing
                    merge(fields_, facts)
                    merged = facts
                claimed.add(span.trace_id)
        records.append(_record(span, attrs, service, fields_, user_id_salt))
    fragments = [Fragment(s.trace_id.hex(), s.span_id.hex(), svc, facts)
                 for tid, group in facts_by_trace.items() if tid not in claimed for s, svc, facts in group]
    return Extraction(records, fragments)


def _record(span: wire.AuditSpan, attrs: dict[str, Any], service: str, facts: dict[str, Any],
            salt: str | None) -> AuditRecord:
    tags = {k[len(TAG_PREFIX):]: str(v) for k, v in attrs.items() if k.startswith(TAG_PREFIX)}
    user = attrs.get(USER_ID)
    if user is not None:
        user = str(user)
        if salt is not None:
            user = hash_user_id(user, salt)
    rid = attrs.get(REQUEST_ID)
    # OTLP times are uint64; SQL integers are signed: anything after 2262 is clamped, not refused
    start = min(span.start_ns, _MAX_UNIX_NANO)
    end = max(min(span.end_ns, _MAX_UNIX_NANO), start)
    return AuditRecord(
        trace_id=span.trace_id.hex(), span_id=span.span_id.hex(), time_unix_nano=start,
        service=service, span_name=span.name, request_id=None if rid is None else str(rid), user_id=user,
        intent=tags.get(attr.INTENT_TAG), tags=tags, latency_ms=(end - start) / 1e6,
        status=_STATUS.get(span.status_code, "UNSET"), error_code=_error_code(span, attrs),
        **facts,
    )


def kept_traces(request) -> dict[str, str]:
    """trace id (hex) -> the tail-sampling policy that kept it, from the spans tail sampling let through,
    given encoded (as tail sampling hands them on) or as a message. One wire scan for the one attribute:
    every kept span passes here, so nothing is parsed into objects."""
    data = request if isinstance(request, bytes) else request.SerializeToString()
    out: dict[str, str] = {}
    for group in wire.span_runs(data, _POLICY_KEY):
        for scope in group.scopes:
            for run in scope.runs:
                tid = run.trace_id.hex()
                if out.get(tid):
                    continue
                policy = ""
                hits = run.hits[0]
                if hits is not None:
                    for value in hits.values:  # each span's encoded AnyValue; the first string one names it
                        policy = AnyValue.FromString(value).string_value
                        if policy:
                            break
                out[tid] = policy
    return out


def records_from_jsonl(lines: Iterable[str]) -> list[AuditRecord]:
    """Records from ``audit query --format jsonl`` output; a bad line is an error naming its number."""
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(AuditRecord.from_json(json.loads(line)))
        except (ValueError, TypeError) as e:
            raise ValueError(f"line {i}: not an audit record: {e}") from None
    return out
