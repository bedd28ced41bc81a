"""The TorchServe handler base: stage spans and traceparent continuation, first with a fake
TorchServe context, then in a real TorchServe (Java frontend + Python worker) exporting over
OTLP/gRPC to a test backend."""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from opentelemetry.trace import SpanKind, StatusCode

from instrumentation.torchserve import TracingHandlerMixin
from sidecar.testing import OTLPBackend, free_port


class FakeBaseHandler:
    """TorchServe's BaseHandler control flow: handle() calls the three stages."""

    def initialize(self, context):
        self.initialized = True

    def preprocess(self, data):
        return [row["body"] for row in data]

    def inference(self, data, *args, **kwargs):
        if "boom" in data:
            raise ValueError("bad tensor")
        return [x.upper() for x in data]

    def postprocess(self, data):
        return data

    def handle(self, data, context):
        return self.postprocess(self.inference(self.preprocess(data)))


class FakeContext:
    """TorchServe's Context as the handler sees it: header names arrive as the client spelled them."""

    model_name = "tiny"
    manifest = {"model": {"modelVersion": "2.0"}}

    def __init__(self, headers: list[dict]):
        self._headers = headers
        self.request_ids = {i: f"ts-{i}" for i in range(len(headers))}

    def get_request_header(self, idx, key):
        return self._headers[idx].get(key)

    def get_all_request_header(self, idx):
        return self._headers[idx]


def handler(spans, base=FakeBaseHandler):
    class Handler(TracingHandlerMixin, base):
        tracer_provider = spans.provider

    return Handler()


TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
STAGES = ("preprocess", "inference", "postprocess")


def test_batch_span_continues_the_callers_trace_with_stage_children(spans):
    ctx = FakeContext([{"Traceparent": f"00-{TRACE}-{PARENT}-01", "X-Request-ID": "rid-1"},
                       {"traceparent": f"00-{'1' * 32}-{'2' * 16}-01"}])
    assert handler(spans).handle([{"body": "a"}, {"body": "b"}], ctx) == ["A", "B"]
    by_name = {s.name: s for s in spans.finished()}
    root = by_name["torchserve.handle tiny"]
    assert root.kind is SpanKind.SERVER
    assert format(root.context.trace_id, "032x") == TRACE and format(root.parent.span_id, "016x") == PARENT
    assert [format(link.context.trace_id, "032x") for link in root.links] == ["1" * 32]
    assert root.attributes["ml.model.id"] == "tiny" and root.attributes["ml.model.version"] == "2.0"
    assert root.attributes["ml.batch_size"] == 2 and root.attributes["request.id"] == "rid-1"
    for stage in STAGES:
        span = by_name[f"torchserve.{stage}"]
        assert span.parent.span_id == root.context.span_id
        assert span.attributes["ml.model.id"] == "tiny" and span.attributes["ml.model.version"] == "2.0"


def test_stages_a_subclass_overrides_are_traced_once(spans):
    class UserHandler(TracingHandlerMixin, FakeBaseHandler):
        tracer_provider = spans.provider

        def preprocess(self, data):  # calls the traced base stage through super(): still one span
            return [s + "!" for s in super().preprocess(data)]

        def inference(self, data, *args, **kwargs):
            return [s * 2 for s in data]

    class Subclass(UserHandler):
        def postprocess(self, data):
            return list(reversed(super().postprocess(data)))

    assert Subclass().handle([{"body": "a"}, {"body": "b"}], FakeContext([{}, {}])) == ["b!b!", "a!a!"]
    names = sorted(s.name for s in spans.finished())
    assert names == sorted(["torchserve.handle tiny", *(f"torchserve.{s}" for s in STAGES)])


