"""Record extraction: one record per request (entry span), model facts merged from its inference spans."""

import json

from sidecar.audit.records import AuditRecord, extract, hash_user_id, kept_traces, records_from_jsonl

from .spans import App


def test_one_record_per_request_with_every_field():
    app = App()
    ctx = app.request("req-1", status=503, generation=True)
    ex = extract(app.take())
    assert len(ex.records) == 1 and ex.fragments == []
    r = ex.records[0]
    assert (r.trace_id, r.span_id) == (f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")
    assert r.request_id == "req-1" and r.service == "classifier" and r.span_name == "POST /predict"
    assert (r.model_id, r.model_version) == ("resnet", "2.4.1")  # the ml.forward span's, not the generation's
    assert r.user_id == "alice" and r.intent == "classify" and r.tags == {"intent": "classify", "tenant": "acme"}
    assert r.status == "ERROR" and r.error_code == "503"
    assert r.latency_ms > 0 and r.time_unix_nano > 0
    assert r.parameters == {"batch_size": 2, "input_shapes": ["2x3"], "output_shapes": ["2x10"], "temperature": 0.7,
                            "top_p": 0.9, "seed": 42, "input_tokens": 12, "output_tokens": 30}
    assert r.input_payload == '{"x": [1, 2]}' and r.output_payload == '{"label": 1}'
    assert r.trace_kept is False


def test_replayable_payload_wins_over_http_body():
    app = App()
    app.request("r", payload_in='{"format": "ml.tensors/v1", "values": []}', payload_out='{"format": "ml.tensors/v1"}')
    r = extract(app.take()).records[0]
    assert r.input_payload.startswith('{"format": "ml.tensors/v1"')
    assert r.output_payload == '{"format": "ml.tensors/v1"}'


def test_user_ids_are_hashed_when_salted():
    app = App()
    app.request("r", user="alice")
    r = extract(app.take(), user_id_salt="s3cret").records[0]
    assert r.user_id == hash_user_id("alice", "s3cret") != hash_user_id("alice", "other")
    assert "alice" not in json.dumps(r.to_json())


def test_inference_spans_without_their_entry_span_become_fragments():
    app = App()
    app.request("r")
    spans = app.take()
    # split: the forward span alone in one export request, the server span in another
    only_forward = type(spans)()
    only_forward.CopyFrom(spans)
    ss = only_forward.resource_spans[0].scope_spans[0]
    keep = [s for s in ss.spans if s.name.startswith("ml.forward")]
    del ss.spans[:]
    ss.spans.extend(keep)
    ex = extract(only_forward)
    assert ex.records == [] and len(ex.fragments) == 1
    assert ex.fragments[0].fields["model_version"] == "2.4.1"


def test_kept_traces_reads_the_policy_tail_sampling_set():
    app = App()
    ctx = app.request("r")
    req = app.take()
    for s in req.resource_spans[0].scope_spans[0].spans[:1]:
        s.attributes.add(key="sampling.policy").value.string_value = "errors"
    assert kept_traces(req) == {f"{ctx.trace_id:032x}": "errors"}


def test_kept_traces_reads_the_encoded_spans_and_names_each_trace_once():
    app = App()
    first, second = app.request("a"), app.request("b")
    req = app.take()
    spans = req.resource_spans[0].scope_spans[0].spans
    later = [s for s in spans if s.trace_id == first.trace_id.to_bytes(16, "big")][-1]
    later.attributes.add(key="sampling.policy").value.string_value = "slow"  # only a later span of the trace
    assert kept_traces(req.SerializeToString()) == {f"{first.trace_id:032x}": "slow",
                                                    f"{second.trace_id:032x}": ""}  # kept, no policy named


def test_jsonl_round_trip_and_bad_lines_named():
    app = App()
    app.request("r")
    r = extract(app.take()).records[0]
    assert records_from_jsonl([json.dumps(r.to_json())]) == [r]
    try:
        records_from_jsonl(["", json.dumps({"trace_id": "x"})])
        raise AssertionError("accepted a record without span_id")
    except ValueError as e:
        assert "line 2" in str(e) and "span_id" in str(e)
    try:
        AuditRecord.from_json({"trace_id": "a", "span_id": "b", "time_unix_nano": 1, "colour": "red"})
        raise AssertionError("accepted an unknown field")
    except ValueError as e:
        assert "colour" in str(e)
