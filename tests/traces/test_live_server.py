"""`loupe traces` on the file a live TP 2 server wrote at level 3: the summary agrees with the
spans' own times and with /metrics, the Perfetto file has a track per rank, and the waterfall
of a request names every stage in order."""

import json
import threading

import httpx
import pytest
from rich.console import Console

from harness import LiveServer, read_metrics
from loupe.cli import main
from loupe.traces.reader import read_files
from loupe.traces.requests import all_requests
from loupe.traces.waterfall import waterfall

pytestmark = pytest.mark.slow  # it starts servers

STAGE_METRICS = {"queue": "loupe_queue_time_seconds", "prefill": "loupe_prefill_time_seconds",
                 "decode": "loupe_decode_time_seconds", "detokenize": "loupe_detokenize_time_seconds"}


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """Eight requests on two routes, four at a time, against a TP 2 server writing spans to a file;
    the file once the server has stopped, the responses, and /metrics before it stopped."""
    folder = tmp_path_factory.mktemp("traces-live")
    path = folder / "traces.jsonl"
    responses = []
    # Leaving the block stops it with SIGTERM: the exporter writes what it holds before it exits.
    with LiveServer("--model-path", tiny_model_dir("llama"), "--tp-size", 2, "--enable-tracing",
                    "--otlp-endpoint", f"file://{path}", "--trace-level", 3, "--chunked-prefill-size", 8,
                    "--max-total-tokens", 4096, log_dir=str(folder),
                    env={"LOUPE_OTLP_EXPORTER_SCHEDULE_DELAY_MILLIS": "50"}) as server:
        model = httpx.get(server.url("/v1/models")).json()["data"][0]["id"]

        def client(i: int) -> None:
            for j in range(2):
                if (i + j) % 2:
                    route, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": f"hi {i} {j}"}]}
                else:
                    route, body = "/v1/completions", {"prompt": f"The time of request {i} {j} went where?"}
                r = httpx.post(server.url(route), json={"model": model, "max_tokens": 4 + i, "ignore_eos": True, **body},
                               timeout=120)
                responses.append((route, r))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        metrics = read_metrics(server)
    assert [r.status_code for _, r in responses] == [200] * 8
    return str(path), responses, metrics


def trace_id(response: httpx.Response) -> str:
    return response.headers["traceparent"].split("-")[1]


def test_summary_agrees_with_the_spans_and_with_metrics(run, capsys):
    path, responses, metrics = run
    main(["traces", "summary", path, "--json", "--slowest", "3"])
    summary = json.loads(capsys.readouterr().out)
    overall = summary["overall"]
    assert (overall["requests"], overall["errors"]) == (8, 0)
    assert {route: group["requests"] for route, group in summary["routes"].items()} == {
        "/v1/chat/completions": 4, "/v1/completions": 4}
    assert {s["trace_id"] for s in summary["slowest"]} <= {trace_id(r) for _, r in responses}

    # The histograms observe the very numbers the root spans carry, to the microsecond.
    for stage, name in STAGE_METRICS.items():
        seconds = overall["seconds"][stage]
        assert seconds["count"] == metrics[f"{name}_count"] == 8, stage
        assert seconds["mean"] * 8 == pytest.approx(metrics[f"{name}_sum"], abs=8e-6), stage
    # /metrics times from the hand-over to the scheduler; the trace from the HTTP arrival.
    assert overall["seconds"]["e2e"]["count"] == metrics["loupe_e2e_request_latency_seconds_count"]
    assert overall["seconds"]["e2e"]["mean"] * 8 >= metrics["loupe_e2e_request_latency_seconds_sum"]

    spans = read_files([path]).traces
    roots = sorted((s.end - s.start) / 1e9 for t in spans.values() for s in t if s.is_request)
    assert overall["seconds"]["e2e"]["p50"] == pytest.approx((roots[3] + roots[4]) / 2, abs=2e-6)
    assert overall["seconds"]["e2e"]["p99"] == pytest.approx(roots[6] + 0.93 * (roots[7] - roots[6]), abs=2e-6)
    requests = {r.trace_id: r for r in all_requests(spans)}
    for stage in ("queue", "prefill", "decode"):  # each rank's own stage spans, timed where they happened
        for rank, slack in (("[TP 0]", 0.005), ("[TP 1]", 0.05)):  # the driver times the root's stages too
            own = {tid: s.seconds for tid, t in spans.items() for thread in t if rank in thread.name
                   for s in t if s.parent_id == thread.span_id and s.name == stage}
            assert len(own) == 8
            for tid, seconds in own.items():
                assert seconds == pytest.approx(requests[tid].stages[stage], abs=slack), (stage, rank)
    for r in requests.values():
        assert sum(r.stages[s] for s in ("tokenize", "queue", "prefill", "decode", "other")) == pytest.approx(r.e2e)


def test_perfetto_has_a_process_per_rank_and_a_track_per_request_and_rank(run, tmp_path):
    path, responses, _ = run
    out = tmp_path / "run.perfetto.json"
    main(["traces", "export", path, "--format", "perfetto", "-o", str(out)])
    events = json.loads(out.read_text())["traceEvents"]
    processes = {e["pid"]: e["args"]["name"].split(" (host:")[0] for e in events if e.get("name") == "process_name"}
    # the requests' processes, and the server's start (its trace is in the file too)
    assert sorted(processes.values()) == ["Detokenizer", "Scheduler [TP 0]", "Scheduler [TP 1]", "Tokenizer",
                                          "loupe start"]
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    for _, r in responses:
        rid = r.json()["id"]
        mine = sorted(name.removeprefix(rid).strip() for name in threads.values() if name.startswith(rid))
        assert mine == ["", "Detokenizer", "Scheduler [TP 0]", "Scheduler [TP 1]", "Tokenizer"]
        steps = [e for e in events if e["ph"] == "X" and e["name"] == "decode_step" and e["args"]["trace_id"] == trace_id(r)]
        assert len(steps) == 2 * (r.json()["usage"]["completion_tokens"] - 1)  # on each rank's track
        assert {threads[(e["pid"], e["tid"])].removeprefix(rid).strip() for e in steps} == {"Scheduler [TP 0]",
                                                                                             "Scheduler [TP 1]"}
    flows = [e for e in events if e["ph"] in ("s", "f")]
    assert len(flows) == 2 * 8 * 4  # root -> Tokenizer, both ranks and Detokenizer, per request


def test_the_waterfall_of_a_request_names_every_stage_in_order(run):
    path, responses, _ = run
    route, response = next((route, r) for route, r in responses if route == "/v1/completions")
    console = Console(width=220, record=True, file=open("/dev/null", "w"))
    console.print(waterfall(read_files([path]).traces[trace_id(response)]))
    lines = console.export_text().splitlines()[2:]
    names = [line.lstrip("│├└─ ").split("  ")[0].split(" pid ")[0] for line in lines]
    chunks, steps = names.count("prefill_chunk") // 2, response.json()["usage"]["completion_tokens"] - 1
    rank = ["queue", "prefill", *["prefill_chunk"] * chunks, "decode", *["decode_step"] * steps]
    first, second = sorted(n for n in names if n.startswith("Scheduler"))
    assert chunks >= 1 and steps >= 1
    assert names[:4] == [f"Req {response.json()['id']} {route}", "Tokenizer", "tokenize", "dispatch"]
    assert names[4:] in ([first, *rank, second, *rank, "Detokenizer", "detokenize"],
                         [second, *rank, first, *rank, "Detokenizer", "detokenize"])
