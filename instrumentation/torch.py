"""One span per forward pass for any ``nn.Module``, TorchScript or ``torch.compile`` module.

Instrumentation observes, it does not replace: :func:`instrument_model` registers a forward
pre-hook and an always-called forward hook on the user's own module and returns that same
object, so ``isinstance``, indexing, ``state_dict`` keys, checkpoints, ``.to()``,
``train()/eval()`` and the user's own hooks behave as before; :func:`uninstrument_model`
takes the hooks off again. What is traced where:

* eager modules: every call through ``module(...)`` (not a direct ``module.forward(...)``);
* ``torch.jit.script(instrumented)``: works and compiles the model and the user's hooks, not
  ours (hooks are Python-only), so calls of the *scripted* copy are not traced; instrument
  the scripted module instead if that is what serves;
* a TorchScript module cannot take Python hooks: it is held in a :class:`ScriptedModel`
  (the one case where a new object is returned) whose ``state_dict`` keys are the scripted
  module's own;
* ``torch.compile(instrumented)`` and ``instrumented.compile()``: the hooks run eagerly
  outside the graph (``torch.compiler.disable``), one graph break each side. Dynamo does
  not guard on hooks by default, so instrument before compiling or instrument the compiled
  module (its ``OptimizedModule`` runs hooks outside dynamo), not after compiling in place.

Span ``ml.forward <model_id>``; attributes under the project's ``ml.*`` namespace:

=========================  ===========================================================
``ml.model.id``            model id (set when the span starts)
``ml.model.version``       model version (set when the span starts)
``ml.parameter_count``     number of parameters (counted once, at instrument time)
``ml.torch.version``       ``torch.__version__``
``ml.batch_size``          first dimension of the first tensor input
``ml.input.shapes``        e.g. ``["8x16", "8"]``, one entry per tensor input
``ml.input.dtypes``        e.g. ``["float32", "int64"]``
``ml.output.shapes``       shapes of the tensor outputs (tensor, tuple/list, mapping)
``ml.device``              device of the first tensor input, e.g. ``cpu``, ``cuda:0``
``ml.grad_enabled``        ``torch.is_grad_enabled()``
``ml.inference_mode``      ``torch.is_inference_mode_enabled()``
``ml.cuda.memory_allocated``, ``ml.cuda.max_memory_allocated``, ``ml.cuda.peak_memory_delta``
                           bytes, on CUDA inputs only (allocator counters: no sync)
=========================  ===========================================================

On CUDA inputs the forward pass records a pair of CUDA events and never synchronizes;
a background reaper reads ``elapsed_time`` once the end event has completed and
records it in the ``ml.forward.gpu_time`` histogram (milliseconds). Exceptions are
recorded with their stack trace, the span status set to ERROR, and re-raised.
Opt-in child spans ``ml.module <name>`` per submodule (eager modules only) use hooks
registered on that model's submodules, never global hooks.

torch is imported here and nowhere else in the package.
"""

from __future__ import annotations

import collections
import contextvars
import copy
import functools
import os
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch
from opentelemetry import metrics, trace
from opentelemetry.context import attach, detach
from opentelemetry.trace import Status, StatusCode, set_span_in_context

from contract.attributes import (
    ML_BATCH_SIZE,
    ML_DEVICE,
    ML_INPUT_DTYPES,
    ML_INPUT_SHAPES,
    ML_MODEL_ID,
    ML_MODEL_VERSION,
    ML_OUTPUT_SHAPES,
)
from instrumentation._context import _CURRENT
from instrumentation._torch_submodules import SubmoduleSpans, add_submodule_spans

_SCOPE = "instrumentation.torch"
_Tensor = torch.Tensor
_SEQ = (list, tuple)
_MAX_CACHE = 4096


