"""`loupe traces why` on spans with known times: a short stream whose decode steps shared three
forward passes with a long prompt's prefill chunks, and that long prompt, which arrived while
a pass was in flight."""

from __future__ import annotations

import json

import pytest
from conftest import MS, T0, thread, write

from loupe.cli import main
from loupe.traces.reader import read_files
from loupe.traces.why import explain_all, pick
from loupe.tracing.recorder import SERVER, SpanRecord

SCHEDULER_PID = 200
# batch id: (start ms, end ms, mode, size); 4–6 carry the long prompt's chunks
BATCHES = {1: (6, 16, "prefill", 1), 2: (16, 26, "decode", 1), 3: (26, 36, "decode", 1),
           4: (36, 96, "mixed", 2), 5: (96, 156, "mixed", 2), 6: (156, 216, "mixed", 2),
           **{b: (216 + 12 * (b - 7), 228 + 12 * (b - 7), "decode", 2) for b in range(7, 12)}}
LONG_CHUNKS = {4: 512, 5: 512, 6: 100}


def at(ms: float) -> int:
    return int(T0 + ms * MS)


def request(trace_id: int, rid: str, start: float, dispatched: float, scheduled: float, prefill_end: float,
            end: float, batches: list[int], prompt_tokens: int, cached: int = 0, level: int = 3) -> list[SpanRecord]:
    """A request's spans: root, tokenizer, scheduler (queue, prefill, decode and, at level 3,
    its steps in `batches`, chunks where the batch is `prefill` or it is the long prompt)."""
    root_id = trace_id * 100
    last = BATCHES[batches[-1]][1]
    out = [SpanRecord(trace_id, root_id, None, f"Req {rid}", at(start), at(end),
                      {"rid": rid, "http.route": "/v1/completions", "gen_ai.usage.prompt_tokens": prompt_tokens},
                      [("first_token", at(prefill_end + 1), {})], None, SERVER)]
    tokenizer = thread(trace_id, root_id, "Tokenizer", 100, at(start), at(end))
    out += [tokenizer, SpanRecord(trace_id, root_id + 1, tokenizer.span_id, "tokenize", at(start), at(start + 1)),
            SpanRecord(trace_id, root_id + 2, tokenizer.span_id, "dispatch", at(start + 1), at(dispatched))]
    events = [("schedule", at(BATCHES[b][0]), {"batch_id": b, "mode": BATCHES[b][2], "batch_size": BATCHES[b][3]})
              for b in batches] if level == 3 else []
    scheduler = SpanRecord(trace_id, root_id + 3, root_id, f"Scheduler [TP 0] (host:abcd1234 | pid:{SCHEDULER_PID})",
                           at(scheduled), at(last), {"thread_label": "Scheduler", "pid": SCHEDULER_PID, "tp_rank": 0},
                           events)
    queue_end = BATCHES[batches[0]][0]
    decoded = [BATCHES[b] for b in batches if BATCHES[b][2] != "prefill" and not (rid == "long" and b in LONG_CHUNKS)]
    mixed = [(start, end) for start, end, mode, _ in decoded if mode == "mixed"]
    counts = {"steps": len(decoded), "step_seconds": sum(end - start for start, end, _, _ in decoded) / 1000,
              "mixed_steps": len(mixed), "mixed_seconds": sum(end - start for start, end in mixed) / 1000,
              "mixed_prefill_tokens": sum(LONG_CHUNKS[b] for b in batches if BATCHES[b][2] == "mixed")}
    out += [scheduler, SpanRecord(trace_id, root_id + 4, scheduler.span_id, "queue", at(scheduled), at(queue_end),
                                  {"running": 1, "waiting": 0}),
            SpanRecord(trace_id, root_id + 5, scheduler.span_id, "prefill", at(queue_end), at(prefill_end),
                       {"num_tokens": prompt_tokens, "cached_tokens": cached}),
            SpanRecord(trace_id, root_id + 6, scheduler.span_id, "decode", at(prefill_end), at(last), counts)]
    if level == 3:
        for i, b in enumerate(batches):
            start_ms, end_ms, mode, size = BATCHES[b]
            chunk = mode == "prefill" or (rid == "long" and b in LONG_CHUNKS)
            name, parent = ("prefill_chunk", root_id + 5) if chunk else ("decode_step", root_id + 6)
            attrs = {"batch_id": b, "batch_size": size,
                     **({"num_tokens": LONG_CHUNKS.get(b, prompt_tokens)} if chunk else {"step": i})}
            out.append(SpanRecord(trace_id, root_id + 10 + i, parent, name, at(start_ms), at(end_ms), attrs))
    return out


