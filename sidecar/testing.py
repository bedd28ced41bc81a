"""Test doubles that ship with the product: a real OTLP backend and a sidecar process runner.

``OTLPBackend`` is a real OTLP/gRPC server on loopback that records every request
and can be taken down and brought back to simulate an outage, or told to answer
with an error code. ``OTLPHTTPBackend`` does the same over OTLP/HTTP.
``SidecarProcess`` starts ``python -m sidecar`` with a config and waits until it is
ready. Users can test their own configs and pipelines with them.
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from sidecar.envelope import Envelope
from sidecar.signals import Signal, count_items


def _ephemeral_port_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_PORT_FLOOR = 10000
_PORT_CEILING = max(_PORT_FLOOR + 2000, _ephemeral_port_floor())
_next_port = _PORT_FLOOR + (os.getpid() * 7919) % (_PORT_CEILING - _PORT_FLOOR)
_next_port_lock = threading.Lock()


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A loopback port nothing is bound to, for a server a test starts next.

    Why not ``bind(0)``: the kernel hands out the same ephemeral range to every outgoing
    connection, so between this probe and the server's own bind any client socket (a gRPC
    channel, an exporter's retry) can take the port and the server fails with "Address already
    in use". Ports below that range are only ever taken by an explicit bind, so they are handed
    out from there in turn (none twice before the range is used up), from a per-process offset.
    """
    global _next_port
    span = _PORT_CEILING - _PORT_FLOOR
    for _ in range(span):
        with _next_port_lock:
            port, _next_port = _next_port, _PORT_FLOOR + (_next_port + 1 - _PORT_FLOOR) % span
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free loopback port in {_PORT_FLOOR}..{_PORT_CEILING - 1}")


class _Counting:
    """Items received per signal with a waitable count, and failures injected on demand.

    ``failure`` is what the next calls answer instead of accepting; with ``fail_times`` > 0
    only that many calls fail, then the failure clears itself.
    """

    def __init__(self):
        self.lock = threading.Condition()
        self.items: dict[Signal, int] = {s: 0 for s in Signal}
        self.calls = 0
        self.failure = None
        self.fail_times = 0

    def _next_failure(self):
        """Called with the lock held: the failure for this call, or None to accept it."""
        self.calls += 1
        failure = self.failure
        if failure is not None and self.fail_times > 0:
            self.fail_times -= 1
            if self.fail_times == 0:
                self.failure = None
        return failure

    def _count(self, signal: Signal, request) -> None:
        """Called with the lock held, for an accepted request."""
        self.items[signal] += count_items(signal, request)
        self.lock.notify_all()

    def wait_for_items(self, signal: Signal, n: int, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        with self.lock:
            while self.items[signal] < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.lock.wait(left)
            return True


class _Recorder(_Counting):
    """Requests received per signal, plus an optional injected failure.

    ``failure`` is (grpc.StatusCode, http status, retry_after seconds or None).
    """

    def __init__(self):
        super().__init__()
        self.requests: dict[Signal, list] = {s: [] for s in Signal}

    def record(self, signal: Signal, request) -> tuple | None:
        with self.lock:
            failure = self._next_failure()
            if failure is None:
                self.requests[signal].append(request)
                self._count(signal, request)
            return failure

    # flattened views -----------------------------------------------------------------------

    def spans(self) -> list:
        """(resource, scope, span) for every span received, in arrival order."""
        with self.lock:
            reqs = list(self.requests[Signal.TRACES])
        return [(rs.resource, ss.scope, span) for r in reqs for rs in r.resource_spans
                for ss in rs.scope_spans for span in ss.spans]

    def log_records(self) -> list:
        with self.lock:
            reqs = list(self.requests[Signal.LOGS])
        return [(rl.resource, sl.scope, rec) for r in reqs for rl in r.resource_logs
                for sl in rl.scope_logs for rec in sl.log_records]

    def metrics(self) -> list:
        with self.lock:
            reqs = list(self.requests[Signal.METRICS])
        return [(rm.resource, sm.scope, m) for r in reqs for rm in r.resource_metrics
                for sm in rm.scope_metrics for m in sm.metrics]

    def clear(self) -> None:
        with self.lock:
            for s in Signal:
                self.requests[s].clear()
                self.items[s] = 0


class _Servicer:
    def __init__(self, recorder: _Recorder, signal: Signal):
        self.recorder = recorder
        self.signal = signal

    def Export(self, request, context):  # noqa: N802 - gRPC method name
        failure = self.recorder.record(self.signal, request)
        if failure is not None:
            code, _http, retry_after = failure
            if retry_after is not None:
                from google.protobuf import duration_pb2
                from google.rpc import error_details_pb2, status_pb2

                info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(
                    seconds=int(retry_after), nanos=int((retry_after % 1) * 1e9)))
                status = status_pb2.Status(code=code.value[0], message="injected failure")
                status.details.add().Pack(info)
                context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
            context.abort(code, "injected failure")
        return self.signal.response_type()


