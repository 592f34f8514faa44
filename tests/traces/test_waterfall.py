"""One trace as a terminal waterfall."""

import pytest
from conftest import request_spans, write
from rich.console import Console

from loupe.traces.reader import read_files
from loupe.traces.waterfall import find_trace, waterfall


def render(table) -> list[str]:
    console = Console(width=200, record=True, file=open("/dev/null", "w"))
    console.print(table)
    return console.export_text().splitlines()


def test_every_span_nested_in_time_order_with_durations_and_attributes(tmp_path):
    read = read_files([write(tmp_path / "t.jsonl", request_spans(5, "r5", 0, queue=10, prefill=20, decode=30))])
    lines = render(waterfall(read.traces[f"{5:032x}"], width=30))
    assert lines[0].startswith(f"trace {5:032x}: 14 spans, 66.0 ms")
    body = lines[2:]
    order = ["Req r5 /v1/completions", "Tokenizer pid 100", "tokenize", "dispatch", "Scheduler [TP 0] pid 200", "queue", "prefill",
             "prefill_chunk", "decode", "decode_step", "decode_step", "decode_step", "Detokenizer pid 400", "detokenize"]
    assert [line.lstrip("│├└─ ").split("  ")[0] for line in body] == order
    queue = next(line for line in body if "queue" in line)
    assert "└" not in queue.split("queue")[0] and "├─ queue" in queue and " 10.00 " in queue  # its ms
    assert "step=3 batch_size=2" in body[11] and "num_tokens=7" in body[2]
    folded = render(waterfall(read.traces[f"{5:032x}"], folded=True))
    assert sum("decode_step ×3" in line for line in folded) == 1 and len(folded) == len(lines) - 2


def test_a_trace_is_found_by_id_prefix_or_request_id(tmp_path):
    first, second = 0xAB1 << 116, 0xAB2 << 116
    records = request_spans(first, "cmpl-1", 0, 1, 1, 1) + request_spans(second, "cmpl-2", 0, 1, 1, 1)
    traces = read_files([write(tmp_path / "t.jsonl", records)]).traces
    assert find_trace(traces, f"{first:032x}") == f"{first:032x}"
    assert find_trace(traces, "AB2") == f"{second:032x}"
    assert find_trace(traces, "cmpl-2") == find_trace(traces, "Req cmpl-2") == f"{second:032x}"
    with pytest.raises(LookupError, match="2 traces match"):
        find_trace(traces, "ab")
    with pytest.raises(LookupError, match="no traces match"):
        find_trace(traces, "ffff")
