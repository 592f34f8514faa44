"""A prefill/decode pair's two roots read as one request, on spans with known times laid out as
the servers write them: the router's span over both roots; on the prefill server its chunks,
then `bootstrap` (waiting for the decode server's claim) and `kv_transfer` under `prefill`; on
the decode server `queue`, then `bootstrap` (claimed, ending with `kv_receive`), then `decode`."""

from __future__ import annotations

import json

import pytest
from conftest import MS, T0, thread, write

from loupe.cli import main
from loupe.traces.reader import read_files
from loupe.traces.requests import all_requests
from loupe.traces.why import explain_all, explain_succeeded, pick
from loupe.tracing.recorder import SERVER, SpanRecord

ROOM = 4242
ROUTER_SPAN = 900_000_000  # ids set here stay clear of those conftest's thread() counts from 1
KV_BYTES = 4_000_000


def at(ms: float) -> int:
    return T0 + round(ms * MS)


def span(trace_id: int, span_id: int, parent: int, name: str, start: float, end: float, **attrs) -> SpanRecord:
    return SpanRecord(trace_id, span_id, parent, name, at(start), at(end), attrs)


def root(trace_id: int, span_id: int, role: str, start: float, end: float, first_token: float) -> SpanRecord:
    return SpanRecord(trace_id, span_id, ROUTER_SPAN, f"Req {role}-rid", at(start), at(end),
                      {"rid": f"{role}-rid", "http.route": "/v1/completions", "disaggregation.role": role,
                       "bootstrap_room": ROOM}, [("first_token", at(first_token), {})], None, SERVER,
                      remote_parent=True)


def pair(claimed: float, trace_id: int = 7) -> list[SpanRecord]:
    """The router's span [0, 1000] ms; the prefill server's root from 2 ms: dispatched at 4,
    queued 10 ms, two chunks of 200 ms, its first token made at 414; the decode server's root
    from 1 ms, in its queue until `claimed`; the KV leaves once both are there (the claim takes
    2 ms to reach the prefill server) and the decode server has it 40 ms later; then 40 decode
    steps of 10 ms, and the answer done 46 ms after the last."""
    late = max(0.0, claimed + 2 - 414)
    sent, arrived = 414 + late, 454 + late
    p, d = 10_000_000, 20_000_000
    out = [SpanRecord(trace_id, ROUTER_SPAN, None, "http_request", at(0), at(1000), {})]
    tokenizer = thread(trace_id, p, "Tokenizer", 100, at(2), at(500 + late))
    scheduler = thread(trace_id, p, "Scheduler", 200, at(4), at(498 + late), tp_rank=0)
    out += [root(trace_id, p, "prefill", 2, 500 + late, 499 + late), tokenizer,
            span(trace_id, p + 1, tokenizer.span_id, "tokenize", 2, 3),
            span(trace_id, p + 2, tokenizer.span_id, "dispatch", 3, 4), scheduler,
            span(trace_id, p + 3, scheduler.span_id, "queue", 4, 14, running=1, waiting=0),
            span(trace_id, p + 4, scheduler.span_id, "prefill", 14, 497 + late, num_tokens=300, cached_tokens=0),
            span(trace_id, p + 5, p + 4, "prefill_chunk", 14, 214, num_tokens=150, batch_id=1, batch_size=1),
            span(trace_id, p + 6, p + 4, "prefill_chunk", 214, 414, num_tokens=150, batch_id=2, batch_size=1),
            span(trace_id, p + 7, p + 4, "bootstrap", 414, sent, bootstrap_room=ROOM),
            span(trace_id, p + 8, p + 4, "kv_transfer", sent, sent + 56, bytes=KV_BYTES, pages=3, backend="tcp")]
    steps = [(arrived + 10 * i, arrived + 10 * (i + 1)) for i in range(40)]
    end = steps[-1][1] + 46
    tokenizer = thread(trace_id, d, "Tokenizer", 300, at(1), at(end))
    scheduler = thread(trace_id, d, "Scheduler", 400, at(3), at(steps[-1][1]), tp_rank=0)
    out += [root(trace_id, d, "decode", 1, end, arrived + 11), tokenizer,
            span(trace_id, d + 1, tokenizer.span_id, "tokenize", 1, 2),
            span(trace_id, d + 2, tokenizer.span_id, "dispatch", 2, 3), scheduler,
            span(trace_id, d + 3, scheduler.span_id, "queue", 3, claimed, running=8, waiting=2),
            span(trace_id, d + 4, scheduler.span_id, "bootstrap", claimed, arrived, bootstrap_room=ROOM),
            span(trace_id, d + 5, d + 4, "kv_receive", arrived - 6, arrived, bytes=KV_BYTES, pages=3, backend="tcp"),
            span(trace_id, d + 6, scheduler.span_id, "decode", arrived, steps[-1][1], completion_tokens=41)]
    out += [span(trace_id, d + 10 + i, d + 6, "decode_step", a, b, step=i + 1, batch_id=10 + i, batch_size=1)
            for i, (a, b) in enumerate(steps)]
    return out


