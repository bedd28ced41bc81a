"""A fuzz harness for the sidecar's front door: OTLP/gRPC, OTLP/HTTP protobuf and JSON, and the redaction engine.

It starts a real sidecar (``python -m sidecar``) running the shipped default pipeline
(memory_limiter, span_metrics, tail_sampling, redaction, file exporter), throws mutated
OTLP at it over real sockets, and reports what an attacker could do to it:

- ``crashes``: the sidecar process died (it is restarted and the input kept);
- ``hangs``: an answer took longer than ``--hang-seconds``;
- ``server_errors``: gRPC UNKNOWN/INTERNAL or HTTP 5xx other than 503 for client input —
  malformed input must get INVALID_ARGUMENT / 400, load the retryable codes;
- ``peak_rss_mib``: the sidecar's largest resident set while fuzzing;
- ``pipeline_errors``: tracebacks in the sidecar's log: a stage failing on input the receiver
  accepted (the receivers check traces and logs on the wire and stages parse later, so a check
  laxer than the parser would show here, not as an answer).

Inputs are generated from a seed (same seed, same inputs) by byte-level mutation of
valid requests (flips, truncation, splices, huge varints, unknown fields and groups) and
structure-aware mutation (out-of-range enums, bad id lengths, deep nesting, huge strings,
type-confused JSON, corrupt and many-member gzip). The redaction engine is fuzzed in
process with the same mutated requests and hostile strings.

Run it long (the figure the issue asks for)::

    .venv/bin/python -m tests.fuzz.harness --inputs 1000000 --paths c,python

CI runs a short version of it in ``tests/fuzz/test_fuzz.py``.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidecar.testing import SidecarProcess, free_port

SIGNALS = {
    "traces": (ExportTraceServiceRequest, "/opentelemetry.proto.collector.trace.v1.TraceService/Export", "/v1/traces"),
    "logs": (ExportLogsServiceRequest, "/opentelemetry.proto.collector.logs.v1.LogsService/Export", "/v1/logs"),
    "metrics": (ExportMetricsServiceRequest,
                "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export", "/v1/metrics"),
}
#: gRPC answers that are fine for hostile input: accepted, rejected as invalid, or refused as load
GRPC_OK = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.UNAVAILABLE}
HTTP_OK = {200, 400, 413, 415, 429, 503}
PII = ["jane.doe@example.com", "4111 1111 1111 1111", "+1 415 555 0100", "AKIAIOSFODNN7EXAMPLE",
       "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl", "DE89370400440532013000", "078-05-1120"]
HOSTILE_TEXT = ["(a+)+$" * 50, "a" * 100_000 + "!", "\ud7ff" * 1000, "@" * 5000, "4" * 20_000,
                "\x00\x01\x02" * 1000, "[EMAIL]" * 100, "%s%n" * 100]


# --- seeds: valid requests of every signal ----------------------------------------------------

def _kv(attrs, key, value):
    kv = attrs.add(key=key)
    if isinstance(value, bool):
        kv.value.bool_value = value
    elif isinstance(value, int):
        kv.value.int_value = value
    elif isinstance(value, float):
        kv.value.double_value = value
    else:
        kv.value.string_value = value


def seed_requests(rng: random.Random) -> dict[str, list[bytes]]:
    seeds: dict[str, list[bytes]] = {"traces": [], "logs": [], "metrics": []}
    for i in range(8):
        t = ExportTraceServiceRequest()
        rs = t.resource_spans.add()
        _kv(rs.resource.attributes, "service.name", "classifier")
        ss = rs.scope_spans.add()
        ss.scope.name = "instrumentation.torch"
        trace_id = rng.randbytes(16)
        for j in range(rng.randint(1, 6)):
            sp = ss.spans.add(trace_id=trace_id, span_id=rng.randbytes(8), name=f"POST /predict/{j}",
                              kind=rng.randint(0, 5), start_time_unix_nano=1_700_000_000_000_000_000 + j,
                              end_time_unix_nano=1_700_000_000_500_000_000 + j)
            if j:
                sp.parent_span_id = ss.spans[0].span_id
            _kv(sp.attributes, "ml.model.id", rng.choice(["resnet", "", "llama"]))
            _kv(sp.attributes, "ml.model.version", "v1")
            _kv(sp.attributes, "gen_ai.request.model", "llama")
            _kv(sp.attributes, "request.id", f"req-{i}-{j}")
            _kv(sp.attributes, "user.email", rng.choice(PII))
            _kv(sp.attributes, "sampling.force_keep", bool(rng.getrandbits(1)))
            _kv(sp.attributes, "http.response.status_code", rng.choice([200, 500]))
            kvl = sp.attributes.add(key="payload").value.kvlist_value
            _kv(kvl.values, "prompt", "hello " + rng.choice(PII))
            ev = sp.events.add(name="exception", time_unix_nano=1)
            _kv(ev.attributes, "exception.message", rng.choice(PII))
            sp.links.add(trace_id=rng.randbytes(16), span_id=rng.randbytes(8))
            sp.status.code = rng.randint(0, 2)
        seeds["traces"].append(t.SerializeToString())

        lg = ExportLogsServiceRequest()
        sl = lg.resource_logs.add().scope_logs.add()
        for j in range(rng.randint(1, 5)):
            lr = sl.log_records.add(severity_number=rng.choice([9, 13, 17]), time_unix_nano=j,
                                    trace_id=trace_id if j % 2 else b"", span_id=rng.randbytes(8) if j % 2 else b"")
            if j % 3:
                lr.body.string_value = "user " + rng.choice(PII)
            else:
                _kv(lr.body.kvlist_value.values, "msg", rng.choice(PII))
            _kv(lr.attributes, "request.id", f"req-{i}")
        seeds["logs"].append(lg.SerializeToString())

        m = ExportMetricsServiceRequest()
        sm = m.resource_metrics.add().scope_metrics.add()
        g = sm.metrics.add(name="gauge")
        _kv(g.gauge.data_points.add(as_double=1.5).attributes, "model", "m")
        s = sm.metrics.add(name="sum")
        s.sum.data_points.add(as_int=3)
        h = sm.metrics.add(name="hist")
        h.histogram.data_points.add(count=2, bucket_counts=[1, 1], explicit_bounds=[1.0])
        e = sm.metrics.add(name="exp")
        e.exponential_histogram.data_points.add(count=1, scale=3).positive.bucket_counts.append(1)
        su = sm.metrics.add(name="summary")
        su.summary.data_points.add(count=1, sum=2.0).quantile_values.add(quantile=0.5, value=1.0)
        seeds["metrics"].append(m.SerializeToString())
    return seeds


# --- mutators -----------------------------------------------------------------------------------

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def mutate_bytes(rng: random.Random, data: bytes, other: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(9)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:  # flip
            b[min(pos, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:  # random byte
            b[pos:pos] = bytes([rng.randrange(256)])
        elif op == 2:  # truncate
            del b[pos:]
        elif op == 3:  # delete a range
            del b[pos:pos + rng.randint(1, 16)]
        elif op == 4:  # splice
            cut = rng.randrange(len(other) + 1)
            b[pos:] = other[cut:]
        elif op == 5:  # huge / overlong varint
            b[pos:pos] = rng.choice([b"\xff" * 9 + b"\x01", b"\x80" * 10, _varint(rng.getrandbits(64))])
        elif op == 6:  # an unknown field of any wire type, including groups and bad ones
            tag = (rng.randint(1, 2 ** 29 - 1) << 3) | rng.randrange(8)
            b[pos:pos] = _varint(tag) + rng.randbytes(rng.randint(0, 12))
        elif op == 7 and b:  # duplicate a chunk
            start = rng.randrange(len(b))
            b[pos:pos] = b[start:start + rng.randint(1, 64)]
        elif op == 8:  # a length prefix that lies
            b[pos:pos] = b"\x0a" + _varint(rng.choice([0, 1, 2 ** 31, 2 ** 63])) + rng.randbytes(4)
    return bytes(b)


def _deep_json(depth: int, doc) -> bytes:
    """``doc`` nested ``depth`` levels deep, written as text (json.dumps would hit the recursion limit)."""
    return (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"attributes": [{"key": "d", "value": '
            + b'{"kvlistValue": {"values": [{"key": "k", "value": ' * depth + json.dumps(doc).encode()
            + b"}]}}" * depth + b"}]}]}]}]}")


def mutate_structure(rng: random.Random, signal: str, data: bytes):
    """A protobuf-aware mutation; returns bytes, or a message that does not fit protobuf (JSON only)."""
    msg = SIGNALS[signal][0].FromString(data)
    op = rng.randrange(7)
    huge_enum = rng.choice([3, 7, 99, 2 ** 31 - 1, -1, -(2 ** 31)])
    if signal == "traces":
        spans = [sp for rs in msg.resource_spans for ss in rs.scope_spans for sp in ss.spans]
        sp = rng.choice(spans)
        if op == 0:
            sp.status.code = huge_enum
        elif op == 1:
            sp.kind = huge_enum
        elif op == 2:
            setattr(sp, rng.choice(["trace_id", "span_id", "parent_span_id"]), rng.randbytes(rng.choice([0, 1, 7, 9, 17])))
        elif op == 3:
            sp.name = rng.choice(HOSTILE_TEXT + PII)
        elif op == 4:
            v = sp.attributes.add(key="deep").value
            for _ in range(rng.randint(20, 140)):
                v = v.kvlist_value.values.add(key="k").value
            v.string_value = rng.choice(PII)
        elif op == 5:
            sp.end_time_unix_nano, sp.start_time_unix_nano = 0, 2 ** 64 - 1
        else:
            for _ in range(rng.randint(100, 2000)):
                _kv(sp.attributes, rng.choice(["a", "b", "authorization"]), rng.choice(PII))
    elif signal == "logs":
        lr = msg.resource_logs[0].scope_logs[0].log_records[0]
        if op == 0:
            lr.severity_number = huge_enum
        elif op == 1:
            lr.trace_id = rng.randbytes(rng.choice([1, 15, 17]))
        elif op == 2:
            lr.body.string_value = rng.choice(HOSTILE_TEXT)
        elif op == 3:
            arr = lr.body.array_value
            for _ in range(rng.randint(20, 140)):
                arr = arr.values.add().array_value
        else:
            lr.body.bytes_value = rng.randbytes(64)
    else:
        metric = msg.resource_metrics[0].scope_metrics[0].metrics[rng.randrange(5)]
        if op == 0:
            metric.sum.aggregation_temporality = huge_enum
        elif op == 1:
            metric.histogram.data_points.add(count=1, bucket_counts=[1] * 5, explicit_bounds=[1.0])  # counts != bounds+1
        elif op == 2:
            metric.name = rng.choice(HOSTILE_TEXT)
        else:
            metric.gauge.data_points.add(as_double=float("nan"))
    return msg.SerializeToString()


_JSON_SEEDS: dict[bytes, str] = {}


def mutate_json(rng: random.Random, signal: str, data: bytes) -> bytes:
    text = _JSON_SEEDS.get(data)
    if text is None:
        from sidecar.otlp_json import to_json  # OTLP/JSON: hex ids, integer enums
        from sidecar.signals import Signal

        text = _JSON_SEEDS[data] = to_json(Signal(signal), SIGNALS[signal][0].FromString(data))
    doc = json.loads(text)
    op = rng.randrange(8)
    if op == 0:  # type confusion somewhere
        _confuse(rng, doc)
    elif op == 1:
        if rng.getrandbits(1):
            return _deep_json(rng.randint(50, 3000), {"stringValue": "x"})
        doc = [doc] * 3
    elif op == 2:
        text = json.dumps(doc)
        cut = rng.randrange(len(text) + 1)
        return text[:cut].encode()
    elif op == 3:
        text = json.dumps(doc).replace('"traceId": "', '"traceId": "zz', 1)
        return text.encode()
    elif op == 4:
        return b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"startTimeUnixNano": "1e999999"}]}]}]}'
    elif op == 5:
        return json.dumps(doc).encode().replace(b"e", b"\xff\xfe", 1)
    elif op == 6:
        return b"[" * rng.randint(1000, 200_000)
    else:
        _confuse(rng, doc)
        _confuse(rng, doc)
    return json.dumps(doc).encode()


def _confuse(rng: random.Random, node) -> None:
    """Replace one random leaf or object with a value of the wrong type."""
    path = []
    while isinstance(node, (dict, list)) and node:
        key = rng.choice(list(node.keys())) if isinstance(node, dict) else rng.randrange(len(node))
        path.append((node, key))
        node = node[key]
        if rng.random() < 0.25:
            break
    if path:
        parent, key = path[-1]
        parent[key] = rng.choice([None, True, -1, 2 ** 70, 1.5e308, "x" * 1000, [], {}, "-0x1", "NaN", {"a": [1]}])


_EMPTY_MEMBER = gzip.compress(b"", compresslevel=1)
_BOMBS = {mib: gzip.compress(b"\x00" * mib * 1024 * 1024, compresslevel=9) for mib in (1, 24, 64)}


def gzip_variant(rng: random.Random, body: bytes) -> bytes:
    op = rng.randrange(4)
    if op == 0:
        return gzip.compress(body, compresslevel=1)
    if op == 1:  # corrupt
        z = bytearray(gzip.compress(body, compresslevel=1))
        z[rng.randrange(len(z))] ^= 0xFF
        return bytes(z)
    if op == 2:  # many tiny members (quadratic decompression is the bug this looks for)
        return _EMPTY_MEMBER * rng.randint(1000, 20_000) + gzip.compress(body, compresslevel=1)
    return _BOMBS[rng.choice(list(_BOMBS))]  # a decompression bomb


# --- the run ------------------------------------------------------------------------------------

@dataclass
class Report:
    path: str
    inputs: int = 0
    crashes: int = 0
    hangs: int = 0
    server_errors: int = 0
    peak_rss_mib: float = 0.0
    outcomes: Counter = field(default_factory=Counter)
    redaction_inputs: int = 0
    redaction_errors: int = 0
    pipeline_errors: int = 0
    seconds: float = 0.0
    kept: list = field(default_factory=list)  # (kind, transport, detail) of the first bad inputs

    def merge(self, other: "Report") -> None:
        self.inputs += other.inputs
        self.hangs += other.hangs
        self.server_errors += other.server_errors
        self.outcomes.update(other.outcomes)
        self.kept.extend(other.kept[: max(0, 20 - len(self.kept))])

    def line(self) -> str:
        return (f"path={self.path} inputs={self.inputs} crashes={self.crashes} hangs={self.hangs} "
                f"5xx={self.server_errors} peak_rss_mib={self.peak_rss_mib:.0f} "
                f"redaction_inputs={self.redaction_inputs} redaction_errors={self.redaction_errors} "
                f"pipeline_errors={self.pipeline_errors} "
                f"seconds={self.seconds:.0f} rate={self.inputs / max(self.seconds, 1e-9):.0f}/s")


def shipped_config() -> str:
    """The default config users run; endpoints and directories come from the environment (_sidecar_env)."""
    return (Path(__file__).resolve().parents[2] / "collector-config" / "sidecar.yaml").read_text()


def _sidecar_env(grpc_port: int, http_port: int, workdir: Path, pure: bool) -> dict:
    return {
        "SIDECAR_OTLP_GRPC_ENDPOINT": f"127.0.0.1:{grpc_port}",
        "SIDECAR_OTLP_HTTP_ENDPOINT": f"127.0.0.1:{http_port}",
        "SIDECAR_HEALTH_ENDPOINT": f"127.0.0.1:{free_port()}",
        "SIDECAR_METRICS_ENDPOINT": f"127.0.0.1:{free_port()}",
        "SIDECAR_STORAGE_DIR": str(workdir / "storage"),
        "SIDECAR_FILE_EXPORT_DIR": str(workdir / "telemetry"),
        "SIDECAR_PURE_PYTHON": "1" if pure else "0",
    }


class _Sidecar:
    """The sidecar under test, on fixed ports so it can be restarted after a crash."""

    def __init__(self, workdir: Path, pure: bool, grpc_port: int, http_port: int):
        self.workdir, self.pure = workdir, pure
        self.grpc_port, self.http_port = grpc_port, http_port
        log = workdir / "sidecar.log"
        self.log_start = log.stat().st_size if log.exists() else 0  # a reused workdir's log is appended to
        self.proc = SidecarProcess(shipped_config(), workdir=workdir,
                                   env=_sidecar_env(grpc_port, http_port, workdir, pure)).start(60)
        self.ps = psutil.Process(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.proc.poll() is None

    def rss_mib(self) -> float:
        try:
            return self.ps.memory_info().rss / 2 ** 20
        except psutil.Error:
            return 0.0

    def tracebacks(self) -> int:
        """Tracebacks this run's sidecar logged (client errors are one-line summaries, never one)."""
        with open(self.workdir / "sidecar.log", "rb") as f:
            f.seek(self.log_start)
            return f.read().count(b"Traceback")

    def stop(self) -> None:
        if self.alive():
            try:
                self.proc.terminate(60)
            except Exception:  # noqa: BLE001 - a stuck sidecar is killed
                self.proc.kill()
        self.proc._log.close()  # noqa: SLF001


