"""Sending queues (in memory or on disk) and retry, the reliability half of every exporter.

A queue holds whole OTLP requests. ``put`` is the acknowledgement: once it returns
the request is the queue's (on disk already for the persistent queue). Consumers
``get`` an item, push it, then ``done`` it; only then may a persistent queue forget it,
so a crash between the two delivers it again (at-least-once).
"""

from __future__ import annotations

from typing import Protocol

from sidecar.signals import Request, Signal


class QueueItem:
    """One accepted request: its message, its wire encoding, or both.

    A queue keeps the encoding when it is known for free (the bytes the request was received
    or batched as; what a persistent queue reads from disk) and then no message at all — about a
    fifth of the memory — and the OTLP exporters send those bytes as they are. Whichever form is
    missing is made on first use.
    """

    __slots__ = ("signal", "items", "key", "_request", "_wire")

    def __init__(self, signal: Signal, request: Request | None, items: int, key: str | None = None, *,
                 wire: bytes | None = None):
        if request is None and wire is None:
            raise ValueError("a queue item needs its request or its encoding")
        self.signal = signal
        #: spans / log records / data points, counted once when the item was accepted
        self.items = items
        #: where a persistent queue keeps it (None in memory)
        self.key = key
        self._request = request
        self._wire = wire

    @property
    def request(self) -> Request:
        if self._request is None:
            self._request = self.signal.request_type.FromString(self._wire)
        return self._request

    @property
    def wire(self) -> bytes:
        if self._wire is None:
            self._wire = self._request.SerializeToString()
        return self._wire

    def __repr__(self) -> str:
        return f"QueueItem({self.signal.value}, {self.items} items)"


class SendingQueue(Protocol):
    capacity: int

    def put(self, signal: Signal, request: Request, items: int) -> None:
        """Keep the request or raise :class:`~sidecar.component.Refused`
        (``queue_full``, ``disk_full``, ``storage_error``, ``shutting_down``)."""

    def get(self) -> QueueItem | None:
        """Block for the next item; None once the queue is closed and empty, or aborted."""

    def try_get(self) -> QueueItem | None:
        """The next item if one is waiting right now, else None (never blocks): batching takes what is there."""

    def done(self, item: QueueItem) -> None:
        """The item was exported or dropped for good: forget it."""

    def close(self) -> None:
        """Refuse new requests; consumers drain what is left."""

    def abort(self) -> list[QueueItem]:
        """Wake every consumer, stop handing out items and release resources.

        Returns the items this loses (a persistent queue keeps them on disk and returns none).
        """

    def size(self) -> int: ...

    def item_count(self) -> int: ...

    @property
    def persistent(self) -> bool: ...
