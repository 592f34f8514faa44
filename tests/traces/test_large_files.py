"""What makes `loupe traces` fast on large files changes none of its answers."""

from __future__ import annotations

from conftest import request_spans, write
from test_why import request

from loupe.traces.reader import read_files
from loupe.traces.why import Passes, explain


def test_explaining_with_the_passes_index_of_each_trace_gives_what_building_it_again_gave(tmp_path):
    records = (request(1, "short", 0, 2, 5, 16, 280, list(range(1, 12)), 8)
               + request(2, "long", 25, 27, 36, 216, 300, list(range(4, 12)), 1124, cached=64)
               + request_spans(3, "c", start_ms=0, queue=10, prefill=20, decode=100))
    traces = read_files([write(tmp_path / "t.jsonl", records)]).traces
    roots = [s for spans in traces.values() for s in spans if s.is_request]
    passes = Passes(traces)
    reused = [explain(root, traces[root.trace_id], passes) for root in roots]
    assert len(reused) == 3 and any(c.name == "interference" for c in reused[0].causes)
    passes.children.clear()  # each explain builds its own, as before
    assert [explain(root, traces[root.trace_id], passes) for root in roots] == reused
