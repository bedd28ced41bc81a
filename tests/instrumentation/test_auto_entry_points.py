"""The plug-in surface: entry points resolve to a distro, a configurator and BaseInstrumentors."""

from __future__ import annotations

import torch
from opentelemetry.instrumentation.distro import BaseDistro
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from opentelemetry.sdk._configuration import _BaseConfigurator
from opentelemetry.util._importlib_metadata import entry_points

from instrumentation.auto import TorchInstrumentor


def loaded(group: str) -> dict:
    return {ep.name: ep.load() for ep in entry_points(group=group) if ep.value.startswith("instrumentation.")}


def test_entry_points_are_registered():
    assert issubclass(loaded("opentelemetry_distro")["torch_otel"], BaseDistro)
    assert issubclass(loaded("opentelemetry_configurator")["torch_otel"], _BaseConfigurator)
    instrumentors = loaded("opentelemetry_instrumentor")
    assert set(instrumentors) == {"torch", "torch_otel_asgi", "torch_otel_flask"}
    assert all(issubclass(cls, BaseInstrumentor) for cls in instrumentors.values())


def test_torch_instrumentor_instruments_and_uninstruments_models(spans):
    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    later = torch.nn.Sequential(torch.nn.Linear(4, 2))
    instrumentor = TorchInstrumentor()
    instrumentor.instrument(models=[model], tracer_provider=spans.provider)
    try:
        assert TorchInstrumentor.instrument_module(later, "later", "2") is later
        model(torch.randn(1, 4))
        later(torch.randn(1, 4))
        assert sorted(s.name for s in spans.finished()) == ["ml.forward Sequential", "ml.forward later"]
    finally:
        instrumentor.uninstrument()
    model(torch.randn(1, 4))
    later(torch.randn(1, 4))
    assert len(spans.finished()) == 2
