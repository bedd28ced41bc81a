"""The bounded in-memory sending queue: O(1) put, never blocks the caller, refuses when full."""

from __future__ import annotations

import collections
import threading
from typing import Callable

from sidecar.component import Refused
from sidecar.envelope import Envelope


class MemoryQueue:
    persistent = False

    def __init__(self, capacity: int, max_bytes: int | None = None):
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._bytes = 0  # encoded size of what waits
        self._items: collections.deque[Envelope] = collections.deque()
        self._sizes: collections.deque[int] = collections.deque()  # encoded size of each waiting item
        self._cond = threading.Condition()
        self._count = 0  # items (spans, ...) waiting, for the gauge
        self._out: dict[int, Envelope] = {}  # handed to a consumer, not settled yet (by id: the consumer holds it)
        self._closed = False
        self._aborted = False

    def put(self, envelope: Envelope) -> None:
        item = envelope.compact()
        size = _size(item)  # outside the lock: a message without its encoding is measured, O(size)
        with self._cond:
            if self._closed:
                raise Refused("shutting_down")
            if len(self._items) >= self.capacity:
                raise Refused("queue_full", message=f"sending queue is full ({self.capacity} requests)")
            if self.max_bytes is not None and self._items and self._bytes + size > self.max_bytes:
                raise Refused("queue_full", message=f"sending queue is full ({self._bytes} bytes waiting, "
                                                    f"max_bytes {self.max_bytes})")
            self._items.append(item)
            self._sizes.append(size)
            self._bytes += size
            self._count += envelope.items
            self._cond.notify()

    def get(self) -> Envelope | None:
        return self._take(block=True)

    def try_get(self) -> Envelope | None:
        return self._take(block=False)

    def _take(self, block: bool) -> Envelope | None:
        with self._cond:
            while block and not self._items and not self._closed and not self._aborted:
                self._cond.wait()
            if self._aborted or not self._items:
                return None
            item = self._items.popleft()
            self._count -= item.items
            self._bytes -= self._sizes.popleft()
            self._out[id(item)] = item
            return item

    def settle(self, items: list[Envelope], account: Callable[[], None]) -> bool:
        """Run ``account`` and forget ``items`` if :meth:`abort` has not already handed them back as lost."""
        with self._cond:
            out = self._out
            if not all(id(e) in out for e in items):
                return False
            for e in items:
                del out[id(e)]
            account()
            return True

    def done(self, item: Envelope) -> None:
        """The item is delivered or dropped for good (after :meth:`settle`, or by a consumer that never settles)."""
        with self._cond:
            self._out.pop(id(item), None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def abort(self) -> list[Envelope]:
        with self._cond:
            self._closed = self._aborted = True
            left = list(self._items) + list(self._out.values())  # waiting, and being pushed too late to count
            self._items.clear()
            self._out.clear()
            self._sizes.clear()
            self._bytes = 0
            self._count = 0
            self._cond.notify_all()
            return left

    @property
    def closed(self) -> bool:
        return self._closed

    def size(self) -> int:
        return len(self._items)

    def item_count(self) -> int:
        return self._count

    def byte_count(self) -> int:
        """Encoded bytes waiting (what ``max_bytes`` bounds)."""
        return self._bytes


def _size(envelope: Envelope) -> int:
    """Encoded size of a queued request: its bytes when it has them, else the message's serialized size."""
    return len(envelope.encoded) if envelope.has_encoding else envelope.message.ByteSize()