def explained(tmp_path, claimed: float):
    traces = read_files([write(tmp_path / "pair.jsonl", pair(claimed))]).traces
    explanations = explain_all(traces, pick(traces, None, 2, None))  # both roots: one request
    assert len(explanations) == 1
    why = explanations[0]
    assert sum(c.e2e for c in why.causes) == pytest.approx(why.e2e)
    assert sum(c.ttft for c in why.causes) == pytest.approx(why.ttft)
    return why, {c.name: (round(c.e2e * 1000, 3), round(c.ttft * 1000, 3)) for c in why.causes}


def test_a_pair_is_one_request_its_ttft_cut_into_each_hop(tmp_path):
    """The decode server claimed at once: its wait for the KV is the prefill server's work."""
    why, causes = explained(tmp_path, claimed=5)
    assert (why.rid, why.route, why.e2e, why.ttft) == ("decode-rid", "/v1/completions", pytest.approx(0.9),
                                                       pytest.approx(0.465))
    assert causes == {"router": (2, 2), "HTTP and tokenization": (2, 2), "queued": (10, 10), "own prefill": (400, 400),
                      "KV transfer": (40, 40), "decode": (400, 11), "detokenize and stream": (46, 0),
                      "unexplained": (0, 0)}
    hops = {hop: round(seconds * 1000, 3) for hop, seconds, _ in why.hops}
    assert hops == {"router": 2, "prefill queue": 10, "prefill": 400, "bootstrap": 0, "KV transfer": 40,
                    "decode queue": 2, "first token": 11}
    notes = {hop: note for hop, _, note in why.hops}
    assert notes["KV transfer"] == "4.0 MB, 0.1 GB/s, tcp" and notes["decode queue"] == "while the prefill ran"
    assert [s.rid for s in why.servers] == ["prefill-rid", "decode-rid"]  # each server's own view stays
    evidence = "\n".join(e for c in why.causes for e in c.evidence)
    assert "prefill: 300 prompt tokens computed" in evidence and "decode: 40 steps" in evidence


def test_a_decode_server_that_claims_late_puts_its_queue_on_the_path(tmp_path):
    """The decode server had no room until 430 ms: the prefill server held the first token 18 ms."""
    why, causes = explained(tmp_path, claimed=430)
    assert causes["decode queue"] == (16, 16) and causes["bootstrap wait"] == (2, 2)
    assert "decode: queue 427.0 ms, 8 running and 2 waiting ahead of it when it arrived" in why.cause(
        "decode queue").evidence
    hops = {hop: (round(seconds * 1000, 3), note) for hop, seconds, note in why.hops}
    assert hops["bootstrap"] == (18, "the decode server's claim") and hops["decode queue"] == (427, "")
    assert why.ttft == pytest.approx(0.483)


def test_summary_counts_a_pair_once_and_per_server_on_request(tmp_path, capsys):
    path = write(tmp_path / "pair.jsonl", pair(5))
    (joined,) = all_requests(read_files([path]).traces)
    assert (joined.route, joined.e2e, joined.ttft) == ("/v1/completions", pytest.approx(0.9), pytest.approx(0.465))
    assert joined.stages["bootstrap"] == 0 and joined.stages["kv transfer"] == pytest.approx(0.04)
    main(["traces", "summary", "--json", path])
    summary = json.loads(capsys.readouterr().out)
    assert list(summary["routes"]) == ["/v1/completions"] and summary["overall"]["requests"] == 1
    main(["traces", "summary", "--json", "--per-server", path])
    assert list(json.loads(capsys.readouterr().out)["routes"]) == ["/v1/completions (decode)",
                                                                  "/v1/completions (prefill)"]


def test_why_and_show_print_the_pairs_hops(tmp_path, capsys):
    path = write(tmp_path / "pair.jsonl", pair(5))
    main(["traces", "why", "decode-rid", path])
    out = capsys.readouterr().out
    assert "a prefill/decode pair: prefill-rid on the prefill server, decode-rid on the decode server" in out
    assert "router 2.0 ms (to the prefill server) → prefill queue 10.0 ms → prefill 400.0 ms" in out
    main(["traces", "show", "decode-rid", path])
    assert f"prefill/decode pair, room {ROOM}: to the first token: router 2.0 ms" in capsys.readouterr().out
    main(["traces", "why", "--json", "prefill-rid", path])
    (why,) = json.loads(capsys.readouterr().out)
    assert [s["rid"] for s in why["servers"]] == ["prefill-rid", "decode-rid"] and len(why["hops"]) == 7


def test_a_pair_whose_decode_failed_is_left_out_of_the_runs_view(tmp_path):
    records = [r._replace(error="the client went away") if r.name == "Req decode-rid" else r for r in pair(5)]
    traces = read_files([write(tmp_path / "pair.jsonl", records)]).traces
    assert explain_succeeded(traces) == []
