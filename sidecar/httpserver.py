"""A WSGI app served by waitress on a background thread, for the HTTP receiver and extensions.

Waitress reads requests on one event loop and hands only complete ones to worker threads,
so a slow client cannot hold a worker; it can hold a connection. Two limits keep slow or
lying clients (slowloris, a ``Content-Length`` larger than the body) from exhausting the
connection slots: ``read_header_timeout`` (the request line and headers) and
``read_timeout`` (the whole request, body included), both from the request's first byte.
A connection that passes either is closed and reported to ``on_timeout``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.server import create_server

log = logging.getLogger(__name__)


class _TimedChannel(HTTPChannel):
    """Remembers when the request being read started, so the server can bound its read time."""

    request_started = 0.0

    def received(self, data):
        if self.request is None and data:
            self.request_started = time.time()  # waitress's maintenance clock
        return super().received(data)


class BackgroundHTTPServer:
    def __init__(self, app, host: str, port: int, *, name: str, threads: int = 4,
                 read_header_timeout: float | None = None, read_timeout: float | None = None,
                 idle_timeout: float | None = None, max_connections: int | None = None,
                 on_timeout: Callable[[str], None] | None = None, **waitress_options):
        if idle_timeout is not None:
            waitress_options["channel_timeout"] = idle_timeout
        if max_connections is not None:
            waitress_options["connection_limit"] = max_connections
        limits = [t for t in (read_header_timeout, read_timeout, idle_timeout) if t]
        if limits:  # maintenance runs every cleanup_interval seconds: often enough to honour the limits
            waitress_options.setdefault("cleanup_interval", max(0.2, min(limits) / 4))
        self._server = create_server(app, host=host, port=port, threads=threads, ident=None,
                                     clear_untrusted_proxy_headers=True, **waitress_options)
        self._server.channel_class = _TimedChannel
        self._read_header_timeout = read_header_timeout
        self._read_timeout = read_timeout
        self._on_timeout = on_timeout
        idle_maintenance = self._server.maintenance

        def maintenance(now: float) -> None:
            idle_maintenance(now)
            self._close_slow_requests(now)

        self._server.maintenance = maintenance
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.name = name

    def _close_slow_requests(self, now: float) -> None:
        """Close connections whose request has taken longer than the read limits to arrive."""
        for channel in list(self._server.active_channels.values()):
            request = getattr(channel, "request", None)
            if request is None or channel.will_close or not channel.request_started:
                continue
            elapsed = now - channel.request_started
            if not request.headers_finished and self._read_header_timeout and elapsed > self._read_header_timeout:
                reason = "read_header_timeout"
            elif self._read_timeout and elapsed > self._read_timeout:
                reason = "read_timeout"
            else:
                continue
            channel.will_close = True
            if self._on_timeout is not None:
                try:
                    self._on_timeout(reason)
                except Exception:  # pragma: no cover - counting must never stop the event loop
                    log.exception("%s: on_timeout failed", self.name)

    @property
    def port(self) -> int:
        return self._server.effective_port

    def _run(self) -> None:
        try:
            self._server.run()
        except Exception:  # pragma: no cover - logged, never crashes the process
            log.exception("%s: HTTP server stopped", self.name)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Let running requests finish (up to ``timeout``), then close the listener and every open connection.

        A single-socket waitress server's ``close()`` only closes the listener: an idle keep-alive
        connection would keep its loop, and this thread, alive until ``channel_timeout``.
        """
        server = self._server
        server.task_dispatcher.shutdown(timeout=timeout)
        wasyncore.close_all(getattr(server, "map", None) or server._map)  # noqa: SLF001 - waitress's socket map
        self._thread.join(timeout)