class _Describer:
    """Shape/dtype/device strings for tensors, cached per distinct value (the per-call path does lookups)."""

    __slots__ = ("shapes", "dtypes", "devices")

    def __init__(self) -> None:
        self.shapes: dict[tuple, str] = {}
        self.dtypes: dict[torch.dtype, str] = {}
        self.devices: dict[torch.device, str] = {}

    def shape(self, size: tuple) -> str:
        s = self.shapes.get(size)
        if s is None:
            if len(self.shapes) >= _MAX_CACHE:
                self.shapes.clear()
            s = self.shapes[size] = "x".join(map(str, size))
        return s

    def dtype(self, dtype: torch.dtype) -> str:
        s = self.dtypes.get(dtype)
        if s is None:
            s = self.dtypes[dtype] = str(dtype).removeprefix("torch.")
        return s

    def device(self, device: torch.device) -> str:
        s = self.devices.get(device)
        if s is None:
            s = self.devices[device] = str(device)
        return s

    def tensors(self, args: tuple, kwargs: dict) -> list[_Tensor]:
        out = []
        for a in args:
            if isinstance(a, _Tensor):
                out.append(a)
            elif isinstance(a, _SEQ):
                out.extend(x for x in a if isinstance(x, _Tensor))
        if kwargs:
            for a in kwargs.values():
                if isinstance(a, _Tensor):
                    out.append(a)
        return out

    def output_shapes(self, out: Any) -> list[str]:
        if isinstance(out, _Tensor):
            return [self.shape(out.shape)]
        if isinstance(out, Mapping):
            out = out.values()
        elif not isinstance(out, _SEQ):
            return []
        return [self.shape(x.shape) for x in out if isinstance(x, _Tensor)]


class CudaTimer:
    """GPU time of forward passes from CUDA events, read off the hot path by a reaper thread.

    ``begin``/``end`` only record events and read allocator counters (no synchronize);
    :meth:`reap` records ``elapsed_time`` for every pending pair whose end event has
    completed (``query()`` is true). The event factory and memory functions are
    injectable so the path is testable without a GPU.
    """

    def __init__(self, histogram: Any, *, event_factory: Callable[..., Any] | None = None,
                 memory_allocated: Callable[[Any], int] | None = None,
                 max_memory_allocated: Callable[[Any], int] | None = None,
                 poll_interval: float = 0.05, max_pending: int = 10_000) -> None:
        self._histogram = histogram
        self._event = event_factory or torch.cuda.Event
        self._allocated = memory_allocated or torch.cuda.memory_allocated
        self._max_allocated = max_memory_allocated or torch.cuda.max_memory_allocated
        self._pending: collections.deque = collections.deque()
        self._max_pending = max_pending
        self.dropped = 0
        self._poll = poll_interval
        self._wake = threading.Event()
        self._pid = -1  # reaper not started (or started in the parent before a fork)

    def begin(self, device: Any) -> tuple[Any, int]:
        start = self._event(enable_timing=True)
        start.record()
        return start, self._max_allocated(device)

    def end(self, begun: tuple[Any, int], device: Any, span: Any, metric_attributes: Mapping[str, Any]) -> None:
        start, max_before = begun
        stop = self._event(enable_timing=True)
        stop.record()
        max_after = self._max_allocated(device)
        span.set_attributes({"ml.cuda.memory_allocated": self._allocated(device),
                             "ml.cuda.max_memory_allocated": max_after,
                             "ml.cuda.peak_memory_delta": max_after - max_before})
        if len(self._pending) >= self._max_pending:
            self.dropped += 1  # the GPU is far behind; never grow without bound
            return
        self._pending.append((start, stop, metric_attributes))
        if self._pid != os.getpid():
            self._start_reaper()
        self._wake.set()

    def reap(self) -> int:
        """Record every completed pair at the head of the queue; returns how many were recorded."""
        n = 0
        pending = self._pending
        while pending:
            start, stop, attrs = pending[0]
            if not stop.query():
                break  # events on a stream complete in order: the rest are not done either
            pending.popleft()
            self._histogram.record(start.elapsed_time(stop), attrs)
            n += 1
        return n

    def _start_reaper(self) -> None:
        self._pid = os.getpid()
        self._wake = threading.Event()
        threading.Thread(target=self._run, name="ml-cuda-timer", daemon=True).start()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self.reap()
            if self._pending:
                threading.Event().wait(self._poll)
            else:
                self._wake.clear()
                if self._pending:  # raced with end(): look again before sleeping
                    self._wake.set()


