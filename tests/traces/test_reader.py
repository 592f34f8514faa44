"""OTLP JSON lines into spans, and each request's stages from them."""

import gc

from conftest import T0, request_spans, write

from loupe.traces.reader import attributes, read_files
from loupe.traces.requests import all_requests


def test_spans_come_back_with_ids_times_attributes_and_events(tmp_path):
    records = request_spans(0xABC, "r1", start_ms=0, queue=10, prefill=20, decode=30)
    path = write(tmp_path / "t.jsonl", records)
    spans = read_files([path]).traces[f"{0xABC:032x}"]
    assert len(spans) == len(records)
    root = next(s for s in spans if s.is_request)
    assert root.name == "Req r1" and root.parent_id is None and root.start == T0 and root.service == "loupe"
    assert root.attributes["gen_ai.latency.time_in_queue"] == 0.01 and root.attributes["rid"] == "r1"
    assert root.attributes["gen_ai.usage.completion_tokens"] == 4  # intValue: a string in OTLP/JSON
    assert [e.name for e in root.events] == ["first_token"]
    queue = next(s for s in spans if s.name == "queue")
    assert queue.seconds == 0.01 and len(queue.span_id) == 16 and queue.parent_id is not None
    assert next(s for s in spans if s.name == "decode_step").attributes["step"] == 1


def test_a_torn_line_is_skipped_and_counted_and_spans_read_twice_count_once(tmp_path):
    path = write(tmp_path / "t.jsonl", request_spans(1, "r1", 0, 1, 1, 1))
    with open(path, "a") as f:
        f.write('{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "00')  # the exporter was killed mid-line
    read = read_files([path, path])
    assert read.bad_lines == 2 and sum(map(len, read.traces.values())) == len(request_spans(1, "r1", 0, 1, 1, 1))


def test_stage_times_from_the_root_attributes_or_else_from_the_spans(tmp_path):
    with_attributes = request_spans(1, "a", 0, queue=10, prefill=20, decode=30)
    without = request_spans(2, "b", 0, queue=10, prefill=20, decode=30)
    without[0] = without[0]._replace(attributes={"rid": "b"})  # a root that says nothing about latency
    requests = {r.rid: r for r in all_requests(read_files([write(tmp_path / "t.jsonl", with_attributes + without)]).traces)}
    for r in requests.values():
        assert abs(r.stages["queue"] - 0.010) < 1e-9 and abs(r.stages["prefill"] - 0.020) < 1e-9
        assert abs(r.stages["decode"] - 0.030) < 1e-9 and abs(r.stages["tokenize"] - 0.001) < 1e-9
        assert abs(r.e2e - 0.066) < 1e-9 and abs(r.stages["other"] - 0.005) < 1e-9  # dispatch 2 ms + the end 3 ms
        assert r.stages["detokenize"] == 0.0005 and abs(r.ttft - 0.034) < 1e-9
    assert requests["a"].route == "/v1/completions" and requests["b"].route == "?"
    assert requests["a"].dominant == ("decode", 0.03)


def test_a_prefill_decode_pair_is_one_request_in_one_trace_or_a_root_per_server(tmp_path):
    router_span = 0x99
    pair = (request_spans(7, "p", 0, 1, 20, 0, steps=0, role="prefill", room=42, parent=router_span)
            + request_spans(7, "d", 1, 25, 0, 40, role="decode", room=42, parent=router_span))
    read = read_files([write(tmp_path / "t.jsonl", pair)])
    assert len(read.traces) == 1
    (joined,) = all_requests(read.traces)
    assert (joined.rid, joined.route, joined.stages["prefill"], joined.stages["decode"]) == (
        "d", "/v1/completions", 0.02, 0.04)
    requests = all_requests(read.traces, join_pairs=False)
    assert [(r.rid, r.route) for r in requests] == [("p", "/v1/completions (prefill)"), ("d", "/v1/completions (decode)")]
    assert requests[1].stages["decode"] == 0.04


def test_every_kind_of_otlp_value_is_read():
    pairs = [{"key": "s", "value": {"stringValue": "x"}}, {"key": "i", "value": {"intValue": "12345678901"}},
             {"key": "b", "value": {"boolValue": True}}, {"key": "d", "value": {"doubleValue": 0.5}},
             {"key": "a", "value": {"arrayValue": {"values": [{"stringValue": "stop"}, {"intValue": 3}]}}},
             {"key": "kv", "value": {"kvlistValue": {"values": [{"key": "k", "value": {"boolValue": False}}]}}},
             {"key": "none", "value": {}}, {"key": "missing"}]
    assert attributes(pairs) == {"s": "x", "i": 12345678901, "b": True, "d": 0.5, "a": ["stop", 3],
                                 "kv": {"k": False}, "none": None, "missing": None}


def test_reading_leaves_the_garbage_collector_as_it_found_it(tmp_path):
    path = write(tmp_path / "t.jsonl", request_spans(1, "r1", 0, 1, 1, 1))
    assert gc.isenabled()
    read_files([path])
    assert gc.isenabled()
    gc.disable()
    try:
        read_files([path])
        assert not gc.isenabled()
    finally:
        gc.enable()
