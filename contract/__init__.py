"""What the inference app and the sidecar agree on, importable by both without the other.

- :mod:`contract.config`: the config core (YAML loader with otelcol's env expansion and
  ``file:line`` errors, the :class:`~contract.config.ConfigModel` base, shared scalar types).
- :mod:`contract.attributes`: the attribute names the app writes and the sidecar reads.

Depends on pydantic and PyYAML only: no sidecar, grpc, torch or OpenTelemetry SDK.
"""
