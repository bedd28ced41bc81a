"""What a running component can reach: extensions, self-telemetry, readiness."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable, NamedTuple, Protocol, Sequence

if TYPE_CHECKING:
    from sidecar.component import Component, Refused
    from sidecar.telemetry import SelfTelemetry


class Admission(Protocol):
    def admit(self, nbytes: int) -> "Refused | None": ...

    def admitted(self, nbytes: int) -> None: ...


class Decision(NamedTuple):
    """One tail-sampling decision: the trace, whether it was kept, and the policy that decided."""

    trace_id: bytes
    kept: bool
    policy: str


class SamplingDecisions:
    """The explicit channel from tail samplers to whatever waits on their decisions (span_metrics' exemplars).

    A sampler ``register``s in its ``start()`` with its decision wait; the graph starts back to front,
    so a stage in front of a sampler sees it registered in its own ``start()`` and can ``subscribe``.
    ``publish`` calls every subscriber synchronously, on the sampler's thread and outside its locks.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: tuple[Callable[[Sequence[Decision]], None], ...] = ()
        #: component id -> its decision wait (seconds)
        self.publishers: dict[str, float] = {}

    def register(self, component_id: str, decision_wait: float) -> None:
        with self._lock:
            self.publishers[component_id] = decision_wait

    @property
    def max_wait(self) -> float:
        """The longest decision wait of the registered samplers (0 with none)."""
        return max(self.publishers.values(), default=0.0)

    def subscribe(self, callback: Callable[[Sequence[Decision]], None]) -> None:
        with self._lock:
            self._subscribers += (callback,)

    def unsubscribe(self, callback: Callable[[Sequence[Decision]], None]) -> None:
        with self._lock:
            self._subscribers = tuple(c for c in self._subscribers if c != callback)

    @property
    def subscribed(self) -> bool:
        """Whether anyone listens (a sampler builds no decision list for nobody)."""
        return bool(self._subscribers)

    def publish(self, decisions: Sequence[Decision]) -> None:
        if decisions:
            for callback in self._subscribers:
                callback(decisions)


class Host:
    def __init__(self, telemetry: "SelfTelemetry"):
        self.telemetry = telemetry
        self.extensions: dict[str, "Component"] = {}
        #: set once every pipeline has started; cleared when shutdown begins
        self.ready = threading.Event()
        #: set when shutdown begins; stages use it to stop waiting (retry backoff, queue reads)
        self.stopping = threading.Event()
        #: asked by receivers before they parse a request of ``n`` bytes (memory limiters add themselves):
        #: ``admit(n)`` returns the :class:`~sidecar.component.Refused` to answer with, or None to go ahead,
        #: and then ``admitted(n)`` is called once the request has been handed on
        self.admission: list["Admission"] = []
        #: tail samplers publish every decision here (kept and dropped); span_metrics holds exemplars until then
        self.sampling_decisions = SamplingDecisions()

    def extension(self, component_id: str) -> "Component":
        try:
            return self.extensions[component_id]
        except KeyError:
            raise LookupError(f"extension {component_id!r} is not enabled in service.extensions") from None
