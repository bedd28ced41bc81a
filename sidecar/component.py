"""The stage interface every component implements, and the errors that cross it.

A component gets the next stage in its constructor and exposes ``consume`` plus
``start``/``shutdown``. Errors are classified once, where they happen:

    Exception
     ├── Refused            consume() could not take the data; the sender may retry
     │                      (memory limit, queue full, disk full). Receivers map it to
     │                      gRPC RESOURCE_EXHAUSTED/UNAVAILABLE or HTTP 429/503.
     └── ExportError        a push to a backend failed
          ├── RetryableError   try again (after retry_after when the backend said so)
          └── PermanentError   drop and count; retrying cannot help
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sidecar.envelope import Envelope
    from sidecar.host import Host


class Refused(Exception):
    """The pipeline did not accept the data. Nothing of it was kept."""

    def __init__(self, reason: str, *, retryable: bool = True, retry_after: float | None = None,
                 message: str | None = None):
        super().__init__(message or reason)
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after
        #: set by the first pipeline edge that counts it, so stages in front do not count it again
        self.counted = False


class ExportError(Exception):
    """A push to a backend failed."""

    reason: str = "export_failed"


class RetryableError(ExportError):
    def __init__(self, message: str, *, retry_after: float | None = None, reason: str = "retryable"):
        super().__init__(message)
        self.retry_after = retry_after
        self.reason = reason


class PermanentError(ExportError):
    def __init__(self, message: str, *, reason: str = "permanent"):
        super().__init__(message)
        self.reason = reason


class Kind(str, enum.Enum):
    RECEIVER = "receiver"
    PROCESSOR = "processor"
    EXPORTER = "exporter"
    EXTENSION = "extension"

    @property
    def section(self) -> str:
        """The YAML section that holds components of this kind."""
        return self.value + "s"


class Consumer(Protocol):
    def consume(self, envelope: "Envelope") -> None:
        """Take ownership of ``envelope`` or raise :class:`Refused`.

        Returning means the data is accepted: from here on, losing it is this
        component's fault and must be reported as dropped, with a reason. The pipeline
        counts received / accepted / refused at its edges; components do not.
        To change the data, call ``envelope.mutable()`` (never edit ``envelope.message``).
        """


class Component:
    """Base for every receiver, processor, exporter and extension.

    Contract (checked over the registry by tests/sidecar/test_contract.py): ``shutdown`` works
    without ``start`` and twice; ``start``/``shutdown`` may run twice.
    """

    def start(self, host: "Host") -> None:  # noqa: B027 - optional hook
        """Open sockets, start workers. Called back to front: exporters before receivers."""

    def shutdown(self, deadline: float) -> None:  # noqa: B027 - optional hook
        """Stop and drain into the next stage before the monotonic ``deadline``.

        Called front to back: receivers first, so every stage drains into a live one.
        """
