"""Building tail_sampling's output from encoded parts, without parsing what it forwards.

Export*ServiceRequest, Resource{Spans,Logs} and Scope{Spans,Logs} share one layout: field 1 is
the resource/scope (or, in the request, the resource entries), field 2 the repeated children.
Kept spans get ``sampling.policy`` and ``ot=th:...`` appended as encoded fields.
"""

from __future__ import annotations

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from contract.attributes import SAMPLING_POLICY
from sidecar.protowire import VARINTS, encode_varint, length_delimited
from sidecar.processors.tail_sampling.decisions import with_threshold
from sidecar.signals import Request, Signal

#: The span attribute naming the policy that kept the span's trace.
POLICY_ATTRIBUTE = SAMPLING_POLICY
_POLICY_BYTES = POLICY_ATTRIBUTE.encode()


# --- building requests from encoded parts -------------------------------------------------------------
# Export*ServiceRequest, Resource{Spans,Logs} and Scope{Spans,Logs} share one layout: field 1 is the
# resource/scope (or, in the request, the resource entries), field 2 the repeated children. A "head" is an
# encoded Resource{Spans,Logs} or Scope{Spans,Logs} without its children (the wire scanner's
# ResourceGroup.head / ScopeGroup.head); appending length-delimited field-2 entries to it gives the
# whole message.



_TAG1, _TAG2 = b"\x0a", b"\x12"


class Output:
    """Collects encoded items under their resource and scope heads; :meth:`encoded` splices them into a request."""

    __slots__ = ("signal", "n", "_resources")

    def __init__(self, signal: Signal):
        self.signal = signal
        self.n = 0
        self._resources: dict[bytes, dict[bytes, list[bytes]]] = {}

    def add(self, resource_head: bytes, scope_head: bytes, items: list[bytes]) -> None:
        """Add encoded items (spans or log records) as they are."""
        scopes = self._resources.get(resource_head)
        if scopes is None:
            scopes = self._resources[resource_head] = {}
        entries = scopes.get(scope_head)
        if entries is None:
            entries = scopes[scope_head] = []
        varints = VARINTS
        entries.extend([_TAG2 + varints[len(b)] + b if len(b) < 16384 else length_delimited(_TAG2, b) for b in items])
        self.n += len(items)

    def encoded(self) -> bytes:
        """The Export*ServiceRequest's encoding: the items spliced under their heads, unparsed (kept spans
        carry their appended fields, which a parser merges: the last tracestate wins)."""
        parts = []
        for resource_head, scopes in self._resources.items():
            body = resource_head + b"".join(
                [length_delimited(_TAG2, scope_head + b"".join(entries)) for scope_head, entries in scopes.items()])
            parts.append(length_delimited(_TAG1, body))
        return b"".join(parts)

    def request(self) -> Request:
        """:meth:`encoded`, parsed."""
        return self.signal.request_type.FromString(self.encoded())


class KeptSpans:
    """Encodes kept spans with their trace's policy name and sampling threshold appended (memoised per output)."""

    __slots__ = ("_suffixes",)

    def __init__(self):
        self._suffixes: dict[tuple[str, int, str], bytes | None] = {}

    def encode(self, blobs: list[bytes], tracestate: str, threshold: int, policy: str) -> list[bytes]:
        key = (tracestate, threshold, policy)
        suffix = self._suffixes.get(key, b"")
        if suffix == b"":
            suffix = self._suffixes[key] = _suffix(tracestate, threshold, policy)
        if suffix is None:
            return [_marked_slowly(b, tracestate, threshold, policy) for b in blobs]
        return [b + suffix if _POLICY_BYTES not in b else _marked_slowly(b, tracestate, threshold, policy)
                for b in blobs]


def _suffix(tracestate: str, threshold: int, policy: str) -> bytes | None:
    """Encoded fields that, appended to a span, set its new tracestate and add the policy attribute.

    None when the new tracestate is empty but the old one is not: an empty string is not encoded,
    so appending cannot clear a field.
    """
    new_ts = with_threshold(tracestate, threshold)
    if not new_ts and tracestate:
        return None
    attr = KeyValue(key=POLICY_ATTRIBUTE, value=AnyValue(string_value=policy))
    return Span(trace_state=new_ts, attributes=[attr]).SerializeToString()


def _marked_slowly(blob: bytes, tracestate: str, threshold: int, policy: str) -> bytes:
    """The general case: parse, replace the attribute if the span already has one, re-encode."""
    span = Span.FromString(blob)
    span.trace_state = with_threshold(tracestate, threshold)
    for kv in span.attributes:
        if kv.key == POLICY_ATTRIBUTE:
            kv.value.string_value = policy
            break
    else:
        span.attributes.add(key=POLICY_ATTRIBUTE).value.string_value = policy
    return span.SerializeToString()