class OTLPBackend(_Recorder):
    """A real OTLP/gRPC server on 127.0.0.1 that records what it receives."""

    def __init__(self, port: int | None = None):
        super().__init__()
        self.port = port or free_port()
        self._server: grpc.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "OTLPBackend":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                             options=[("grpc.max_receive_message_length", 64 * 1024 * 1024),
                                      ("grpc.so_reuseport", 1)])
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Servicer(self, Signal.TRACES), server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_Servicer(self, Signal.LOGS), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Servicer(self, Signal.METRICS), server)
        server.add_insecure_port(self.endpoint)
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        """Take the backend down (connections refused) until :meth:`start` is called again."""
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    def __enter__(self) -> "OTLPBackend":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class OTLPHTTPBackend(_Recorder):
    """A real OTLP/HTTP (protobuf) server on 127.0.0.1 that records what it receives."""

    _PATHS = {"/v1/traces": Signal.TRACES, "/v1/logs": Signal.LOGS, "/v1/metrics": Signal.METRICS}

    def __init__(self, port: int | None = None):
        super().__init__()
        self.port = port or free_port()
        self._server = None
        self.headers_seen: list[dict] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _app(self, environ, start_response):
        import gzip

        sig = self._PATHS.get(environ.get("PATH_INFO", ""))
        if sig is None:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found"]
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        if environ.get("HTTP_CONTENT_ENCODING") == "gzip":
            body = gzip.decompress(body)
        with self.lock:
            self.headers_seen.append({k: v for k, v in environ.items() if k.startswith("HTTP_")})
        request = sig.request_type()
        request.ParseFromString(body)
        failure = self.record(sig, request)
        if failure is not None:
            _code, http, retry_after = failure
            headers = [("Content-Type", "text/plain")]
            if retry_after is not None:
                headers.append(("Retry-After", str(int(retry_after))))
            start_response(f"{http} Injected", headers)
            return [b"injected failure"]
        start_response("200 OK", [("Content-Type", "application/x-protobuf")])
        return [sig.response_type().SerializeToString()]

    def start(self) -> "OTLPHTTPBackend":
        from sidecar.httpserver import BackgroundHTTPServer

        self._server = BackgroundHTTPServer(self._app, "127.0.0.1", self.port, name="test-otlp-http", threads=4)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> "OTLPHTTPBackend":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class SidecarProcess:
    """``python -m sidecar --config FILE`` as a real child process."""

    def __init__(self, config_yaml: str, *, workdir: str | os.PathLike | None = None, env: dict | None = None):
        self._tmp = None
        if not workdir:  # a temporary one, removed with this object (its log stays readable until then)
            self._tmp = tempfile.TemporaryDirectory(prefix="sidecar-test-", ignore_cleanup_errors=True)
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "config.yaml"
        self.config_path.write_text(config_yaml)
        self.log_path = self.workdir / "sidecar.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "SidecarProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "sidecar", "--config", str(self.config_path)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b"sidecar ready" in self.log_path.read_bytes():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"sidecar not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait: the graceful path."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: the crash path."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> "SidecarProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                self.terminate(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


class CollectingConsumer(_Counting):
    """An in-memory next stage: records every request it accepts, or refuses on demand.

    Set ``refuse`` to a :class:`~sidecar.component.Refused` to make ``consume`` raise it;
    with ``refuse_times`` > 0 it refuses that many calls and then accepts again.
    """

    def __init__(self):
        super().__init__()
        self.requests: list[tuple[Signal, object]] = []
        self.envelopes: list[Envelope] = []

    # the consumer-side names of the failure injection
    refuse = property(lambda self: self.failure, lambda self, v: setattr(self, "failure", v))
    refuse_times = property(lambda self: self.fail_times, lambda self, v: setattr(self, "fail_times", v))

    def consume(self, envelope: Envelope) -> None:
        with self.lock:
            refusal = self._next_failure()
            if refusal is not None:
                refusal = copy.copy(refusal)  # a fresh event each time: edges count each refusal once
                refusal.counted = False
                raise refusal
            self.envelopes.append(envelope)
            self.requests.append((envelope.signal, envelope.message))
            self.items[envelope.signal] += envelope.items
            self.lock.notify_all()

    def of(self, signal: Signal) -> list:
        """The accepted requests of one signal, in arrival order."""
        with self.lock:
            return [r for s, r in self.requests if s is signal]

    def wait_for_items(self, signal: Signal, n: int, timeout: float = 10.0) -> bool:
        return super().wait_for_items(signal, n, timeout)


class Counted:
    """A component behind the pipeline's counting edge, as the graph runs it.

    Tests that build one component alone wrap it to see its received / accepted / refused
    counters; every other attribute is the component's.
    """

    def __init__(self, component, telemetry):
        from sidecar.pipeline import Edge

        self.component = component
        self._edge = Edge(component, telemetry)

    def consume(self, envelope: Envelope) -> None:
        self._edge.consume(envelope)

    def __getattr__(self, name: str):
        return getattr(self.component, name)

    def __setattr__(self, name: str, value) -> None:
        if name in ("component", "_edge"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.component, name, value)
