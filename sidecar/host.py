"""What a running component can reach: extensions, self-telemetry, readiness."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sidecar.component import Component, Refused
    from sidecar.telemetry import SelfTelemetry


class Admission(Protocol):
    def admit(self, nbytes: int) -> "Refused | None": ...

    def admitted(self, nbytes: int) -> None: ...


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

    def extension(self, component_id: str) -> "Component":
        try:
            return self.extensions[component_id]
        except KeyError:
            raise LookupError(f"extension {component_id!r} is not enabled in service.extensions") from None
