"""Sending queues (in memory or on disk) and retry, the reliability half of every exporter.

A queue holds whole requests as :class:`~sidecar.envelope.Envelope` objects, which know
their item count and keep the received encoding (a memory queue keeps only the bytes when
it has them: about a fifth of the memory of the message). ``put`` is the acknowledgement:
once it returns the envelope is the queue's (on disk already for the persistent queue).
Consumers ``get`` an envelope, push it, then ``done`` it; only then may a persistent queue
forget it, so a crash between the two delivers it again (at-least-once).
"""

from __future__ import annotations

from typing import Callable, Protocol

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

    def settle(self, items: list[Envelope], account: Callable[[], None]) -> bool:
        """A consumer finished with ``items``: under the queue's lock, run ``account`` (count the outcome)
        and return True, unless :meth:`abort` already accounted for them (lost or kept on disk): False.

        Counting under the lock that ``abort`` takes makes shutdown's count complete when it returns.
        """

    def done(self, item: Envelope) -> None:
        """The item was exported or dropped for good: forget it."""

    def close(self) -> None:
        """Refuse new requests; consumers drain what is left."""

    def abort(self) -> list[Envelope]:
        """Wake every consumer, stop handing out items and release resources.

        Returns the items this loses, those handed to consumers and not settled included (a persistent
        queue keeps them on disk, returns none and sets ``kept_by_signal``).
        """

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran: the queue takes nothing more."""

    def size(self) -> int: ...

    def item_count(self) -> int: ...

    @property
    def persistent(self) -> bool: ...
