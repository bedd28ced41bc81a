"""A /metrics address already in use fails start-up naming the YAML key and the address."""

from __future__ import annotations

import socket

import pytest

from sidecar.config import parse_config
from sidecar.pipeline import Service
from sidecar.testing import free_port


def test_busy_metrics_port_names_the_key_and_the_address():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = parse_config(f"""
receivers: {{otlp: {{protocols: {{grpc: {{endpoint: 127.0.0.1:{free_port()}}}}}}}}}
exporters: {{debug: {{}}}}
service:
  telemetry: {{metrics: {{address: 127.0.0.1:{port}}}}}
  pipelines: {{traces: {{receivers: [otlp], exporters: [debug]}}}}
""")
        service = Service(cfg)
        with pytest.raises(OSError, match=rf"service\.telemetry\.metrics\.address: cannot listen on 127\.0\.0\.1:{port}"):
            service.start()
