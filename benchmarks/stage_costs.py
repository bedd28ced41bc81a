"""CPU per item of each stage of the recommended pipeline, in one process (no gRPC): where the time goes.

    .venv/bin/python benchmarks/stage_costs.py
"""
import sys, random, time
from pathlib import Path
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks")); sys.path.insert(0, str(ROOT))
from workload import trace_request, logs_request, trace_ids_of
from sidecar.envelope import Envelope
from sidecar.config import parse_config
from sidecar.signals import Signal, count_items
from sidecar.receivers.otlp import _check_traces, _check_logs
from sidecar.telemetry import SelfTelemetry
from sidecar.registry import factory_for, CreateSettings
from sidecar.component import Kind
from sidecar.config import ComponentId
from sidecar.pipeline import SignalRouter
N=60
reqs=[]; 
for i in range(N):
    tr,_=trace_request(random.Random(i),128); lr=logs_request(random.Random(1000+i), trace_ids_of(tr))
    reqs.append((tr.SerializeToString(), lr.SerializeToString()))
spans = N*512; logs = N*256; items = spans+logs
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest as TR
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest as LR
def t(label, f):
    t0=time.process_time(); f(); dt=time.process_time()-t0
    print(f"{label:40s} {dt/items*1e6:6.2f} us/item")
parsed=[(TR.FromString(a), LR.FromString(b)) for a,b in reqs]
t("parse", lambda: [(TR.FromString(a), LR.FromString(b)) for a,b in reqs])
t("serialize", lambda: [(a.SerializeToString(), b.SerializeToString()) for a,b in parsed])
t("check ids", lambda: [(_check_traces(a), _check_logs(b)) for a,b in parsed])
class Null:
    def consume(self, envelope): pass
cfg = parse_config(open(ROOT / "collector-config" / "sidecar.yaml").read(), environ={})
tel=SelfTelemetry()
def make(name, nxt):
    cc=cfg.processors[name]; f=factory_for(Kind.PROCESSOR, cc.id.type)
    return f.create(CreateSettings(cc.id, Kind.PROCESSOR, tel.component("processor", name)), cc.config, nxt)
r=SignalRouter("x"); r.routes={Signal.TRACES: Null(), Signal.LOGS: Null(), Signal.METRICS: Null()}
sm=make("span_metrics", r)
t("span_metrics", lambda: [sm.consume(Envelope(Signal.TRACES, a)) for a,b in parsed])
from sidecar.host import Host
ts=make("tail_sampling", r)
def intake():
    for a,b in parsed:
        ts.consume(Envelope(Signal.TRACES, a)); ts.consume(Envelope(Signal.LOGS, b))
t("tail_sampling intake", intake)
t("tail_sampling decide all", lambda: ts.shutdown(time.monotonic()+30))
