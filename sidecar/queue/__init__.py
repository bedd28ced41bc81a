"""Sending queues (in memory or on disk) and retry, the reliability half of every exporter.

A queue holds whole requests as :class:`~sidecar.envelope.Envelope` objects, which know
their item count and keep the received encoding (a memory queue keeps only the bytes when
it has them: about a fifth of the memory of the message). ``put`` is the acknowledgement:
once it returns the envelope is the queue's (on disk already for the persistent queue).
Consumers ``get`` an envelope, push it, then ``done`` it; only then may a persistent queue
forget it, so a crash between the two delivers it again (at-least-once).
"""

from __future__ import annotations

from typing import Protocol

from sidecar.envelope import Envelope


class SendingQueue(Protocol):
    capacity: int

    def put(self, envelope: Envelope) -> None:
        """Keep the envelope or raise :class:`~sidecar.component.Refused`
        (``queue_full``, ``disk_full``, ``storage_error``, ``shutting_down``)."""

    def get(self) -> Envelope | None:
        """Block for the next item; None once the queue is closed and empty, or aborted."""

    def try_get(self) -> Envelope | None:
        """The next item if one is waiting right now, else None (never blocks): batching takes what is there."""

    def done(self, item: Envelope) -> None:
        """The item was exported or dropped for good: forget it."""

    def close(self) -> None:
        """Refuse new requests; consumers drain what is left."""

    def abort(self) -> list[Envelope]:
        """Wake every consumer, stop handing out items and release resources.

        Returns the items this loses (a persistent queue keeps them on disk and returns none).
        """

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran: the queue takes nothing more."""

    def size(self) -> int: ...

    def item_count(self) -> int: ...

    @property
    def persistent(self) -> bool: ...