def _model_name(model: Any) -> str:
    inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
    if inner is not None:
        model = inner
    return getattr(model, "original_name", None) or type(model).__name__  # TorchScript keeps original_name


#: Called after every instrumented forward pass as ``fn(model_id, model_version, args, kwargs, output)``.
ForwardObserver = Callable[[str, "str | None", tuple, dict, Any], None]
_OBSERVERS: list[ForwardObserver] = []


def add_forward_observer(fn: ForwardObserver) -> Callable[[], None]:
    """Have ``fn`` see each instrumented forward pass (drift summaries use this); returns its remover.

    It runs on the inference thread inside the forward span, so it must be cheap; an exception
    it raises is counted in ``observer_errors`` and never reaches the model's caller.
    """
    _OBSERVERS.append(fn)

    def remove() -> None:
        if fn in _OBSERVERS:
            _OBSERVERS.remove(fn)

    return remove


observer_errors = 0


def _observe_forward(model_id: str, model_version: str | None, args: tuple, kwargs: dict, output: Any) -> None:
    """The one place the forward path hands inputs and outputs to observers (none by default)."""
    global observer_errors
    for fn in _OBSERVERS:
        try:
            fn(model_id, model_version, args, kwargs, output)
        except Exception:  # noqa: BLE001 - an observer must never fail an inference
            observer_errors += 1


#: (observer, span, context token, CUDA begin state, device, parent node) per forward pass in flight.
_is_compiling = torch.compiler.is_compiling
_FWD_STACK: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("ml_forward_spans", default=None)


