"""Output a stage has accepted and holds for the next stage: ordered, bounded, honouring retry-after.

``batch`` and ``tail_sampling`` accept data and hand it on later; when the next stage refuses,
the data must wait, in order, without hammering the refusing stage, and without growing
forever. An :class:`Outbox` does that once for both:

- :meth:`put` appends an envelope; beyond ``max_items`` the oldest are dropped and counted
  (``downstream_refused``: loss, not intended).
- :meth:`flush` delivers in order, one delivery at a time; a retryable refusal keeps the
  envelope at the head and pauses until ``retry_after`` (at least ``min_retry_delay``); a
  permanent refusal drops it, counted with the refusal's reason.
- :meth:`drain` flushes until empty or the shutdown deadline, then counts what is left
  dropped (``shutdown``).
- With ``coalesce``, a delivery takes the head together with the held envelopes of its signal
  (up to ``coalesce_items`` items) as one: what piled up while the next stage was busy goes
  on as one request, not one per producer (tail sampling's decisions forced by a full buffer
  come one small output per received request; each was a persistent-queue file and an export).
  While the next stage refuses, nothing more merges: the backlog stays as it came, so what
  ``max_items`` drops is the oldest envelopes, not a large merge of them.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from itertools import islice
from typing import Callable

from sidecar.component import Consumer, Refused
from sidecar.envelope import Envelope
from sidecar.signals import Signal
from sidecar.telemetry import ComponentTelemetry

log = logging.getLogger(__name__)


class Outbox:
    def __init__(self, next_consumer: Consumer, telemetry: ComponentTelemetry, *, max_items: int,
                 min_retry_delay: float = 0.0, clock: Callable[[], float] = time.monotonic, name: str = "",
                 coalesce: Callable[[list[Envelope]], Envelope] | None = None, coalesce_items: int = 0,
                 release: Callable[[Envelope], None] | None = None):
        self._next = next_consumer
        #: called with each envelope dropped past ``max_items``: what it held for its data goes with it (tail
        #: sampling's log pin; kept, the pin would hold its segment and every newer one on disk for good)
        self._release = release
        #: merges a run of held same-signal envelopes into one (None: each is delivered as it came)
        self._coalesce = coalesce
        self._coalesce_items = coalesce_items
        #: the last delivery was refused for now: nothing merges into the head until one is accepted, so a
        #: backlog past ``max_items`` loses its oldest envelopes as they came, not a merge of many
        self._refused = False
        self._tel = telemetry
        self.max_items = max_items
        self._min_retry = min_retry_delay
        self._clock = clock
        self._name = name
        self._lock = threading.Lock()  # the deque, items, retry_at
        self._send_lock = threading.Lock()  # one delivery at a time keeps the order
        self._held: collections.deque[Envelope] = collections.deque()
        #: items held (the gauge and the callers' limits read it)
        self.items = 0
        #: after a retryable refusal, no delivery before this clock time
        self.retry_at = float("-inf")
        self._in_flight: Envelope | None = None  # being delivered: put() never drops it

    def __len__(self) -> int:
        return len(self._held)

    def put(self, envelope: Envelope) -> None:
        """Hold ``envelope`` for delivery; beyond ``max_items`` the oldest held data is dropped and counted."""
        dropped: list[Envelope] = []
        with self._lock:
            self._held.append(envelope)
            self.items += envelope.items
            while self.items > self.max_items and len(self._held) > 1:
                old = self._held.popleft()
                if old is self._in_flight:  # being delivered right now: drop the next one instead
                    victim = self._held.popleft()
                    self._held.appendleft(old)
                    old = victim
                self.items -= old.items
                dropped.append(old)
        for env in dropped:
            self._tel.dropped(env.signal, env.items, "downstream_refused")
            if self._release is not None:
                self._release(env)
        if dropped:
            log.warning("%s: output held over %d items; dropped the oldest %d requests", self._name,
                        self.max_items, len(dropped))

    def waiting(self) -> bool:
        """True while a refusal's retry-after has not passed: callers must not push now."""
        return bool(self._held) and self._clock() < self.retry_at

    def flush(self, *, blocking: bool = True) -> bool:
        """Deliver held envelopes in order until empty, refused or waiting; True when empty."""
        if not self._send_lock.acquire(blocking=blocking):
            return False
        try:
            while True:
                with self._lock:
                    if not self._held:
                        return True
                    if self._clock() < self.retry_at:
                        return False
                    env = self._held[0]
                    if self._coalesce is not None and not self._refused and len(self._held) > 1:
                        env = self._coalesced_head()
                    self._in_flight = env
                done = self._deliver(env)
                with self._lock:
                    self._in_flight = None
                    self._refused = not done
                    if not done:
                        return False
                    if self._held and self._held[0] is env:
                        self._held.popleft()
                        self.items -= env.items
        finally:
            self._send_lock.release()

    def _coalesced_head(self) -> Envelope:
        """Replace the head and the held envelopes of its signal (at most ``coalesce_items`` items in all, in
        order) by their merge, at the head; returns it. Other signals keep their order among themselves (they go
        to other pipelines). Call with the lock held: :meth:`put` sees one envelope."""
        held = self._held
        head = held[0]
        run, n, rest = [head], head.items, []
        taking = True  # until one of the head's signal stays: the later ones stay behind it
        for env in islice(held, 1, None):
            if taking and env.signal is head.signal:
                if env.commitments is None and n + env.items <= self._coalesce_items:
                    run.append(env)
                    n += env.items
                    continue
                taking = False
            rest.append(env)
        if len(run) == 1:
            return head
        merged = self._coalesce(run)
        held.clear()
        held.append(merged)
        held.extend(rest)
        return merged

    def _deliver(self, env: Envelope) -> bool:
        """One delivery. False: refused for now (kept at the head); True: done with it (sent or dropped)."""
        try:
            self._next.consume(env)
        except Refused as e:
            if e.retryable:
                with self._lock:
                    self.retry_at = self._clock() + max(self._min_retry, e.retry_after or 0.0)
                return False
            log.warning("%s: next stage rejected %d %s for good: %s", self._name, env.items, env.signal.item_name, e)
            self._tel.dropped(env.signal, env.items, e.reason)
        except Exception:
            log.exception("%s: next stage failed on %d %s; dropping them", self._name, env.items,
                          env.signal.item_name)
            self._tel.dropped(env.signal, env.items, "downstream_error")
        return True

    def drain(self, deadline: float, wait: Callable[[float], object] = time.sleep, *,
              on_disk: bool = False) -> dict[Signal, int]:
        """Flush until empty or the monotonic ``deadline``, then count the rest dropped (``shutdown``). With
        ``on_disk`` (what the envelopes hold is on disk for the next start: tail sampling's log) the rest is
        not lost: it is forgotten uncounted and returned, items per signal, for the shutdown report."""
        while not self.flush() and time.monotonic() < deadline:
            with self._lock:
                self.retry_at = float("-inf")  # at shutdown, try again soon rather than honour long delays
            wait(min(0.05, max(0.0, deadline - time.monotonic())))
        if not on_disk:
            self.discard("shutdown")
            return {}
        left: dict[Signal, int] = {}
        for env in self._take_all():
            left[env.signal] = left.get(env.signal, 0) + env.items
        if left:
            log.info("%s: %d items not handed on by the shutdown deadline stay on disk for the next start",
                     self._name, sum(left.values()))
        return left

    def _take_all(self) -> list[Envelope]:
        """Everything held, now no longer held."""
        with self._lock:
            left = list(self._held)
            self._held.clear()
            self.items = 0
        return left

    def discard(self, reason: str) -> int:
        """Count everything held as dropped with ``reason`` and forget it; returns the items."""
        left = self._take_all()
        for env in left:
            self._tel.dropped(env.signal, env.items, reason)
        n = sum(e.items for e in left)
        if n:
            log.warning("%s: dropping %d items still held at the shutdown deadline", self._name, n)
        return n
