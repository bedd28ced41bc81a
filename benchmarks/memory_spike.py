"""Big requests against the memory limiter of a real sidecar: peak RSS and time to accept again.

    .venv/bin/python benchmarks/memory_spike.py [--mib 15] [--requests 2] [--limit-mib 400] [--concurrent]

Starts ``python -m sidecar`` with otlp -> memory_limiter (``limit_mib``, 20% spike headroom) ->
otlp exporter to an in-process OTLP backend, sends ``--requests`` OTLP/gRPC trace requests of
about ``--mib`` MiB each (one after the other, or all at once with ``--concurrent``), then sends
a small request every 10 ms until one is accepted. A refused big request is retried every second,
as an OTLP client would. Printed: RSS before, the process's peak RSS
(VmHWM), the answer to each big request, and the seconds from the last big answer until the
limiter accepted again (0 when it never refused). Issue 9 measured 500-560 MiB peaks against 400
and 45-60 s of refusals before the receiver asked the limiter and the limiter re-checked on refusal.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sidecar.testing import OTLPBackend, SidecarProcess, free_port  # noqa: E402

TRACE_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
MIB = 1024 * 1024


def big_request(mib: float) -> bytes:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "bench"
    ss = rs.scope_spans.add()
    i = 0
    while req.ByteSize() < mib * MIB:
        for _ in range(2000):
            sp = ss.spans.add(name=f"predict-{i % 50}", trace_id=os.urandom(16), span_id=os.urandom(8),
                              start_time_unix_nano=1_700_000_000_000_000_000,
                              end_time_unix_nano=1_700_000_000_001_000_000)
            sp.attributes.add(key="ml.model.id").value.string_value = "resnet-50"
            sp.attributes.add(key="http.route").value.string_value = "/v1/predict"
            i += 1
    return req.SerializeToString()


def small_request() -> bytes:
    req = ExportTraceServiceRequest()
    req.resource_spans.add().scope_spans.add().spans.add(name="ping", trace_id=b"\1" * 16, span_id=b"\2" * 8)
    return req.SerializeToString()


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=float, default=15)
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("--limit-mib", type=int, default=400)
    ap.add_argument("--concurrent", action="store_true")
    ap.add_argument("--full", action="store_true",
                    help="the shipped processors after the limiter: span_metrics, tail_sampling, redaction")
    args = ap.parse_args()

    grpc_port = free_port()
    with OTLPBackend() as backend:
        processors = "memory_limiter, span_metrics, tail_sampling, redaction" if args.full else "memory_limiter"
        config = f"""
receivers:
  otlp:
    protocols:
      grpc: {{endpoint: 127.0.0.1:{grpc_port}, max_recv_msg_size_mib: 64}}
processors:
  memory_limiter: {{check_interval: 1s, limit_mib: {args.limit_mib}}}
  span_metrics: {{}}
  tail_sampling:
    decision_wait: 1s
    policies: [{{name: all, type: always_sample}}]
  redaction: {{allow_all_keys: true}}
exporters:
  otlp/backend: {{endpoint: {backend.endpoint}, tls: {{insecure: true}}}}
service:
  pipelines:
    traces: {{receivers: [otlp], processors: [{processors}], exporters: [otlp/backend]}}
"""
        payload = big_request(args.mib)
        with SidecarProcess(config) as sc:
            channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=[("grpc.max_send_message_length", 64 * MIB)])
            export = channel.unary_unary(TRACE_EXPORT, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            rss0 = status_kb(sc.pid, "VmRSS") / 1024
            answers: list[str] = []

            def send() -> None:
                """Like an OTLP client: RESOURCE_EXHAUSTED is retried (1 s apart here), for up to 60 s."""
                refusals = 0
                while True:
                    try:
                        export(payload, timeout=60)
                        answers.append(f"OK after {refusals} refusals" if refusals else "OK")
                        return
                    except grpc.RpcError as e:
                        if e.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED or refusals >= 60:
                            answers.append(e.code().name)
                            return
                        refusals += 1
                        time.sleep(1.0)

            t0 = time.monotonic()
            if args.concurrent:
                threads = [threading.Thread(target=send) for _ in range(args.requests)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            else:
                for _ in range(args.requests):
                    send()
            answered = time.monotonic()
            refused = 0
            while True:
                try:
                    export(small_request(), timeout=10)
                    break
                except grpc.RpcError as e:
                    if e.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() - answered > 120:
                        raise
                    refused += 1
                    time.sleep(0.01)
            recovered = time.monotonic() - answered
            peak = status_kb(sc.pid, "VmHWM") / 1024
            rss1 = status_kb(sc.pid, "VmRSS") / 1024
            channel.close()
    print(f"requests: {args.requests} x {len(payload) / MIB:.1f} MiB ({'concurrent' if args.concurrent else 'one by one'}),"
          f" limit {args.limit_mib} MiB (soft {args.limit_mib * 4 // 5} MiB), processors: {processors}")
    print(f"answers: {', '.join(answers)}  (big requests took {answered - t0:.2f} s)")
    print(f"RSS before: {rss0:.0f} MiB   peak (VmHWM): {peak:.0f} MiB   after: {rss1:.0f} MiB")
    print(f"accepting again {recovered:.2f} s after the last big answer ({refused} small requests refused meanwhile)")


if __name__ == "__main__":
    main()