class _ForwardSpans:
    """A forward pre-hook and an always-called forward hook that trace one model's forward passes.

    Everything that does not change per call (span name, static attributes, metric attributes,
    the GPU timer) is decided here, once. The hooks live on the user's own module: the object,
    its class, its ``state_dict`` keys and its other hooks stay exactly as they were.
    """

    def __init__(self, model: Any, *, model_id: str | None, model_version: str | None, tracer_provider: Any,
                 meter_provider: Any, cuda_timer: CudaTimer | None, gpu_device_types: frozenset[str]) -> None:
        model_id = model_id or _model_name(model)
        self.model_id = model_id
        self.model_version = model_version
        self._tracer = trace.get_tracer(_SCOPE, tracer_provider=tracer_provider)
        self._span_name = f"ml.forward {model_id}"
        static: dict[str, Any] = {ML_MODEL_ID: model_id}
        if model_version is not None:
            static[ML_MODEL_VERSION] = model_version
        static["ml.parameter_count"] = sum(p.numel() for p in model.parameters()) if hasattr(
            model, "parameters") else 0
        static["ml.torch.version"] = torch.__version__
        self._static = static
        self._metric_attrs = {k: static[k] for k in (ML_MODEL_ID, ML_MODEL_VERSION) if k in static}
        self._describe = _Describer()
        self._gpu_types = gpu_device_types
        if cuda_timer is None and torch.cuda.is_available():
            meter = metrics.get_meter(_SCOPE, meter_provider=meter_provider)
            cuda_timer = CudaTimer(meter.create_histogram(
                "ml.forward.gpu_time", unit="ms", description="GPU time of a forward pass, from CUDA events"))
        self._cuda = cuda_timer
        # what compiled code calls: run eagerly, outside the graph (a graph break each side); eager
        # calls skip this wrapper, which costs more than a microsecond per call
        self._pre_eager = torch.compiler.disable(self.pre, recursive=True)
        self._post_eager = torch.compiler.disable(self.post, recursive=True)

    def __deepcopy__(self, memo: dict) -> "_ForwardSpans":
        return self  # copy.deepcopy(model): the copy reports as the same model (tracers and locks are shared)

    def __reduce__(self) -> tuple:
        # torch.save(model) of the whole module: loaded, it is instrumented again, on the global providers
        return (_restore_spans, (self.model_id, self.model_version, self._static["ml.parameter_count"]))

    def pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        """The forward pre-hook. Under ``torch.compile`` dynamo sees only the branch to the eager copy."""
        if _is_compiling():
            return self._pre_eager(module, args, kwargs)  # at run time, not compiling: the code below
        d = self._describe
        tensors = d.tensors(args, kwargs)
        attributes = dict(self._static)
        device = None
        if tensors:
            first = tensors[0]
            device = first.device
            attributes[ML_BATCH_SIZE] = first.shape[0] if first.dim() else 1
            attributes[ML_INPUT_SHAPES] = [d.shape(t.shape) for t in tensors]
            attributes[ML_INPUT_DTYPES] = [d.dtype(t.dtype) for t in tensors]
            attributes[ML_DEVICE] = d.device(device)
        attributes["ml.grad_enabled"] = torch.is_grad_enabled()
        attributes["ml.inference_mode"] = torch.is_inference_mode_enabled()
        # one attribute set at start (cheaper than set_attributes after), so samplers see them too
        span = self._tracer.start_span(self._span_name, attributes=attributes)
        token = attach(set_span_in_context(span))
        ctx = _CURRENT.get()
        if ctx is not None:
            ctx.model_id = self.model_id
            ctx.model_version = self.model_version
        begun = None
        if device is not None and self._cuda is not None and device.type in self._gpu_types and span.is_recording():
            begun = self._cuda.begin(device)
        else:
            device = None
        _FWD_STACK.set((self, span, token, begun, device, _FWD_STACK.get()))

    def post(self, module: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """The always-called forward hook (also after an exception, which it records)."""
        if _is_compiling():
            return self._post_eager(module, args, kwargs, out)
        node = _FWD_STACK.get()
        if node is None or node[0] is not self:
            return  # our pre-hook never ran (an earlier hook raised): nothing to end
        _, span, token, begun, device, parent = node
        _FWD_STACK.set(parent)
        try:
            exc = sys.exc_info()[1]  # torch calls always_call hooks from its except block
            if exc is not None:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            else:
                if span.is_recording():
                    span.set_attribute(ML_OUTPUT_SHAPES, self._describe.output_shapes(out))
                    if device is not None:
                        self._cuda.end(begun, device, span, self._metric_attrs)  # type: ignore[union-attr]
                if _OBSERVERS:
                    _observe_forward(self.model_id, self.model_version, args, kwargs, out)
        finally:
            detach(token)
            span.end()


def _restore_spans(model_id: str, model_version: str | None, parameter_count: int) -> _ForwardSpans:
    spans = _ForwardSpans(torch.nn.Identity(), model_id=model_id, model_version=model_version, tracer_provider=None,
                          meter_provider=None, cuda_timer=None, gpu_device_types=frozenset({"cuda"}))
    spans._static["ml.parameter_count"] = parameter_count
    return spans


def _ours(hook: Any) -> bool:
    return getattr(hook, "_otel_owner", None) is not None or isinstance(getattr(hook, "__self__", None), _ForwardSpans)


def _observer_of(module: Any) -> _ForwardSpans | None:
    for hook in module._forward_pre_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, _ForwardSpans):
            return owner
    return None