class _Client:
    """gRPC and HTTP/1.1 keep-alive connections to the sidecar's receivers."""

    def __init__(self, grpc_port: int, http_port: int):
        self.http_port = http_port
        self.channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}",
                                             options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
        self.calls = {s: self.channel.unary_unary(m, request_serializer=None, response_deserializer=None)
                      for s, (_, m, _) in SIGNALS.items()}
        self.http: http.client.HTTPConnection | None = None

    def send_grpc(self, signal: str, body: bytes, timeout: float) -> str:
        try:
            self.calls[signal](body, timeout=timeout)
            return "grpc:OK"
        except grpc.RpcError as e:
            return f"grpc:{e.code().name}"

    def send_http(self, signal: str, body: bytes, ctype: str, encoding: str | None, timeout: float) -> str:
        headers = {"Content-Type": ctype}
        if encoding:
            headers["Content-Encoding"] = encoding
        for attempt in range(2):
            if self.http is None:
                self.http = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
            try:
                self.http.request("POST", SIGNALS[signal][2], body=body, headers=headers)
                resp = self.http.getresponse()
                resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    self.http.close()
                    self.http = None
                return f"http:{resp.status}"
            except TimeoutError:
                self.http.close()
                self.http = None
                return "hang"
            except (ConnectionError, http.client.HTTPException, OSError):
                self.http.close()
                self.http = None
                if attempt:
                    return "http:connection_closed"
        return "http:connection_closed"

    def close(self) -> None:
        self.channel.close()
        if self.http is not None:
            self.http.close()


