"""Forward hooks: one span per call with the documented ml.* attributes, on the user's own module."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.trace import StatusCode

from instrumentation import RequestContext, instrument_model, request_context
from instrumentation import uninstrument_model
from instrumentation.torch import CudaTimer, ScriptedModel, add_forward_observer

from .conftest import histogram_points


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class Exploding(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("shape mismatch in layer 3")


def test_forward_span_carries_model_identity_and_shapes(spans):
    model = instrument_model(TinyNet(), "tiny", "7", tracer_provider=spans.provider)
    with torch.inference_mode():
        out = model(torch.randn(5, 4))
    assert out.shape == (5, 2)
    (span,) = spans.finished()
    assert span.name == "ml.forward tiny"
    a = span.attributes
    assert a["ml.model.id"] == "tiny" and a["ml.model.version"] == "7"
    assert a["ml.batch_size"] == 5
    assert a["ml.input.shapes"] == ("5x4",) and a["ml.input.dtypes"] == ("float32",)
    assert a["ml.output.shapes"] == ("5x2",)
    assert a["ml.device"] == "cpu"
    assert a["ml.parameter_count"] == 4 * 8 + 8 + 8 * 2 + 2
    assert a["ml.torch.version"] == torch.__version__
    assert a["ml.inference_mode"] is True and a["ml.grad_enabled"] is False


def test_model_identity_is_set_when_the_span_starts(spans):
    """Samplers and on_start processors (the sidecar's span metrics) see the model id."""
    seen = {}

    class Probe(SpanProcessor):
        def on_start(self, span, parent_context=None):
            seen.update(span.attributes)

    spans.provider.add_span_processor(Probe())
    instrument_model(TinyNet(), "tiny", "7", tracer_provider=spans.provider)(torch.randn(1, 4))
    assert seen["ml.model.id"] == "tiny" and seen["ml.model.version"] == "7"


def test_several_inputs_and_tuple_outputs(spans):
    class Pair(torch.nn.Module):
        def forward(self, ids, mask=None):
            return ids.float() * 2, {"pooled": mask.float().sum(dim=1)}

    model = instrument_model(Pair(), tracer_provider=spans.provider)
    model(torch.ones(3, 6, dtype=torch.int64), mask=torch.ones(3, 6, dtype=torch.bool))
    (span,) = spans.finished()
    assert span.name == "ml.forward Pair"  # model id defaults to the class name
    assert span.attributes["ml.input.shapes"] == ("3x6", "3x6")
    assert span.attributes["ml.input.dtypes"] == ("int64", "bool")
    assert span.attributes["ml.output.shapes"] == ("3x6",)


def test_exception_is_recorded_with_stack_trace_and_reraised(spans):
    model = instrument_model(Exploding(), "boom", tracer_provider=spans.provider)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        model(torch.randn(2, 4))
    (span,) = spans.finished()
    assert span.status.status_code is StatusCode.ERROR
    (event,) = [e for e in span.events if e.name == "exception"]
    assert event.attributes["exception.type"] == "RuntimeError"
    assert "Traceback" in event.attributes["exception.stacktrace"]
    assert "shape mismatch in layer 3" in event.attributes["exception.stacktrace"]


def test_forward_span_is_child_of_the_current_span_and_stamps_the_request(spans):
    tracer = spans.provider.get_tracer("test")
    model = instrument_model(TinyNet(), "tiny", "1", tracer_provider=spans.provider)
    ctx = RequestContext(request_id="req-1", user_id="u1", force_keep=True)
    with request_context(ctx), tracer.start_as_current_span("request") as parent:
        model(torch.randn(1, 4))
    fwd = spans.named("ml.forward tiny")[0]
    assert fwd.parent.span_id == parent.get_span_context().span_id
    assert fwd.attributes["request.id"] == "req-1"
    assert fwd.attributes["sampling.force_keep"] is True
    assert ctx.model_id == "tiny" and ctx.model_version == "1"  # logs in the request carry the model


def test_submodule_spans_respect_depth_and_filter(spans):
    model = instrument_model(TinyNet(), "tiny", tracer_provider=spans.provider,
                             submodules={"max_depth": 2, "name_filter": r"^encoder"})
    model(torch.randn(2, 4))
    names = {s.name for s in spans.finished()}
    assert names == {"ml.forward tiny", "ml.module encoder", "ml.module encoder.0", "ml.module encoder.1"}
    by_name = {s.name: s for s in spans.finished()}
    assert by_name["ml.module encoder.0"].parent.span_id == by_name["ml.module encoder"].context.span_id
    assert by_name["ml.module encoder"].parent.span_id == by_name["ml.forward tiny"].context.span_id


def test_submodule_span_records_the_exception(spans):
    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bad = Exploding()

        def forward(self, x):
            return self.bad(x)

    model = instrument_model(Outer(), "outer", tracer_provider=spans.provider, submodules={"max_depth": 1})
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 4))
    bad = spans.named("ml.module bad")[0]
    assert bad.status.status_code is StatusCode.ERROR
    # the context stack unwound: a later span is a root again
    with spans.provider.get_tracer("t").start_as_current_span("after") as after:
        pass
    assert spans.named("after")[0].parent is None and after is not None


