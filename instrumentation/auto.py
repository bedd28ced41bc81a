"""The OpenTelemetry way in: ``opentelemetry-instrument uvicorn app:app`` with nothing added to the app.

Registered as entry points of the ``torch-otel-sidecar`` distribution:

=============================  ===============  ============================================
``opentelemetry_distro``       ``torch_otel``   :class:`Distro` — defaults, picks our configurator
``opentelemetry_configurator`` ``torch_otel``   :class:`Configurator` — calls :func:`configure`
``opentelemetry_instrumentor`` ``torch``        :class:`TorchInstrumentor` — models, by hooks
``opentelemetry_instrumentor`` ``torch_otel_asgi`` :class:`ASGIInstrumentor` — request identity
``opentelemetry_instrumentor`` ``torch_otel_flask`` :class:`FlaskInstrumentor` — the same, WSGI
=============================  ===============  ============================================

So an app run under ``opentelemetry-instrument`` gets the same as one that calls
``configure()`` and adds :class:`~instrumentation.ASGIMiddleware` itself: request ids, the
force-keep header, the log bridge and in-process redaction, each span and log exported once.
Everything is read from the standard ``OTEL_*`` variables. With other distros installed
(``opentelemetry-distro``), pick ours with ``OTEL_PYTHON_DISTRO=torch_otel``; leave out any
other server-span instrumentation of the same app (``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=fastapi,asgi``)
or each request gets two server spans.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import weakref
from collections.abc import Collection
from typing import Any

from opentelemetry.instrumentation.distro import BaseDistro
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.sdk._configuration import _BaseConfigurator

__all__ = ["ASGIInstrumentor", "Configurator", "Distro", "FlaskInstrumentor", "TorchInstrumentor"]

NAME = "torch_otel"


class Distro(BaseDistro):
    """Defaults for ``opentelemetry-instrument``; the user's own variables always win."""

    def _configure(self, **kwargs: Any) -> None:
        os.environ.setdefault("OTEL_PYTHON_CONFIGURATOR", NAME)
        # stable HTTP semantic conventions (http.request.method, http.response.status_code, url.path)
        os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "http")


class Configurator(_BaseConfigurator):
    """Sets up the providers through :func:`instrumentation.configure` (idempotent: an app's own call is a no-op)."""

    def _configure(self, **kwargs: Any) -> None:
        from instrumentation._setup import configure

        configure()


class TorchInstrumentor(BaseInstrumentor):
    """Forward-pass spans for torch models, the ``BaseInstrumentor`` way.

    There is no global switch to flip for torch (global module hooks would trace every layer of
    every model), so ``instrument()`` records the providers to use and instruments the models
    passed as ``models=[...]``; :meth:`instrument_module` adds one more later, and
    ``uninstrument()`` takes the hooks off every model it instrumented.
    """

    _models: "weakref.WeakSet[Any]" = weakref.WeakSet()
    _options: dict[str, Any] = {}

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("torch >= 2.0",)

    def _instrument(self, **kwargs: Any) -> None:
        TorchInstrumentor._options = {k: kwargs[k] for k in ("tracer_provider", "meter_provider") if k in kwargs}
        for model in kwargs.get("models") or ():
            self.instrument_module(model)

    def _uninstrument(self, **kwargs: Any) -> None:
        from instrumentation.torch import uninstrument_model

        for model in list(TorchInstrumentor._models):
            uninstrument_model(model)
        TorchInstrumentor._models = weakref.WeakSet()

    @classmethod
    def instrument_module(cls, model: Any, model_id: str | None = None, model_version: str | None = None,
                          **options: Any) -> Any:
        """:func:`instrumentation.instrument_model` with the providers given to ``instrument()``."""
        from instrumentation.torch import instrument_model

        out = instrument_model(model, model_id, model_version, **{**cls._options, **options})
        cls._models.add(out)
        return out


#: Scope key: this request already entered through one patched ``__call__`` (FastAPI's calls Starlette's).
_ENTERED = "instrumentation.auto"


class ASGIInstrumentor(BaseInstrumentor):
    """Request identity for every Starlette/FastAPI app: each app is served through an ASGIMiddleware.

    ``Starlette.__call__`` (and ``FastAPI.__call__``, which opens its own native server span
    otherwise) hand each request to the app's own ASGIMiddleware, created on first use, so
    it is the outermost layer — outside Starlette's error middleware, whose 500 then carries
    ``X-Request-ID`` as well. An app that already wraps itself in
    :class:`~instrumentation.ASGIMiddleware` is not traced twice (the inner one stands aside).
    """

    _originals: dict[type, Any] = {}

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("starlette >= 0.13",)

    def _instrument(self, **kwargs: Any) -> None:
        from starlette.applications import Starlette

        classes: list[type] = [Starlette]
        if importlib.util.find_spec("fastapi") is not None:
            from fastapi import FastAPI

            classes.append(FastAPI)
        for cls in classes:
            if cls not in ASGIInstrumentor._originals:
                ASGIInstrumentor._originals[cls] = cls.__call__
                cls.__call__ = _served_through_middleware(cls, cls.__call__, dict(kwargs))  # type: ignore

    def _uninstrument(self, **kwargs: Any) -> None:
        for cls, original in ASGIInstrumentor._originals.items():
            cls.__call__ = original  # type: ignore[method-assign]
        ASGIInstrumentor._originals = {}


def _served_through_middleware(cls: type, original: Any, options: dict[str, Any]) -> Any:
    from instrumentation.asgi import ASGIMiddleware

    key = f"_otel_served_{cls.__qualname__}"

    async def __call__(app: Any, scope: Any, receive: Any, send: Any) -> None:
        if _ENTERED in scope:
            await original(app, scope, receive, send)
            return
        scope[_ENTERED] = True
        served = app.__dict__.get(key)
        if served is None:
            served = app.__dict__[key] = ASGIMiddleware(functools.partial(original, app), **options)
        await served(scope, receive, send)

    return __call__


class FlaskInstrumentor(BaseInstrumentor):
    """Request identity for every Flask app: :func:`~instrumentation.instrument_flask` on its first request.

    An app that called ``instrument_flask`` itself is left as it is.
    """

    _original: Any = None

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("flask >= 2.0",)

    def _instrument(self, **kwargs: Any) -> None:
        from flask import Flask

        from instrumentation.wsgi import WSGIMiddleware, instrument_flask

        if FlaskInstrumentor._original is not None:
            return
        original = Flask.__call__
        options = dict(kwargs)

        def __call__(app: Any, environ: dict, start_response: Any) -> Any:
            if not app.__dict__.get("_otel_flask"):
                app.__dict__["_otel_flask"] = True
                if not isinstance(app.wsgi_app, WSGIMiddleware):  # the app instrumented itself already
                    instrument_flask(app, **options)
            return original(app, environ, start_response)

        FlaskInstrumentor._original = original
        Flask.__call__ = __call__  # type: ignore[method-assign]

    def _uninstrument(self, **kwargs: Any) -> None:
        from flask import Flask

        if FlaskInstrumentor._original is not None:
            Flask.__call__ = FlaskInstrumentor._original  # type: ignore[method-assign]
            FlaskInstrumentor._original = None