def _bad(outcome: str) -> str | None:
    """'server_error', 'hang' or None for an acceptable answer to hostile input."""
    if outcome == "hang" or outcome == "grpc:DEADLINE_EXCEEDED":
        return "hang"
    kind, _, code = outcome.partition(":")
    if kind == "grpc":
        return None if grpc.StatusCode[code] in GRPC_OK else "server_error"
    if kind == "http":
        return None if code == "connection_closed" or int(code) in HTTP_OK else "server_error"
    return None


def fuzz_redaction(rng: random.Random, seeds: dict[str, list[bytes]], n: int, report: Report) -> None:
    """The engine and the OTLP adapter on hostile text and mutated requests: nothing may raise."""
    from redaction import RedactionEngine
    from redaction.otlp import OtlpRedactor

    engine = RedactionEngine()
    redactor = OtlpRedactor(engine)
    for _ in range(n):
        report.redaction_inputs += 1
        signal = rng.choice(list(SIGNALS))
        try:
            if rng.random() < 0.5:
                text = "".join(rng.choice(HOSTILE_TEXT + PII + ["x", " ", "@", ".", "-"]) for _ in range(rng.randint(1, 6)))
                engine.redact_text(text)
                engine.redact_name(text[:2000])
            else:
                data = mutate_bytes(rng, rng.choice(seeds[signal]), rng.choice(seeds[signal]))
                try:
                    msg = SIGNALS[signal][0].FromString(data)
                except Exception:  # noqa: BLE001 - not parseable: the receiver rejects it before redaction
                    continue
                redactor.redact(signal, msg)
        except Exception as e:  # noqa: BLE001 - every exception is a finding
            report.redaction_errors += 1
            if len(report.kept) < 20:
                report.kept.append(("redaction", signal, repr(e)[:300]))


