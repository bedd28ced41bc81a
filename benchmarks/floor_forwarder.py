"""The floor: the least a Python OTLP/gRPC forwarder can do — decode, re-encode, forward, per request.

Used by benchmarks/throughput.py as the baseline the sidecar's CPU per item is compared with.
"""

from __future__ import annotations

import argparse
import signal
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, channel):
        self.stub = trace_service_pb2_grpc.TraceServiceStub(channel)

    def Export(self, request, context):  # noqa: N802
        self.stub.Export(request, timeout=10)
        return trace_service_pb2.ExportTraceServiceResponse()


class Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, channel):
        self.stub = logs_service_pb2_grpc.LogsServiceStub(channel)

    def Export(self, request, context):  # noqa: N802
        self.stub.Export(request, timeout=10)
        return logs_service_pb2.ExportLogsServiceResponse()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True)
    p.add_argument("--forward", required=True)
    args = p.parse_args()
    channel = grpc.insecure_channel(args.forward, options=[("grpc.max_send_message_length", 64 << 20)])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                         options=[("grpc.max_receive_message_length", 64 << 20)])
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(channel), server)
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(channel), server)
    server.add_insecure_port(args.listen)
    server.start()
    print("sidecar ready", flush=True)  # same readiness line as the sidecar, so one runner starts both
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(1)


if __name__ == "__main__":
    main()
