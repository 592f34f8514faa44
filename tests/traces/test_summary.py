"""Percentiles, shares and the slowest requests, per route and overall."""

import pytest

from loupe.traces.reader import read_files
from loupe.traces.requests import all_requests
from loupe.traces.summary import percentile, summarize, tables


def test_percentiles_interpolate_between_ranks():
    assert percentile([1.0], 0.99) == 1.0
    assert percentile([10.0, 40.0, 70.0, 100.0], 0.5) == 55.0
    assert percentile([10.0, 40.0, 70.0, 100.0], 0.9) == pytest.approx(91.0)


def test_summary_of_a_load_run(load_run):
    path, plan = load_run
    result = summarize(all_requests(read_files([path]).traces), slowest_n=2)
    overall = result["overall"]
    assert (overall["requests"], overall["errors"]) == (5, 1)
    queue = overall["seconds"]["queue"]  # of the four that succeeded: 10, 40, 70, 100 ms
    assert queue["count"] == 4 and queue["p50"] == pytest.approx(0.055) and queue["p99"] == pytest.approx(0.0991)
    e2e = [1 + 2 + p["queue"] + p["prefill"] + p["decode"] + 3 for p in plan if "error" not in p]
    assert overall["seconds"]["e2e"]["mean"] == pytest.approx(sum(e2e) / 4 / 1000)
    assert overall["share_of_e2e"]["queue"] == pytest.approx(220 / sum(e2e))
    assert overall["share_of_e2e"]["other"] == pytest.approx(4 * 5 / sum(e2e))
    assert sum(overall["share_of_e2e"][s] for s in ("tokenize", "queue", "prefill", "decode", "other")) == pytest.approx(1)
    routes = result["routes"]
    assert set(routes) == {"/v1/completions", "/v1/chat/completions"}
    assert (routes["/v1/completions"]["requests"], routes["/v1/completions"]["errors"]) == (4, 1)
    assert routes["/v1/chat/completions"]["seconds"]["queue"]["p99"] == pytest.approx(0.04)
    first, second = result["slowest"]
    assert first["rid"] == "d" and first["dominant_stage"] == "decode"
    assert first["dominant_share"] == pytest.approx(300 / 426) and second["rid"] == "c"


def test_tables_per_route_then_overall_then_the_slowest(load_run):
    path, _ = load_run
    titles = [str(t.title) for t in tables(summarize(all_requests(read_files([path]).traces), 1))]
    assert titles == ["/v1/chat/completions: 1 requests, 0 errors", "/v1/completions: 4 requests, 1 errors",
                      "All requests: 5 requests, 1 errors", "The 1 slowest requests"]