def send_inputs(job: tuple) -> Report:
    """One client's share: ``count`` inputs generated from ``seed``, sent, and their answers judged."""
    grpc_port, http_port, seed, count, hang_seconds, workdir, path = job
    rng = random.Random(seed)
    seeds = seed_requests(random.Random(0))
    report = Report(path=path)
    client = _Client(grpc_port, http_port)
    try:
        for _ in range(count):
            signal = rng.choice(list(SIGNALS))
            base = rng.choice(seeds[signal])
            style = rng.random()
            transport = rng.choice(["grpc", "grpc", "http-proto", "http-json"])
            if transport == "http-json":
                body = mutate_json(rng, signal, base)
            elif style < 0.6:
                body = mutate_bytes(rng, base, rng.choice(seeds[rng.choice(list(SIGNALS))]))
            else:
                body = mutate_structure(rng, signal, base)
            if transport == "grpc":
                outcome = client.send_grpc(signal, body, hang_seconds)
            else:
                ctype = "application/json" if transport == "http-json" else "application/x-protobuf"
                encoding = None
                if rng.random() < 0.15:
                    body, encoding = gzip_variant(rng, body), "gzip"
                outcome = client.send_http(signal, body, ctype, encoding, hang_seconds)
            report.inputs += 1
            report.outcomes[outcome] += 1
            bad = _bad(outcome)
            if bad == "hang":
                report.hangs += 1
            elif bad == "server_error":
                report.server_errors += 1
            if bad and len(report.kept) < 5:
                _keep(workdir, report, bad, transport, signal, body, f"{outcome} seed={seed}")
    finally:
        client.close()
    return report


