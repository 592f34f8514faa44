"""Chrome trace-event JSON for Perfetto and chrome://tracing."""

import json

from conftest import request_spans, write

from loupe.traces.perfetto import trace_events
from loupe.traces.reader import read_files


def tracks(document: dict) -> tuple[dict, dict]:
    meta = [e for e in document["traceEvents"] if e["ph"] == "M"]
    processes = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    return processes, threads


def assert_nested(slices: list[dict]) -> None:
    """Slices of one track either nest or follow each other, as the format needs."""
    open_ends = []
    for s in sorted(slices, key=lambda s: (s["ts"], -s["dur"])):
        while open_ends and open_ends[-1] <= s["ts"]:
            open_ends.pop()
        assert not open_ends or s["ts"] + s["dur"] <= open_ends[-1] + 1e-3, s
        open_ends.append(s["ts"] + s["dur"])


def test_a_process_per_loupe_process_a_track_per_thread_span_and_arrows_between(tmp_path):
    records = request_spans(1, "r1", 0, 10, 20, 30) + request_spans(2, "r2", 5, 10, 20, 30)  # they overlap
    document = json.loads(json.dumps(trace_events(read_files([write(tmp_path / "t.jsonl", records)]).traces)))
    processes, threads = tracks(document)
    assert sorted(processes.values()) == ["Detokenizer (host:abcd1234 | pid:400)",
                                          "Scheduler [TP 0] (host:abcd1234 | pid:200)",
                                          "Tokenizer (host:abcd1234 | pid:100)"]
    assert sorted(threads.values()) == sorted(f"{rid}{t}" for rid in ("r1", "r2") for t in
                                              ("", " Tokenizer", " Scheduler [TP 0]", " Detokenizer"))
    slices = [e for e in document["traceEvents"] if e["ph"] == "X"]
    assert len(slices) == len(records) and min(e["ts"] for e in slices) == 0
    for track in threads:
        assert_nested([s for s in slices if (s["pid"], s["tid"]) == track])
    scheduler = next(t for t, name in threads.items() if name == "r1 Scheduler [TP 0]")
    on_it = [s["name"] for s in sorted(slices, key=lambda s: s["ts"]) if (s["pid"], s["tid"]) == scheduler]
    assert on_it == ["Scheduler [TP 0]", "queue", "prefill", "prefill_chunk", "decode", *["decode_step"] * 3]
    decode = next(s for s in slices if s["name"] == "decode" and (s["pid"], s["tid"]) == scheduler)
    assert decode["dur"] == 30_000 and decode["args"]["trace_id"] == f"{1:032x}"
    starts = {e["id"]: e for e in document["traceEvents"] if e["ph"] == "s"}
    ends = {e["id"]: e for e in document["traceEvents"] if e["ph"] == "f"}
    assert len(starts) == len(ends) == 6  # root -> each process's span, per request
    for flow_id, start in starts.items():
        assert threads[(start["pid"], start["tid"])] in ("r1", "r2")
        assert (ends[flow_id]["pid"], ends[flow_id]["tid"]) != (start["pid"], start["tid"])
    assert any(e["ph"] == "i" and e["name"] == "first_token" for e in document["traceEvents"])


def test_a_prefill_decode_pair_gets_an_arrow_from_kv_transfer_to_kv_receive(tmp_path):
    pair = (request_spans(7, "p", 0, 1, 20, 0, steps=0, role="prefill", room=42, parent=0x99)
            + request_spans(7, "d", 1, 25, 0, 40, role="decode", room=42, parent=0x99))
    document = trace_events(read_files([write(tmp_path / "t.jsonl", pair)]).traces)
    _, threads = tracks(document)
    by_flow = {}
    for e in document["traceEvents"]:
        if e["ph"] in ("s", "f"):
            by_flow.setdefault(e["id"], {})[e["ph"]] = threads[(e["pid"], e["tid"])]
    assert {"s": "p Scheduler [TP 0]", "f": "d Scheduler [TP 0]"} in by_flow.values()
