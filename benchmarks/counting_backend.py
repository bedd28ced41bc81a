"""An OTLP/gRPC backend that only counts spans and log records (run in its own process)."""

from __future__ import annotations

import multiprocessing as mp
from concurrent import futures


def serve(port: int, spans, logs, ready) -> None:
    import grpc
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    class Traces(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):  # noqa: N802
            n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            with spans.get_lock():
                spans.value += n
            return trace_service_pb2.ExportTraceServiceResponse()

    class Logs(logs_service_pb2_grpc.LogsServiceServicer):
        def Export(self, request, context):  # noqa: N802
            n = sum(len(sl.log_records) for rl in request.resource_logs for sl in rl.scope_logs)
            with logs.get_lock():
                logs.value += n
            return logs_service_pb2.ExportLogsServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                         options=[("grpc.max_receive_message_length", 64 << 20)])
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    ready.set()
    server.wait_for_termination()


class CountingBackend:
    def __init__(self, port: int):
        ctx = mp.get_context("spawn")
        self.port = port
        self.spans = ctx.Value("q", 0)
        self.logs = ctx.Value("q", 0)
        ready = ctx.Event()
        self.proc = ctx.Process(target=serve, args=(port, self.spans, self.logs, ready), daemon=True)
        self.proc.start()
        if not ready.wait(30):
            raise RuntimeError("counting backend did not start")

    def counts(self) -> tuple[int, int]:
        return self.spans.value, self.logs.value

    def stop(self) -> None:
        self.proc.kill()
        self.proc.join(5)
