"""A background loop with start/stop: the one way a component runs periodic work.

``Ticker(work, interval)`` calls ``work()`` every ``interval`` seconds on a daemon thread;
``interval`` may be a callable returning the seconds until the next call (None: wait until
:meth:`wake`). An exception in ``work`` is logged and the loop goes on: a dead timer would
let data pile up silently. ``stop`` may be called without ``start`` and more than once.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Union

log = logging.getLogger(__name__)

Interval = Union[float, Callable[[], Union[float, None]]]


class Ticker:
    def __init__(self, work: Callable[[], None], interval: Interval, *, name: str):
        self._work = work
        self._interval = interval
        self.name = name
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the loop (again, after a stop)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._wake.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Run the work now (used when new data makes an earlier deadline)."""
        self._wake.set()

    def stop(self, deadline: float | None = None) -> None:
        """End the loop and wait for a running ``work()`` to finish, until the monotonic ``deadline``."""
        self._stopping = True
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._stopping

    def _next_wait(self) -> float | None:
        interval = self._interval
        wait = interval() if callable(interval) else interval
        return None if wait is None else max(0.0, wait)

    def _run(self) -> None:
        while True:
            self._wake.wait(self._next_wait())
            self._wake.clear()
            if self._stopping:
                return
            try:
                self._work()
            except Exception:
                log.exception("%s: periodic work failed", self.name)
