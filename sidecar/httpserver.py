"""A WSGI app served by waitress on a background thread, for the HTTP receiver and extensions."""

from __future__ import annotations

import logging
import threading

from waitress import wasyncore
from waitress.server import create_server

log = logging.getLogger(__name__)


class BackgroundHTTPServer:
    def __init__(self, app, host: str, port: int, *, name: str, threads: int = 4, **waitress_options):
        self._server = create_server(app, host=host, port=port, threads=threads, ident=None,
                                     clear_untrusted_proxy_headers=True, **waitress_options)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.name = name

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