def test_debug_header_keeps_the_batch_with_its_model_identity_when_head_sampling_drops_everything():
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    from instrumentation import ForceKeepSampler, RequestContextSpanProcessor

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ForceKeepSampler(ALWAYS_OFF))
    provider.add_span_processor(RequestContextSpanProcessor())
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    class Handler(TracingHandlerMixin, FakeBaseHandler):
        tracer_provider = provider

    Handler().handle([{"body": "a"}], FakeContext([{}]))
    Handler().handle([{"body": "a"}], FakeContext([{"X-Debug-Trace": "1"}]))
    finished = exporter.get_finished_spans()
    assert sorted(s.name for s in finished) == sorted(["torchserve.handle tiny", *(f"torchserve.{s}" for s in STAGES)])
    for span in finished:
        assert span.attributes["sampling.force_keep"] is True, span.name
        assert span.attributes["ml.model.id"] == "tiny" and span.attributes["ml.model.version"] == "2.0", span.name


def test_failure_marks_the_stage_and_the_batch(spans):
    with pytest.raises(ValueError):
        handler(spans).handle([{"body": "boom"}], FakeContext([{}]))
    by_name = {s.name: s for s in spans.finished()}
    assert by_name["torchserve.inference"].status.status_code is StatusCode.ERROR
    assert by_name["torchserve.handle tiny"].status.status_code is StatusCode.ERROR
    assert any(e.name == "exception" for e in by_name["torchserve.handle tiny"].events)


# --- a real TorchServe ------------------------------------------------------------------------

#: The worker exports every 100 ms, so the test waits on arrival, not on a flush in the handler.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_BLRP_SCHEDULE_DELAY": "100"}
#: What torchserve_app/tiny_handler.py logs in each stage for a one-row request.
LOG_LINES = {"preprocess": "preprocess 1 rows", "postprocess": "postprocess (1, 2)"}


def _missing_torchserve() -> str | None:
    if importlib.util.find_spec("ts") is None or importlib.util.find_spec("model_archiver") is None:
        return "needs torchserve==0.12.0 and torch-model-archiver==0.12.0 (the dev extra)"
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        return "needs Java 17 on PATH (or JAVA_HOME) for TorchServe's frontend"
    return None


class TorchServe:
    """``torchserve --start --foreground`` as a real process group, cwd and TMPDIR in ``home``.

    TMPDIR keeps its pid file and worker sockets away from any other TorchServe on
    the machine; stopping kills the whole group (frontend and Python worker).
    """

    def __init__(self, home: Path, store: Path, model: str, otlp_endpoint: str) -> None:
        from .torchserve_app.model_store import write_config

        self.home, self.model = home, model
        self.inference, self.management = free_port(), free_port()
        config = write_config(home / "config.properties", inference=self.inference, management=self.management,
                              metrics=free_port(), store=store)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update(FAST_EXPORT, TS_E2E_OTLP_ENDPOINT=otlp_endpoint, TMPDIR=str(home), TEMP=str(home),
                   PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""))
        self.stdout = (home / "torchserve.out").open("wb")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("torchserve")), "--start", "--foreground", "--ncs",
             "--ts-config", str(config), "--model-store", str(store), "--models", f"{model}={model}.mar"],
            cwd=home, env=env, stdout=self.stdout, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        """Frontend output and the worker's log, for failure messages."""
        parts = [(self.home / "torchserve.out").read_text(errors="replace")[-4000:]]
        model_log = self.home / "logs" / "model_log.log"
        if model_log.exists():
            parts.append(model_log.read_text(errors="replace")[-4000:])
        return "\n".join(parts)

    def wait_ready(self, timeout: float = 60) -> None:
        """Until the management API reports the model's worker READY."""
        url = f"http://127.0.0.1:{self.management}/models/{self.model}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"torchserve exited {self.proc.returncode}\n{self.output()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if any(w.get("status") == "READY" for w in json.loads(resp.read())[0]["workers"]):
                        return
            except (OSError, ValueError, LookupError):
                pass
            time.sleep(0.2)
        pytest.fail(f"model {self.model!r} not ready after {timeout}s\n{self.output()}")

    def predict(self, body: object, headers: dict[str, str]) -> object:
        req = urllib.request.Request(f"http://127.0.0.1:{self.inference}/predictions/{self.model}",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **headers})
        try:
            with urllib.request.urlopen(req, timeout=20) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            pytest.fail(f"HTTP {e.code}: {e.read()!r}\n{self.output()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        try:  # the worker shares the group; make sure nothing outlives the test
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.stdout.close()


def _attrs(kvs) -> dict:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in kvs}