def test_no_global_hooks_and_uninstrumented_models_untouched(spans):
    plain = TinyNet()
    instrument_model(TinyNet(), tracer_provider=spans.provider, submodules={"max_depth": 3})
    plain(torch.randn(1, 4))
    assert spans.finished() == []
    assert not torch.nn.modules.module._global_forward_hooks
    assert not torch.nn.modules.module._global_forward_pre_hooks


def test_torchscript_module(spans):
    scripted = torch.jit.script(TinyNet())
    model = instrument_model(scripted, model_version="ts", tracer_provider=spans.provider)
    assert isinstance(model, ScriptedModel)  # ScriptModules cannot take Python hooks
    assert set(model.state_dict()) == set(scripted.state_dict())  # but the checkpoint keys are its own
    model.load_state_dict(TinyNet().state_dict())
    model(torch.randn(3, 4))
    (span,) = spans.finished()
    assert span.name == "ml.forward TinyNet"
    assert span.attributes["ml.output.shapes"] == ("3x2",)
    assert span.attributes["ml.parameter_count"] == 58


def test_torch_compile_module(spans):
    compiled = torch.compile(TinyNet(), backend="eager")  # dynamo without inductor: seconds, not minutes
    model = instrument_model(compiled, "compiled", tracer_provider=spans.provider)
    assert model is compiled
    for _ in range(2):
        assert model(torch.randn(4, 4)).shape == (4, 2)
    found = spans.named("ml.forward compiled")
    assert len(found) == 2
    assert found[0].attributes["ml.parameter_count"] == 58 and found[1].attributes["ml.output.shapes"] == ("4x2",)


def test_forward_observer_sees_model_inputs_and_outputs(spans):
    seen = []
    remove = add_forward_observer(lambda mid, ver, args, kwargs, out: seen.append((mid, ver, args[0].shape, out.shape)))
    try:
        model = instrument_model(TinyNet(), "tiny", "3", tracer_provider=spans.provider)
        model(torch.randn(5, 4))
    finally:
        remove()
    model(torch.randn(1, 4))
    assert seen == [("tiny", "3", (5, 4), (5, 2))]


# --- CUDA path, exercised with fake events on CPU ------------------------------------------------


class FakeEvent:
    """Stands in for torch.cuda.Event: the test decides when the GPU 'finishes'."""

    created: list["FakeEvent"] = []

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.recorded_at: float | None = None
        self.done = False
        self.synchronized = False
        FakeEvent.created.append(self)

    def record(self, stream=None) -> None:
        self.recorded_at = len(FakeEvent.created)

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:  # the hot path must never call this
        self.synchronized = True

    def elapsed_time(self, end: "FakeEvent") -> float:
        assert self.done and end.done
        return 12.5


class FakeAllocator:
    def __init__(self):
        self.allocated = 1000
        self.peak = 5000

    def memory_allocated(self, device):
        return self.allocated

    def max_memory_allocated(self, device):
        self.peak += 250  # the forward raised the peak by 250 bytes
        return self.peak


def test_cuda_path_records_events_without_sync_and_reaps_when_ready(spans, meter):
    meter_provider, reader = meter
    FakeEvent.created.clear()
    alloc = FakeAllocator()
    hist = meter_provider.get_meter("t").create_histogram("ml.forward.gpu_time", unit="ms")
    timer = CudaTimer(hist, event_factory=FakeEvent, memory_allocated=alloc.memory_allocated,
                      max_memory_allocated=alloc.max_memory_allocated)
    timer._pid = __import__("os").getpid()  # no reaper thread: the test calls reap() itself
    model = instrument_model(TinyNet(), "gpu-model", "2", tracer_provider=spans.provider,
                             cuda_timer=timer, _gpu_device_types=frozenset({"cpu"}))
    model(torch.randn(2, 4))
    start, end = FakeEvent.created
    assert start.recorded_at is not None and end.recorded_at > start.recorded_at
    assert not start.synchronized and not end.synchronized
    (span,) = spans.finished()
    assert span.attributes["ml.cuda.memory_allocated"] == 1000
    assert span.attributes["ml.cuda.peak_memory_delta"] == 250

    assert timer.reap() == 0  # GPU still busy: nothing recorded, nothing waited on
    assert histogram_points(reader, "ml.forward.gpu_time") == []
    start.done = end.done = True
    assert timer.reap() == 1
    (point,) = histogram_points(reader, "ml.forward.gpu_time")
    assert point.sum == 12.5 and point.count == 1
    assert dict(point.attributes) == {"ml.model.id": "gpu-model", "ml.model.version": "2"}


def test_cuda_reaper_thread_records_in_background(meter):
    meter_provider, reader = meter
    hist = meter_provider.get_meter("t").create_histogram("ml.forward.gpu_time", unit="ms")
    timer = CudaTimer(hist, event_factory=FakeEvent, memory_allocated=lambda d: 0,
                      max_memory_allocated=lambda d: 0, poll_interval=0.001)

    class NullSpan:
        def set_attributes(self, attrs):
            pass

    begun = timer.begin("cuda:0")
    timer.end(begun, "cuda:0", NullSpan(), {"ml.model.id": "m"})
    begun[0].done = True
    FakeEvent.created[-1].done = True
    deadline = time.monotonic() + 10
    while not histogram_points(reader, "ml.forward.gpu_time") and time.monotonic() < deadline:
        threading.Event().wait(0.005)
    assert histogram_points(reader, "ml.forward.gpu_time")[0].count == 1
