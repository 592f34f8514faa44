"""What makes `loupe traces` fast on large files changes none of its answers."""

from __future__ import annotations

import io

from conftest import request_spans, write
from rich.console import Console
from test_why import request

from loupe.cli import main
from loupe.traces import commands
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
