"""The bounded in-memory sending queue: O(1) put, never blocks the caller, refuses when full."""

from __future__ import annotations

import collections
import threading
from typing import Callable

from sidecar.component import Refused
from sidecar.envelope import Envelope


class MemoryQueue:
    persistent = False

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: collections.deque[Envelope] = collections.deque()
        self._cond = threading.Condition()
        self._count = 0  # items (spans, ...) waiting, for the gauge
        self._out: dict[int, Envelope] = {}  # handed to a consumer, not settled yet (by id: the consumer holds it)
        self._closed = False
        self._aborted = False

    def put(self, envelope: Envelope) -> None:
        with self._cond:
            if self._closed:
                raise Refused("shutting_down")
            if len(self._items) >= self.capacity:
                raise Refused("queue_full", message=f"sending queue is full ({self.capacity} requests)")
            self._items.append(envelope.compact())
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
