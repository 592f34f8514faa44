"""Small OTLP JSON lines files with known times, written as the exporter writes them."""

from __future__ import annotations

import itertools

import pytest

from loupe.tracing.file_export import otlp_json
from loupe.tracing.otlp import SpanEncoder
from loupe.tracing.recorder import SERVER, SpanRecord

MS = 1_000_000
T0 = 1_700_000_000_000_000_000
ids = itertools.count(1)


def thread(trace_id: int, parent: int, label: str, pid: int, start: int, end: int, **ranks) -> SpanRecord:
    rank_text = "".join(f" [{k[:2].upper()} {v}]" for k, v in ranks.items())
    attrs = {"thread_label": label, "host_id": "abcd1234", "pid": pid, **ranks}
    return SpanRecord(trace_id, next(ids), parent, f"{label}{rank_text} (host:abcd1234 | pid:{pid})", start, end, attrs)


def request_spans(trace_id: int, rid: str, start_ms: float, queue: float, prefill: float, decode: float,
                  route: str = "/v1/completions", steps: int = 3, error: str | None = None, tokenize: float = 1.0,
                  role: str | None = None, room: int | None = None, parent: int | None = None) -> list[SpanRecord]:
    """One request at level 3: every stage's span, and the root's gen_ai.latency.* (ms arguments)."""
    t = int(T0 + start_ms * MS)
    tok_end = t + int(tokenize * MS)
    sched = tok_end + 2 * MS
    q_end = sched + int(queue * MS)
    p_end = q_end + int(prefill * MS)
    d_end = p_end + int(decode * MS)
    end = d_end + 3 * MS
    root_id = next(ids)
    attrs = {"rid": rid, "http.route": route, "gen_ai.latency.e2e": (end - t) / 1e9,
             "gen_ai.latency.time_to_first_token": (p_end + MS - t) / 1e9,
             "gen_ai.latency.time_in_queue": queue / 1000, "gen_ai.latency.time_in_model_prefill": prefill / 1000,
             "gen_ai.latency.time_in_model_decode": decode / 1000, "gen_ai.usage.completion_tokens": steps + 1}
    if role:
        attrs |= {"disaggregation.role": role, "bootstrap_room": room}
    out = [SpanRecord(trace_id, root_id, parent, f"Req {rid}", t, end, attrs, [("first_token", p_end + MS, {})],
                      error, SERVER, remote_parent=parent is not None)]
    tokenizer = thread(trace_id, root_id, "Tokenizer", 100, t, end)
    out += [tokenizer, SpanRecord(trace_id, next(ids), tokenizer.span_id, "tokenize", t, tok_end, {"num_tokens": 7}),
            SpanRecord(trace_id, next(ids), tokenizer.span_id, "dispatch", tok_end, sched)]
    scheduler = thread(trace_id, root_id, "Scheduler", 200 if role != "decode" else 300, sched, d_end, tp_rank=0)
    prefill_id, decode_id = next(ids), next(ids)
    out += [scheduler, SpanRecord(trace_id, next(ids), scheduler.span_id, "queue", sched, q_end),
            SpanRecord(trace_id, prefill_id, scheduler.span_id, "prefill", q_end, p_end, {"num_tokens": 7}),
            SpanRecord(trace_id, next(ids), prefill_id, "prefill_chunk", q_end, p_end, {"num_tokens": 7}),
            SpanRecord(trace_id, decode_id, scheduler.span_id, "decode", p_end, d_end)]
    step = (d_end - p_end) // max(steps, 1)
    out += [SpanRecord(trace_id, next(ids), decode_id, "decode_step", p_end + i * step, p_end + (i + 1) * step,
                       {"step": i + 1, "batch_size": 2}) for i in range(steps)]
    if role == "prefill":
        out.append(SpanRecord(trace_id, next(ids), prefill_id, "kv_transfer", p_end - MS, p_end, {"bootstrap_room": room}))
    if role == "decode":
        out.append(SpanRecord(trace_id, next(ids), scheduler.span_id, "kv_receive", p_end - MS // 2, p_end,
                              {"bootstrap_room": room}))
    detok = thread(trace_id, root_id, "Detokenizer", 400, p_end, d_end + MS)
    out += [detok, SpanRecord(trace_id, next(ids), detok.span_id, "detokenize", p_end, d_end + MS,
                              {"busy_seconds": 0.0005, "num_tokens": steps + 1})]
    return out


def write(path, records: list[SpanRecord], per_line: int = 7) -> str:
    """Records as OTLP JSON lines, `per_line` spans an export, as the exporter writes them."""
    encoder = SpanEncoder({"service.name": "loupe"})
    with open(path, "w") as f:
        for i in range(0, len(records), per_line):
            f.write(otlp_json(encoder.encode((r, 0) for r in records[i:i + per_line])) + "\n")
    return str(path)


@pytest.fixture
def load_run(tmp_path) -> tuple[str, list[dict]]:
    """Five requests on two routes (one failed), and what each was made of (ms)."""
    plan = [dict(rid="a", start_ms=0, queue=10, prefill=20, decode=100),
            dict(rid="b", start_ms=5, queue=40, prefill=20, decode=60, route="/v1/chat/completions"),
            dict(rid="c", start_ms=9, queue=70, prefill=30, decode=50),
            dict(rid="d", start_ms=12, queue=100, prefill=20, decode=300),
            dict(rid="e", start_ms=20, queue=1, prefill=1, decode=1, error="boom")]
    records = [s for i, p in enumerate(plan) for s in request_spans(0xA0 + i, **p)]
    return write(tmp_path / "traces.jsonl", records), plan