@pytest.fixture
def run(tmp_path) -> str:
    short = request(1, "short", 0, 2, 5, 16, 280, list(range(1, 12)), 8)
    long = request(2, "long", 25, 27, 36, 216, 300, list(range(4, 12)), 1124, cached=64)
    return write(tmp_path / "why.jsonl", short + long)


def causes(explanation) -> dict:
    return {c.name: c for c in explanation.causes}


def test_the_causes_add_up_and_interference_names_the_long_prefill(run):
    traces = read_files([run]).traces
    short, long = explain_all(traces, pick(traces, None, 2, None))  # slowest first: 280 ms, then 275 ms
    assert (short.rid, long.rid) == ("short", "long")
    for why in (short, long):
        assert sum(c.e2e for c in why.causes) == pytest.approx(why.e2e)
        assert sum(c.ttft for c in why.causes) == pytest.approx(why.ttft)
        assert causes(why)["unexplained"].e2e == pytest.approx(0, abs=1e-6)  # shown, even when nothing is left
    c = causes(short)
    # three 60 ms passes against its usual 10 ms one decoding alone (the pass's other request prefilled)
    assert c["interference"].e2e == pytest.approx(3 * 0.050)
    assert c["interference"].evidence == ["shared 3 steps with the 1,124-token prefill of long: +150.0 ms"]
    assert c["decode"].e2e == pytest.approx(0.010 * 5 + 0.012 * 5)
    assert c["own prefill"].e2e == pytest.approx(0.010) and c["own prefill"].ttft == pytest.approx(0.010)
    assert c["interference"].ttft == 0  # all after its first token
    assert c["queued"].e2e == pytest.approx(0.004) and "1 running and 0 waiting" in c["queued"].evidence[-1]
    c = causes(long)
    assert c["own prefill"].e2e == pytest.approx(0.180)
    assert c["own prefill"].evidence == ["1060 prompt tokens computed, 64 reused from the prefix cache, 3 chunks"]
    assert c["queued"].e2e == pytest.approx(0.009)
    assert "for the forward pass in flight when it arrived (batch 3: decode, 1 request)" in c["queued"].evidence[0]
    assert "interference" not in c  # its decode steps shared passes with no prefill
    assert [x.name for x in long.causes][0] == "own prefill"  # ranked by time


def test_level_2_tells_interference_from_the_decode_stages_counts_and_says_what_it_cannot_tell(tmp_path):
    """Its 10 decode passes took 260 ms, the 3 shared with the long prompt's chunks 180 ms: its
    usual pass is (260 - 180) / 7 ms, the interference 180 - 3 × that (level 3 said 3 × 50 ms,
    against the scheduler's usual 10 ms pass of one decoding alone)."""
    path = write(tmp_path / "l2.jsonl", request(1, "short", 0, 2, 5, 16, 280, list(range(1, 12)), 8, level=2))
    traces = read_files([path]).traces
    (why,) = explain_all(traces, pick(traces, None, 1, None))
    assert why.level == 2 and any("level 2" in note for note in why.notes)
    interference, decode = causes(why)["interference"], causes(why)["decode"]
    usual = (0.260 - 0.180) / 7
    assert interference.e2e == pytest.approx(0.180 - 3 * usual)
    assert interference.evidence == [f"3 of its steps shared their pass with 1,124 prompt tokens of other requests: "
                                     f"+{(0.180 - 3 * usual) * 1000:.1f} ms"]
    assert decode.e2e == pytest.approx(0.260 - interference.e2e) and "long contexts" not in causes(why)
    assert sum(c.e2e for c in why.causes) == pytest.approx(why.e2e)