def run(inputs: int, pure: bool, *, seed: int = 1, clients: int = 1, hang_seconds: float = 10.0,
        workdir: Path, progress: bool = False) -> Report:
    """Fuzz one sidecar (restarted after any crash) with ``inputs`` inputs from ``clients`` processes."""
    import multiprocessing

    path = "python" if pure else "c"
    report = Report(path=path)
    workdir.mkdir(parents=True, exist_ok=True)
    grpc_port, http_port = free_port(), free_port()
    target = _Sidecar(workdir / "sidecar-0", pure, grpc_port, http_port)
    chunk = 2000
    jobs = [(grpc_port, http_port, seed * 1_000_003 + i, min(chunk, inputs - i * chunk), hang_seconds, workdir, path)
            for i in range((inputs + chunk - 1) // chunk)]
    started = time.monotonic()
    last_print = started
    try:
        with multiprocessing.get_context("spawn").Pool(clients) as pool:
            pending = pool.imap_unordered(send_inputs, jobs)
            done = 0
            while done < len(jobs):
                try:
                    part = pending.next(timeout=0.2)
                except multiprocessing.TimeoutError:
                    part = None
                if part is not None:
                    done += 1
                    report.merge(part)
                report.peak_rss_mib = max(report.peak_rss_mib, target.rss_mib())
                if not target.alive():  # a crash: keep its log, restart on the same ports
                    report.crashes += 1
                    report.pipeline_errors += target.tracebacks()
                    report.kept.append(("crash", "-", target.proc.log()[-2000:]))
                    target.stop()
                    target = _Sidecar(workdir / f"sidecar-{report.crashes}", pure, grpc_port, http_port)
                if progress and time.monotonic() - last_print > 15:
                    last_print = time.monotonic()
                    report.seconds = last_print - started
                    print(report.line(), flush=True)
        rng = random.Random(seed)
        fuzz_redaction(rng, seed_requests(rng), max(inputs // 4, 100), report)
    finally:
        report.seconds = time.monotonic() - started
        target.stop()
        report.pipeline_errors += target.tracebacks()
    return report


def _keep(workdir: Path, report: Report, kind: str, transport: str, signal: str, body: bytes, detail: str) -> None:
    n = len(report.kept)
    path = workdir / f"finding-{n}-{kind}-{transport}-{signal}.bin"
    path.write_bytes(body)
    report.kept.append((kind, transport, f"{detail[:300]} -> {path}"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=int, default=20_000, help="receiver inputs per scanner path")
    ap.add_argument("--paths", default="c,python", help="scanner paths to fuzz: c, python or both")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--clients", type=int, default=2, help="client processes sending at once")
    ap.add_argument("--hang-seconds", type=float, default=10.0)
    ap.add_argument("--workdir", type=Path, default=Path("var/fuzz"))
    args = ap.parse_args(argv)
    failed = False
    for path in args.paths.split(","):
        report = run(args.inputs, path == "python", seed=args.seed, clients=args.clients,
                     hang_seconds=args.hang_seconds,
                     workdir=args.workdir / path, progress=True)
        print(report.line())
        print("  outcomes:", dict(report.outcomes.most_common()))
        for finding in report.kept:
            print("  finding:", *finding)
        failed |= bool(report.crashes or report.hangs or report.server_errors or report.redaction_errors
                       or report.pipeline_errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
