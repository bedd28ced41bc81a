"""Opt-in child spans ``ml.module <name>`` for an eager model's submodules, by hooks on those submodules."""

from __future__ import annotations

import contextvars
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any, TypedDict

import torch
from opentelemetry.context import attach, detach
from opentelemetry.trace import Status, StatusCode, set_span_in_context


class SubmoduleSpans(TypedDict, total=False):
    """Which submodules get a child span: up to ``max_depth`` levels below the model, names matching ``name_filter``."""

    max_depth: int
    name_filter: str | Callable[[str], bool]


def _outside_compile(fn: Callable, owner: Any) -> Callable:
    """``fn`` run eagerly even inside ``torch.compile``: dynamo does not trace telemetry code, and the
    hook stays identifiable as ours (``_otel_owner``) for :func:`uninstrument_model`."""
    wrapped = torch.compiler.disable(fn, recursive=True)
    wrapped._otel_owner = owner  # type: ignore[attr-defined]
    return wrapped


_SUB_STACK: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("ml_submodule_spans", default=None)


def add_submodule_spans(model: Any, tracer: Any, opts: SubmoduleSpans) -> list[Any]:
    """Hook the submodules ``opts`` selects (eager models only); returns the hook handles."""
    from instrumentation.torch import ScriptedModel, _guard_scripting

    if isinstance(model, (torch.jit.ScriptModule, ScriptedModel)) or hasattr(model, "_orig_mod"):
        warnings.warn("submodule spans need an eager nn.Module; TorchScript/torch.compile models get the "
                      "forward span only", stacklevel=3)
        return []
    max_depth = int(opts.get("max_depth", 1))
    if max_depth < 1:
        raise ValueError(f"submodules.max_depth: must be >= 1, got {max_depth}")
    flt = opts.get("name_filter")
    if isinstance(flt, str):
        flt = re.compile(flt).search
    handles = []
    for name, mod in model.named_modules():
        if not name or name.count(".") + 1 > max_depth or (flt is not None and not flt(name)):
            continue
        span_name = f"ml.module {name}"
        attrs = {"ml.module.name": name, "ml.module.type": type(mod).__name__}

        def pre(_mod: Any, _args: Any, _span_name: str = span_name, _attrs: dict = attrs) -> None:
            span = tracer.start_span(_span_name, attributes=_attrs)
            token = attach(set_span_in_context(span))
            _SUB_STACK.set((span, token, _SUB_STACK.get()))

        handles.append(mod.register_forward_pre_hook(_outside_compile(pre, "submodule")))
        handles.append(mod.register_forward_hook(_outside_compile(_sub_post, "submodule"), always_call=True))
        _guard_scripting(mod)
    return handles


def _sub_post(_mod: Any, _args: Any, _out: Any) -> None:
    node = _SUB_STACK.get()
    if node is None:
        return
    span, token, parent = node
    _SUB_STACK.set(parent)
    exc = sys.exc_info()[1]  # torch calls always_call hooks from its except block
    if exc is not None:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
    detach(token)
    span.end()