def test_the_command_explains_a_trace_or_the_slowest(run, capsys):
    main(["traces", "why", "--slowest", "2", run, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert [e["rid"] for e in out] == ["short", "long"]
    main(["traces", "why", "short", run])
    text = capsys.readouterr().out
    assert "interference" in text and "1,124-token prefill of long" in text
    with pytest.raises(SystemExit, match="no requests on route"):
        main(["traces", "why", "--route", "/nope", run])


def test_steps_that_attended_long_contexts_are_told_apart(tmp_path):
    """The same stream without the long prompt in the file, its three slow steps having
    attended 5,000 KV tokens against the usual 1,000."""
    kv = {2: 500, 3: 500, 4: 5000, 5: 5000, 6: 5000}
    records = [r._replace(attributes={**r.attributes, "kv_tokens": kv.get(r.attributes["batch_id"], 1000)})
               if r.name == "decode_step" else r for r in request(1, "short", 0, 2, 5, 16, 280, list(range(1, 12)), 8)]
    traces = read_files([write(tmp_path / "long.jsonl", records)]).traces
    (why,) = explain_all(traces, pick(traces, None, 1, None))
    c = causes(why)
    assert "interference" not in c and c["long contexts"].e2e == pytest.approx(3 * 0.048)
    assert c["long contexts"].evidence == ["3 steps attended 5,000 KV tokens on average, against a usual 1,000: "
                                           "+144.0 ms"]


def test_show_names_what_ran_with_each_step_and_a_folded_runs_slowest(run, capsys):
    main(["traces", "show", "short", run])
    steps = [line for line in capsys.readouterr().out.splitlines() if "decode_step" in line]
    assert len(steps) == 10
    assert sum("mixed with long prefill" in line for line in steps) == 3  # batches 4–6
    assert "decode" in steps[0] and "with" not in steps[0]
    main(["traces", "show", "--fold", "short", run])
    (folded,) = [line for line in capsys.readouterr().out.splitlines() if "decode_step ×10" in line]
    assert "slowest 60.00 ms step=3 batch_id=4" in folded  # the first of three equals


def test_the_summary_gives_inter_token_latency_its_worst_stalls_and_the_causes_shares(run, capsys):
    main(["traces", "summary", "--json", run])
    out = json.loads(capsys.readouterr().out)
    short = next(s for s in out["stalls"] if s["rid"] == "short")
    assert short["seconds"] == pytest.approx(0.060) and short["made_by"] == "step 3, interference: the prefill of long"
    assert out["inter_token"]["p50"] == pytest.approx(0.012)  # short's 10 gaps and long's 5, most of 12 ms
    e2e = out["causes"]["e2e"]
    assert e2e["all"]["interference"] == pytest.approx(0.150 / (0.280 + 0.275))
    assert e2e["slowest 1%"]["interference"] == pytest.approx(0.150 / 0.280)  # short alone, the slowest
    assert sum(e2e["all"].values()) == pytest.approx(1.0)


def test_a_scheduler_that_read_the_request_before_dispatch_returned_counts_no_time_twice(tmp_path):
    records = request(1, "short", 0, 5.5, 5, 16, 280, list(range(1, 12)), 8)  # dispatch ends 0.5 ms late
    traces = read_files([write(tmp_path / "early.jsonl", records)]).traces
    (why,) = explain_all(traces, pick(traces, None, 1, None))
    assert sum(c.e2e for c in why.causes) == pytest.approx(why.e2e)
    assert causes(why)["HTTP and tokenization"].e2e == pytest.approx(0.005)


def test_the_timeline_plot_draws_each_request_where_its_causes_happened(run, tmp_path):
    from loupe.traces.plot import timeline

    traces = read_files([run]).traces
    explanations = explain_all(traces, pick(traces, None, 2, None))
    for why in explanations:  # what is drawn is what is counted
        assert sum(end - start for start, end, _ in why.intervals) / 1e9 == pytest.approx(why.e2e)
    short = next(e for e in explanations if e.rid == "short")
    assert [(s, e) for s, e, cause in short.intervals if cause == "interference"] == [
        (at(36 + 10 + 60 * i), at(96 + 60 * i)) for i in range(3)]  # the last 50 ms of each shared pass
    out = tmp_path / "timeline.png"
    assert timeline(explanations, str(out)) == 2
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    main(["traces", "plot", "--timeline", run, "-o", str(tmp_path / "cli.png")])
    assert (tmp_path / "cli.png").stat().st_size > 10_000
