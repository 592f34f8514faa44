"""What makes `loupe traces` fast on large files changes none of its answers."""

from __future__ import annotations

import gc
import io
import os
import subprocess
import sys

from conftest import request_spans, write
from rich.console import Console
from test_why import request

from loupe.cli import main
from loupe.traces import commands
from loupe.traces.reader import read_files
from loupe.traces.why import Passes, explain, explain_succeeded

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def test_progress_bars_show_on_a_terminal_and_nothing_else_changes(tmp_path, monkeypatch):
    terminal = Console(file=io.StringIO(), force_terminal=True, width=100)
    each = commands.walker(terminal)
    few = list(range(commands.PROGRESS_FROM_ITEMS - 1))
    assert each(few, "explaining requests") is few and not terminal.file.getvalue()  # too few for a bar
    many = list(range(commands.PROGRESS_FROM_ITEMS))
    assert list(each(many, "explaining requests")) == many and "explaining requests" in terminal.file.getvalue()
    piped = Console(file=io.StringIO())
    assert commands.walker(piped)(many, "explaining requests") is many and not piped.file.getvalue()


def test_to_a_pipe_a_large_file_prints_what_a_small_one_would(load_run, monkeypatch, capsys):
    path, _ = load_run
    outputs = []
    for least in (commands.PROGRESS_FROM_ITEMS, 0):  # every file and every walk large enough for a bar
        monkeypatch.setattr(commands, "PROGRESS_FROM_ITEMS", least)
        monkeypatch.setattr(commands, "PROGRESS_FROM_BYTES", least)
        main(["traces", "summary", path])
        main(["traces", "why", "--slowest", "2", path])
        outputs.append(capsys.readouterr())
    assert outputs[0] == outputs[1] and "explaining" not in outputs[1].out + outputs[1].err
    assert gc.isenabled()  # off while a command runs, back after it


def test_the_benchmarks_copies_of_a_file_stay_apart_and_explain_as_the_original(tmp_path):
    """benchmarks/bench_traces_file.py --grow: fresh ids, times and batch ids in each copy, so no
    two copies share a trace, a request or a forward pass."""
    seed = write(tmp_path / "seed.jsonl", request(1, "short", 0, 2, 5, 16, 280, list(range(1, 12)), 8)
                 + request(2, "long", 25, 27, 36, 216, 300, list(range(4, 12)), 1124, cached=64))
    grown = str(tmp_path / "grown.jsonl")
    size_gb = 2.5 * os.path.getsize(seed) / 2**30  # three copies: each is a little longer than the seed
    subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_traces_file.py"), "--grow", seed,
                    "--size-gb", str(size_gb), "--output", grown], check=True, cwd=REPO, capture_output=True)
    original, copies = read_files([seed]).traces, read_files([grown]).traces
    assert len(copies) == 3 * len(original)
    assert len(Passes(copies).batches) == 3 * len(Passes(original).batches)
    rids = [s.attributes["rid"] for spans in copies.values() for s in spans if s.is_request]
    assert len(set(rids)) == len(rids) == 6

    def causes(traces: dict) -> list:
        return sorted((e.e2e, e.ttft, [(c.name, c.e2e, c.ttft, len(c.evidence)) for c in e.causes])
                      for e in explain_succeeded(traces))

    assert causes(copies) == sorted(causes(original) * 3)
