"""The sidecar collector: OTLP in, sampled and redacted OTLP out.

Run it with ``python -m sidecar --config collector-config/sidecar.yaml``.
Importing this package pulls in nothing heavy; components import grpc lazily
through their own modules.
"""

__version__ = "0.1.0"
