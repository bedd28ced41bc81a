"""The ``health_check`` extension: liveness and readiness over HTTP for Kubernetes probes.

``/healthz`` answers 200 while the process serves at all (liveness). ``/readyz`` and ``/``
answer 200 once every pipeline has started and 503 before that and during shutdown
(readiness: take the pod out of the Service while it drains).
"""

from __future__ import annotations

import json
import logging

from sidecar.component import Component, Kind
from sidecar.config import ConfigModel, HostPort, split_host_port
from sidecar.registry import CreateSettings, Factory

log = logging.getLogger(__name__)


class HealthCheckConfig(ConfigModel):
    endpoint: HostPort = "127.0.0.1:13133"


def _json(status: str) -> bytes:
    return json.dumps({"status": status}).encode()


_ALIVE = _json("alive")
_READY = _json("ready")
_NOT_READY = _json("not ready")
_NOT_FOUND = _json("not found")


class HealthCheck(Component):
    def __init__(self, settings: CreateSettings, config: HealthCheckConfig):
        self.id = str(settings.id)
        self.config = config
        self._host = None
        self._server = None
        self.port: int | None = None

    def _app(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            status, body = "200 OK", _ALIVE
        elif path in ("/readyz", "/"):
            ready = self._host is not None and self._host.ready.is_set()
            status, body = ("200 OK", _READY) if ready else ("503 Service Unavailable", _NOT_READY)
        else:
            status, body = "404 Not Found", _NOT_FOUND
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                ("Cache-Control", "no-store")])
        return [body] if environ.get("REQUEST_METHOD") != "HEAD" else []

    def start(self, host) -> None:
        from sidecar.httpserver import BackgroundHTTPServer

        self._host = host
        addr, port = split_host_port(self.config.endpoint)
        try:
            self._server = BackgroundHTTPServer(self._app, addr, port, name=f"{self.id}-http", threads=2)
        except OSError as e:
            raise OSError(f"extensions.{self.id}: cannot listen on {self.config.endpoint}: {e.strerror or e}") from None
        self._server.start()
        self.port = self._server.port
        log.info("%s: /healthz and /readyz on %s", self.id, self.config.endpoint)

    def shutdown(self, deadline: float) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


FACTORY = Factory(
    type="health_check",
    kind=Kind.EXTENSION,
    config_model=HealthCheckConfig,
    create=lambda settings, cfg, _next: HealthCheck(settings, cfg),
    signals=frozenset(),
)
