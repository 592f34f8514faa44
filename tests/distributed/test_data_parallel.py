"""--dp-size: a DP controller in front of scheduler replicas, on a tiny model, traced."""

import threading

import httpx
import pytest
from assertions import kill_child_and_expect_shutdown

from harness import LiveServer, read_metrics
from loupe import Engine

pytestmark = pytest.mark.slow  # it starts servers

PROMPTS = [f"one two three {i} Hello, my name is" for i in range(4)]


def dp_server(tiny_model_dir, tmp_path_factory, receiver, method) -> LiveServer:
    """Two replicas on a tiny model, traced at level 2 (not started)."""
    return LiveServer("--model-path", tiny_model_dir("llama"), "--dp-size", 2, "--load-balance-method", method,
                      "--enable-tracing", "--trace-level", 2, "--otlp-endpoint", f"127.0.0.1:{receiver.port}",
                      log_dir=str(tmp_path_factory.mktemp("dp-logs")), env={"LOUPE_OTLP_EXPORTER_SCHEDULE_DELAY_MILLIS": "50"})


def generate(server, prompt, max_new_tokens=12, start: threading.Barrier | None = None):
    """One /generate call; with `start`, sent once every thread holding the barrier is ready."""
    with httpx.Client(timeout=60) as client:
        if start is not None:
            start.wait()
        r = client.post(server.url("/generate"), json={
            "text": prompt, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}})
    assert r.status_code == 200, r.text
    return r


def replica_of(receiver, response) -> int:
    """Which replica served a request, read from its trace."""
    trace_id = response.headers["traceparent"].split("-")[1]
    wanted = ("Scheduler", "DP Controller", "Req ")  # the processes' spans come apart: wait for all three
    spans = receiver.wait_for(lambda s: {w for x in s if x["trace_id"] == trace_id for w in wanted
                                         if x["name"].startswith(w)} == set(wanted))
    mine = [s for s in spans if s["trace_id"] == trace_id]
    scheduler = next(s for s in mine if s["name"].startswith("Scheduler"))
    dispatch = next(s for s in mine if s["name"] == "dispatch" and "dp_rank" in s["attributes"])
    controller = next(s for s in mine if s["name"].startswith("DP Controller"))
    root = next(s for s in mine if s["name"].startswith("Req "))
    assert controller["parent_id"] == scheduler["parent_id"] == root["span_id"]
    assert dispatch["parent_id"] == controller["span_id"]
    rank = dispatch["attributes"]["dp_rank"]
    assert scheduler["name"].startswith(f"Scheduler [TP 0] [DP {rank}] (host:")
    assert scheduler["attributes"]["dp_rank"] == rank
    return rank


def test_round_robin_spreads_requests_and_keeps_outputs(tiny_model_dir, tmp_path_factory, receiver):
    with dp_server(tiny_model_dir, tmp_path_factory, receiver, "round_robin") as server:
        expected = Engine(tiny_model_dir("llama"), dtype="float32").generate(
            PROMPTS, {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True})
        responses = [generate(server, p) for p in PROMPTS]
        assert [r.json()["output_ids"] for r in responses] == [e["output_ids"] for e in expected]
        assert [replica_of(receiver, r) for r in responses] == [0, 1, 0, 1]
        metrics = read_metrics(server)
        assert metrics["loupe_num_running_reqs"] == 0 and metrics["loupe_kv_used_tokens"] == 0
        assert metrics['loupe_requests_total{status="length"}'] == 4


def test_least_loaded_sends_concurrent_requests_to_the_idle_replica(tiny_model_dir, tmp_path_factory, receiver):
    with dp_server(tiny_model_dir, tmp_path_factory, receiver, "least_loaded") as server:
        # Long enough that all four overlap even on a busy machine, and sent at one moment.
        responses, at_once = [], threading.Barrier(len(PROMPTS))
        threads = [threading.Thread(target=lambda p=p: responses.append(generate(server, p, 600, at_once)))
                   for p in PROMPTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ranks = sorted(replica_of(receiver, r) for r in responses)
        assert ranks == [0, 0, 1, 1]


def test_a_dead_replica_takes_the_server_down_naming_it(tiny_model_dir, tmp_path_factory, receiver):
    with dp_server(tiny_model_dir, tmp_path_factory, receiver, "round_robin") as server:
        kill_child_and_expect_shutdown(server, "scheduler [DP 1]")
