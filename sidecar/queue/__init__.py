"""Sending queues (in memory or on disk) and retry, the reliability half of every exporter.

A queue holds whole OTLP requests. ``put`` is the acknowledgement: once it returns
the request is the queue's (on disk already for the persistent queue). Consumers
``get`` an item, push it, then ``done`` it; only then may a persistent queue forget it,
so a crash between the two delivers it again (at-least-once).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from sidecar.signals import Request, Signal


@dataclass(eq=False)
class QueueItem:
    signal: Signal
    request: Request
    #: spans / log records / data points, counted once when the item was accepted
    items: int
    #: where a persistent queue keeps it (None in memory)
    key: str | None = field(default=None, repr=False)


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