def _remove_our_hooks(module: Any) -> int:
    """Take this package's hooks off one module (and only ours); returns how many were removed."""
    removed = 0
    for hooks, extra in ((module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
                         (module._forward_hooks, (module._forward_hooks_with_kwargs,
                                                  module._forward_hooks_always_called))):
        for hook_id in [i for i, h in hooks.items() if _ours(h)]:
            del hooks[hook_id]
            for d in extra:
                d.pop(hook_id, None)
            removed += 1
    if removed and not any(_ours(h) for h in (*module._forward_pre_hooks.values(), *module._forward_hooks.values())):
        module.__dict__.pop("__prepare_scriptable__", None)
    return removed


def _without_our_hooks(module: Any) -> Any:
    """What ``torch.jit.script`` compiles: a shallow copy sharing the parameters, minus our Python-only hooks.

    TorchScript compiles a module's hooks too and cannot compile ours; the user's own hooks stay.
    """
    clone = copy.copy(module)
    clone.__dict__ = dict(module.__dict__)
    clone.__dict__.pop("__prepare_scriptable__", None)
    clone._modules = dict(module._modules)  # scripting replaces children in this dict: not in the original's
    for name in ("_forward_pre_hooks", "_forward_hooks"):
        hooks = getattr(module, name)
        setattr(clone, name, type(hooks)((i, h) for i, h in hooks.items() if not _ours(h)))
    return clone


class ScriptedModel(torch.nn.Module):
    """Holds a TorchScript module, which cannot take Python hooks, so that it can be instrumented.

    The one case where :func:`instrument_model` returns a new object: calls, attributes and
    methods go to the scripted module, and ``state_dict``/``load_state_dict`` use its own keys
    (no ``scripted.`` prefix), so checkpoints move between the two unchanged.
    """

    def __init__(self, scripted: Any) -> None:
        super().__init__()
        self.scripted = scripted
        self._register_state_dict_hook(_strip_prefix)
        self._register_load_state_dict_pre_hook(_add_prefix)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.scripted(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["scripted"], name)


def _strip_prefix(_module: Any, state: dict, prefix: str, _meta: Any) -> None:
    inner = prefix + "scripted."
    for key in [k for k in state if k.startswith(inner)]:
        state[prefix + key[len(inner):]] = state.pop(key)


def _add_prefix(state: dict, prefix: str, *_rest: Any) -> None:
    for key in [k for k in state if k.startswith(prefix) and not k.startswith(prefix + "scripted.")]:
        state[prefix + "scripted." + key[len(prefix):]] = state.pop(key)


def _guard_scripting(module: Any) -> None:
    if not isinstance(module, torch.jit.ScriptModule) and "__prepare_scriptable__" not in module.__dict__ \
            and not hasattr(type(module), "__prepare_scriptable__"):
        module.__dict__["__prepare_scriptable__"] = functools.partial(_without_our_hooks, module)


def instrument_model(model: Any, model_id: str | None = None, model_version: str | None = None, *,
                     submodules: SubmoduleSpans | None = None, tracer_provider: Any = None,
                     meter_provider: Any = None, cuda_timer: CudaTimer | None = None,
                     _gpu_device_types: frozenset[str] = frozenset({"cuda"})) -> Any:
    """Trace every forward call of ``model`` with module hooks; returns ``model`` itself, unchanged otherwise.

    ``model_id`` defaults to the model's class name. ``submodules={"max_depth": 2,
    "name_filter": "encoder"}`` adds child spans for matching submodules. Calling it again
    on an instrumented model returns it as it is. :func:`uninstrument_model` undoes it.
    """
    if _observer_of(model) is not None:
        return model
    if isinstance(model, torch.jit.ScriptModule):
        if model_id is None:
            model_id = _model_name(model)
        model = ScriptedModel(model)
    spans = _ForwardSpans(model, model_id=model_id, model_version=model_version, tracer_provider=tracer_provider,
                          meter_provider=meter_provider, cuda_timer=cuda_timer, gpu_device_types=_gpu_device_types)
    # prepend: the span covers the user's own pre-hooks; the post hook, appended, runs after theirs
    model.register_forward_pre_hook(spans.pre, with_kwargs=True, prepend=True)
    model.register_forward_hook(spans.post, with_kwargs=True, always_call=True)
    if submodules is not None:
        add_submodule_spans(model, spans._tracer, submodules)
    _guard_scripting(model)
    return model


def uninstrument_model(model: Any) -> Any:
    """Remove every hook :func:`instrument_model` added to ``model`` and its submodules; returns ``model``."""
    modules = model.modules() if hasattr(model, "modules") else [model]
    for m in modules:
        _remove_our_hooks(m)
    return model