def _wait_until(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


@pytest.mark.torchserve
@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_real_torchserve_continues_the_callers_trace_with_stage_spans_and_logs(tmp_path):
    reason = _missing_torchserve()
    if reason:
        pytest.skip(reason)
    from .torchserve_app.model_store import MODEL_NAME, MODEL_VERSION, build_model_store

    store = tmp_path / "store"
    build_model_store(store, tmp_path)
    calls = [(secrets.token_hex(16), secrets.token_hex(8), f"rid-{i}") for i in range(3)]
    with OTLPBackend() as backend:
        server = TorchServe(tmp_path, store, MODEL_NAME, backend.endpoint)
        try:
            server.wait_ready()
            for i, (trace_id, parent, rid) in enumerate(calls):
                headers = {"traceparent": f"00-{trace_id}-{parent}-01", "X-Request-ID": rid}
                if i == 2:
                    headers["X-Debug-Trace"] = "1"
                assert server.predict([1, 2, 3, i], headers) == pytest.approx([6.0 + i, 2.5 - i])

            span_names = (f"torchserve.handle {MODEL_NAME}", *(f"torchserve.{s}" for s in STAGES))
            wanted_spans = {(t, name) for t, _, _ in calls for name in span_names}
            wanted_logs = {(t, body) for t, _, _ in calls for body in LOG_LINES.values()}

            def arrived() -> bool:
                spans = {(s.trace_id.hex(), s.name) for _, _, s in backend.spans()}
                logs = {(r.trace_id.hex(), r.body.string_value) for _, _, r in backend.log_records()}
                return wanted_spans <= spans and wanted_logs <= logs

            assert _wait_until(arrived, 30), f"spans/logs missing\n{server.output()}"
        finally:
            server.stop()

    spans = {(s.trace_id.hex(), s.name): (resource, s) for resource, _, s in backend.spans()}
    records = [r for _, _, r in backend.log_records()]
    for i, (trace_id, parent, rid) in enumerate(calls):
        resource, root = spans[(trace_id, f"torchserve.handle {MODEL_NAME}")]
        assert _attrs(resource.attributes)["service.name"] == "torchserve-e2e"
        assert root.parent_span_id.hex() == parent  # continues the caller's span
        assert root.kind == root.SPAN_KIND_SERVER
        root_attrs = _attrs(root.attributes)
        assert root_attrs["ml.model.id"] == MODEL_NAME and root_attrs["ml.model.version"] == MODEL_VERSION
        assert root_attrs["request.id"] == rid and root_attrs["ml.batch_size"] == 1
        assert root_attrs.get("sampling.force_keep", False) is (i == 2)
        stage_ids = {}
        for stage in STAGES:
            _, span = spans[(trace_id, f"torchserve.{stage}")]
            assert span.parent_span_id == root.span_id, stage
            attrs = _attrs(span.attributes)
            assert attrs["ml.model.id"] == MODEL_NAME and attrs["ml.model.version"] == MODEL_VERSION, stage
            assert attrs["request.id"] == rid, stage
            assert root.start_time_unix_nano <= span.start_time_unix_nano <= span.end_time_unix_nano \
                <= root.end_time_unix_nano, stage
            stage_ids[stage] = span.span_id
        # the handler's own log lines, as OTLP log records inside the stage that wrote them
        for stage, body in LOG_LINES.items():
            [record] = [r for r in records if r.trace_id.hex() == trace_id and r.body.string_value == body]
            assert record.span_id == stage_ids[stage], stage
            attrs = _attrs(record.attributes)
            assert attrs["request.id"] == rid and attrs["ml.model.id"] == MODEL_NAME, stage
