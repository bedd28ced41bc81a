"""The HTTP server under slow and lying clients: they lose their connection, everyone else is served.

120 slowloris connections used to make every OTLP/HTTP request time out (issue 9).
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

import pytest

from sidecar.httpserver import BackgroundHTTPServer


def _app(environ, start_response):
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


@pytest.fixture
def server():
    timeouts: list[str] = []
    lock = threading.Lock()

    def on_timeout(reason):
        with lock:
            timeouts.append(reason)

    srv = BackgroundHTTPServer(_app, "127.0.0.1", 0, name="test-http", threads=2, read_header_timeout=0.5,
                               read_timeout=1.0, idle_timeout=30, max_connections=1000, on_timeout=on_timeout)
    srv.start()
    srv.timeouts = timeouts
    yield srv
    srv.stop()


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def _closed_by_server(s: socket.socket, deadline: float) -> bool:
    """True once the server closes ``s`` (recv returns b'' or the connection resets)."""
    s.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            if s.recv(1024) == b"":
                return True
        except socket.timeout:
            continue
        except ConnectionError:
            return True
    return False


def test_slowloris_connections_are_closed_and_others_still_served(server):
    slow = []
    for _ in range(120):
        s = _connect(server.port)
        s.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\n")  # headers never finish
        slow.append(s)
    # a well-behaved client is served while the slow ones hold their connections
    with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{server.port}/", data=b"ok"),
                                timeout=10) as resp:
        assert resp.read() == b"ok"
    deadline = time.monotonic() + 20
    assert all(_closed_by_server(s, deadline) for s in slow)
    assert server.timeouts.count("read_header_timeout") >= 120
    for s in slow:
        s.close()


def test_a_body_shorter_than_its_content_length_loses_the_connection(server):
    s = _connect(server.port)
    s.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nonly a little")
    assert _closed_by_server(s, time.monotonic() + 20)
    assert "read_timeout" in server.timeouts
    s.close()


def test_a_slow_but_steady_client_within_the_limit_is_served(server):
    s = _connect(server.port)
    for part in (b"POST / HTTP/1.1\r\n", b"Host: x\r\n", b"Content-Length: 2\r\n\r\n", b"hi"):
        s.sendall(part)
        time.sleep(0.05)
    s.settimeout(10)
    data = b""
    while b"\r\n\r\nhi" not in data:
        chunk = s.recv(1024)
        assert chunk, "closed before the answer"
        data += chunk
    assert data.startswith(b"HTTP/1.1 200")
    s.close()
