"""`loupe traces diff` on two runs of spans with known times: the same twenty requests, each
queued 50 ms longer in the second run, everything else the same."""

from __future__ import annotations

import json

import pytest
from conftest import request_spans, write

from loupe.cli import main
from loupe.traces.diff import Run, compare_runs
from loupe.traces.reader import read_files

UNCHANGED = ("HTTP and tokenization", "own prefill", "decode", "detokenize and stream")


def requests(extra_queue: float) -> list:
    """Twenty requests, every fourth on the chat route, whose prefill, decode and queue vary
    less than 50 ms from one to the next; and one that failed."""
    plan = [dict(rid=f"r{i}", start_ms=10 * i, queue=5 + i % 4 + extra_queue, prefill=10 + 2 * (i % 3),
                 decode=40 + 3 * (i % 5), route="/v1/chat/completions" if i % 4 == 0 else "/v1/completions")
            for i in range(20)]
    plan.append(dict(rid="failed", start_ms=300, queue=1, prefill=1, decode=1, error="boom"))
    return [s for i, p in enumerate(plan) for s in request_spans(0x100 * (1 + int(extra_queue)) + i, **p)]


@pytest.fixture
def runs(tmp_path) -> tuple[str, str]:
    return write(tmp_path / "before.jsonl", requests(0)), write(tmp_path / "after.jsonl", requests(50))


def flagged(group: dict) -> set[tuple]:
    return {(r["metric"], r["cause"], r["quantile"]) for r in group["rows"] if r["flagged"]}


def test_a_longer_queue_is_flagged_and_the_causes_it_left_alone_are_not(runs):
    before, after = (Run.read(read_files([path]).traces) for path in runs)
    result = compare_runs(before, after)
    overall = result["overall"]
    assert overall["before"] == overall["after"] == {"requests": 21, "errors": 1}
    assert flagged(overall) == {(metric, cause, q) for metric, cause in (("ttft", None), ("e2e", None),
                                ("ttft", "queued"), ("e2e", "queued")) for q in ("p50", "p90")}
    assert all(r["interval"] is None for r in overall["rows"] if r["quantile"] == "p99")  # 20 requests: too few
    queued = [r for r in overall["rows"] if r["cause"] == "queued"]
    assert all(r["change"] == pytest.approx(0.050) for r in queued)
    assert all(r["interval"][0] > 0.040 for r in queued if r["quantile"] != "p99")
    unchanged = [r for r in overall["rows"] if r["cause"] in UNCHANGED or r["metric"] == "inter_token"]
    assert {r["cause"] for r in unchanged} == {*UNCHANGED, None}  # all there, none flagged
    assert not any(r["flagged"] for r in unchanged) and all(r["change"] == 0 for r in unchanged)
    assert "interference" not in {r["cause"] for r in overall["rows"]}  # neither run has it
    chat = result["routes"]["/v1/chat/completions"]
    assert chat["after"] == {"requests": 5, "errors": 0} and ("e2e", "queued", "p50") in flagged(chat)
    assert result["routes"]["/v1/completions"]["after"] == {"requests": 16, "errors": 1}


def test_too_few_requests_get_no_interval_and_no_flag(tmp_path):
    paths = [write(tmp_path / f"{n}.jsonl", request_spans(0xF0 + n, "r", 0, queue=5 + 50 * n, prefill=10, decode=40))
             for n in (0, 1)]
    before, after = (Run.read(read_files([path]).traces) for path in paths)
    rows = compare_runs(before, after)["overall"]["rows"]
    assert rows and all(r["interval"] is None and not r["flagged"] for r in rows)


def test_the_command_prints_json_and_tables_the_same_every_time(runs, capsys):
    before, after = runs
    main(["traces", "diff", before, "--", after, "--json"])
    out = capsys.readouterr().out
    result = json.loads(out)
    assert result["before"] == [before] and result["after"] == [after] and result["resamples"] == 1000
    assert ("e2e", "queued", "p90") in flagged(result["overall"])
    main(["traces", "diff", "--json", before, "--", after])
    assert capsys.readouterr().out == out  # a fixed seed
    main(["traces", "diff", before, "--", after])
    text = capsys.readouterr().out.split("All requests:")[1]  # after each route's table
    (queued,) = [line for line in text.splitlines() if "queued (e2e)" in line and "p50" in line]
    assert "+50.0" in queued and "longer" in queued
    assert "nothing flagged in HTTP and tokenization, own prefill, decode, detokenize" in " ".join(text.split())


def test_mistakes_get_one_line(runs):
    before, after = runs
    with pytest.raises(SystemExit, match="loupe traces diff: no -- between the runs"):
        main(["traces", "diff", before, after])
    with pytest.raises(SystemExit, match="no files after --"):
        main(["traces", "diff", before, "--"])
    with pytest.raises(SystemExit, match="no files before --"):
        main(["traces", "diff", "--json", "--", after])
    with pytest.raises(SystemExit, match="no such file: nope.jsonl"):
        main(["traces", "diff", before, "--", "nope.jsonl"])
