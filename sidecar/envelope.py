"""The request envelope: the one unit of data between stages.

An :class:`Envelope` holds one OTLP request of one signal: its item count (counted once,
where the data entered the sidecar) and its protobuf message and/or its wire encoding,
each made on first use. Stages that work on the encoding (span_metrics, tail_sampling,
the queues, the OTLP exporters) reuse the bytes the request was received as; stages that
read fields use :attr:`Envelope.message`.

The message is read-only. :meth:`Envelope.mutable` is the one way to change it, and it
gives up the encoding, so stale bytes can never be exported. Data shared by a fan-out is
marked read-only (:meth:`share`): ``mutable()`` on such a view hands that view a private
copy, so one branch's redaction never reaches another branch. Model: otelcol's
exporterhelper request (item count + encoding) and pdata's read-only marking in the
fan-out consumer.

    env = Envelope(Signal.TRACES, request)            # from a message (items counted now)
    env = Envelope(Signal.TRACES, encoded=raw, items=n) # from received bytes, parsed on first .message
    msg = env.mutable(); redact(msg); env.recount()     # change it: the bytes are gone
    env.replace_encoding(new_bytes)                     # or rewrite the bytes: the message is gone

A request shared by a fan-out also carries its :class:`Commitments`: waits for durability its
stages promised, which the fan-out runs once every branch had its turn.
"""

from __future__ import annotations

import threading
from typing import Callable

from sidecar.signals import Request, Signal, count_items


class Commitments:
    """Waits for durability a request's stages promised and have not confirmed yet, run before it is acknowledged.

    A stage that wrote a request to a log and has not synced it yet (tail sampling's log) may leave the wait
    for the sync here instead of blocking. The fan-out that shared the request runs every wait once all its
    branches had their turn (:meth:`settle`), and its answer to the sender follows: so the sync overlaps the
    other branches' work (the audit branch's journal and its commit), and a sync another request ran
    meanwhile covers the record for free. The shipped default runs about a third fewer fdatasyncs this way
    (docs/benchmarks.md, fourteenth round). A stage whose request carries no commitments waits itself.

    A failed wait refuses the request at the fan-out, after the stages in front of the waiting one saw it
    accepted (span_metrics counted its spans): the sender's retry counts them again, as it would after any
    other branch's refusal.
    """

    __slots__ = ("_waits", "_thread")

    def __init__(self) -> None:
        self._waits: list[Callable[[], None]] | None = []
        self._thread = threading.get_ident()  # the fan-out's: only it defers and settles, so no lock is needed

    def defer(self, wait: Callable[[], None]) -> bool:
        """Leave ``wait`` for :meth:`settle`; False once settled, or in another thread than the fan-out's (a stage
        that handed the request on to its own thread, such as a batch processor's flush): the caller then waits
        itself."""
        waits = self._waits
        if waits is None or threading.get_ident() != self._thread:
            return False
        waits.append(wait)
        return True

    def settle(self) -> None:
        """Run every wait, in order, each even when one before it failed (a wait also releases what it held);
        then raise the first failure. Waits deferred from now on are refused (:meth:`defer`)."""
        waits, self._waits = self._waits, None
        first: BaseException | None = None
        for wait in waits or ():
            try:
                wait()
            except BaseException as e:  # noqa: BLE001 - raised below, after the other waits ran
                if first is None:
                    first = e
        if first is not None:
            raise first


class Envelope:
    """One request of one signal between two stages; see the module docstring."""

    __slots__ = ("signal", "items", "_message", "_encoded", "read_only", "parts", "commitments")

    def __init__(self, signal: Signal, message: Request | None = None, *, encoded: bytes | None = None,
                 items: int | None = None, read_only: bool = False):
        if message is None and encoded is None:
            raise ValueError("an envelope needs its message or its encoding")
        self.signal = signal
        self._message = message
        self._encoded = encoded
        #: spans / log records / data points; counted from the message when not given
        self.items = count_items(signal, self.message) if items is None else items
        #: set on views shared by a fan-out: mutable() copies before handing the message out
        self.read_only = read_only
        #: the envelopes a merged envelope was made of (exporters that write one record per request)
        self.parts: tuple[Envelope, ...] | None = None
        #: the waits for durability this request's stages left for the fan-out that shared it (None: none is
        #: collecting them, a stage waits itself)
        self.commitments: Commitments | None = None

    @property
    def message(self) -> Request:
        """The request message, parsed from the encoding on first read. Do not change it: use :meth:`mutable`."""
        msg = self._message
        if msg is None:
            msg = self._message = self.signal.request_type.FromString(self._encoded)
        return msg

    @property
    def encoded(self) -> bytes:
        """The wire encoding: the received bytes while nothing changed the request, else serialized once now."""
        raw = self._encoded
        if raw is None:
            raw = self._encoded = self._message.SerializeToString()
        return raw

    @property
    def has_encoding(self) -> bool:
        """True when the encoding is at hand without serializing."""
        return self._encoded is not None

    @property
    def has_message(self) -> bool:
        """True when the message is at hand without parsing."""
        return self._message is not None

    def mutable(self) -> Request:
        """The message, to change in place. Drops the encoding; a read-only view gets its own copy first."""
        msg = self.message
        if self.read_only:
            copy = type(msg)()
            copy.CopyFrom(msg)
            msg = self._message = copy
            self.read_only = False
        self._encoded = None
        self.parts = None
        return msg

    def replace_encoding(self, encoded: bytes) -> None:
        """Give the request new bytes (a stage that rewrites the encoding, like wire-level redaction).

        The message is dropped with the old bytes, so nothing stale remains; the item count
        stays (the caller keeps the same items). A read-only view only changes itself.
        """
        self._encoded = encoded
        self._message = None
        self.read_only = False
        self.parts = None

    def compact(self) -> "Envelope":
        """The same request in its smallest form: only the encoding when there is one (queues hold these).

        A view is made, so other holders of this envelope keep their parsed message.
        """
        if self._encoded is None or self._message is None:
            return self
        view = self.share()
        view._message, view.read_only = None, self.read_only
        return view

    def recount(self) -> int:
        """Count the items again (after :meth:`mutable` removed some) and return the new count."""
        self.items = count_items(self.signal, self.message)
        return self.items

    def share(self) -> "Envelope":
        """A read-only view of the same data for one branch of a fan-out (no copy until someone mutates)."""
        view = Envelope.__new__(Envelope)
        view.signal, view.items = self.signal, self.items
        view._message, view._encoded = self._message, self._encoded
        view.read_only, view.parts, view.commitments = True, self.parts, self.commitments
        return view

    @classmethod
    def merge(cls, envelopes: "list[Envelope]") -> "Envelope":
        """One envelope holding several of the same signal, remembering its parts.

        The merged encoding is the concatenation of the parts' encodings (protobuf merges
        repeated top-level fields), so merging received requests costs no parse and no copy;
        a part that exists only as a message is serialized once.
        """
        if len(envelopes) == 1:
            return envelopes[0]
        merged = cls(envelopes[0].signal, encoded=b"".join([e.encoded for e in envelopes]),
                     items=sum(e.items for e in envelopes))
        merged.parts = tuple(envelopes)
        return merged

    def __repr__(self) -> str:
        forms = "+".join(f for f, v in (("message", self._message), ("encoded", self._encoded)) if v is not None)
        return f"Envelope({self.signal.value}, {self.items} items, {forms}{', read-only' if self.read_only else ''})"
