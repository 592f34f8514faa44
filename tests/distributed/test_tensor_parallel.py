"""--tp-size / --pp-size on live servers (tiny model, gloo on loopback): same greedy output as
one process, one traced thread span per rank under each request's root, a dead rank named,
and two launches forming one TP-2 server (--nnodes)."""

import re

import httpx
import pytest
from assertions import kill_child_and_expect_shutdown

from harness import LiveServer, free_port, read_metrics
from loupe import Engine

pytestmark = pytest.mark.slow  # it starts servers

PROMPTS = [f"one two three {i} Hello, my name is" for i in range(3)]
GREEDY = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def expected(tiny_model_dir):
    outputs = Engine(tiny_model_dir("llama"), dtype="float32").generate(PROMPTS, GREEDY)
    return [o["output_ids"] for o in outputs]


@pytest.fixture
def start(tiny_model_dir, receiver, launch):
    """Factory: a traced server on the tiny model with these flags, started (not waited on);
    all stopped at teardown."""
    def start_server(*flags) -> LiveServer:
        return launch("--model-path", tiny_model_dir("llama"), *flags, "--enable-tracing", "--otlp-endpoint",
                      f"127.0.0.1:{receiver.port}", env={"LOUPE_OTLP_EXPORTER_SCHEDULE_DELAY_MILLIS": "50"})

    return start_server


def generate_all(server) -> list[httpx.Response]:
    responses = [httpx.post(server.url("/generate"), timeout=60, json={"text": p, "sampling_params": GREEDY})
                 for p in PROMPTS]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    return responses


def rank_spans(receiver, response, num_ranks: int) -> list[dict]:
    """The scheduler thread spans of a request's trace, one per rank, checked to hang under its
    one root and to carry their ranks; the trace's span ids all differ."""
    trace_id = response.headers["traceparent"].split("-")[1]

    def complete(spans):
        mine = [s for s in spans if s["trace_id"] == trace_id]
        return sum(s["name"].startswith("Scheduler") for s in mine) >= num_ranks and any(
            s["name"].startswith("Req ") for s in mine)

    mine = [s for s in receiver.wait_for(complete) if s["trace_id"] == trace_id]
    root = next(s for s in mine if s["name"].startswith("Req "))
    threads = [s for s in mine if s["name"].startswith("Scheduler")]
    assert len(threads) == num_ranks
    assert all(t["parent_id"] == root["span_id"] for t in threads)
    assert len({s["span_id"] for s in mine}) == len(mine)
    for thread in threads:  # each rank ran the request: its own queue/prefill/decode slices
        children = {s["name"] for s in mine if s["parent_id"] == thread["span_id"]}
        assert {"queue", "prefill", "decode"} <= children, (thread["name"], children)
    return threads


def test_tp2_serves_like_one_process_with_a_span_per_rank(start, receiver, expected):
    server = start("--tp-size", 2).wait_ready()
    responses = generate_all(server)
    assert [r.json()["output_ids"] for r in responses] == expected
    threads = rank_spans(receiver, responses[0], 2)
    ranks = sorted((t["attributes"]["tp_rank"], t["attributes"]["pp_rank"], t["attributes"]["dp_rank"])
                   for t in threads)
    assert ranks == [(0, 0, 0), (1, 0, 0)]
    names = sorted(t["name"] for t in threads)
    assert re.fullmatch(r"Scheduler \[TP 0\] \(host:[0-9a-f]{8} \| pid:\d+\)", names[0]), names
    assert names[1].startswith("Scheduler [TP 1] (host:")
    metrics = read_metrics(server)
    assert metrics["loupe_num_running_reqs"] == 0 and metrics["loupe_kv_used_tokens"] == 0

    kill_child_and_expect_shutdown(server, "scheduler [TP 1]")  # now a rank dies


@pytest.mark.parametrize("flags,labels", [
    (("--tp-size", 2, "--pp-size", 2), ["[TP 0] [PP 0]", "[TP 0] [PP 1]", "[TP 1] [PP 0]", "[TP 1] [PP 1]"]),
    (("--tp-size", 2, "--dp-size", 2), ["[TP 0] [DP {d}]", "[TP 1] [DP {d}]"]),
])
def test_tp_with_pp_or_dp_serves_like_one_process(start, receiver, expected, flags, labels):
    server = start(*flags).wait_ready()
    responses = generate_all(server)
    assert [r.json()["output_ids"] for r in responses] == expected
    for response in responses:
        threads = rank_spans(receiver, response, len(labels))
        dp = threads[0]["attributes"]["dp_rank"]
        names = sorted(t["name"].split(" (host")[0] for t in threads)
        assert names == [f"Scheduler {label.format(d=dp)}" for label in labels]


def test_two_launches_form_one_tp2_server(start, receiver, expected):
    """--nnodes 2 on loopback: node 0 serves HTTP with TP rank 0, node 1 runs TP rank 1."""
    address = f"127.0.0.1:{free_port()}"
    node_flags = ("--tp-size", 2, "--nnodes", 2, "--dist-init-addr", address)
    node1 = start(*node_flags, "--node-rank", 1)  # serves no HTTP: never waited on
    node0 = start(*node_flags, "--node-rank", 0).wait_ready()
    responses = generate_all(node0)
    assert [r.json()["output_ids"] for r in responses] == expected
    threads = rank_spans(receiver, responses[0], 2)  # rank 1's spans left through node 1's exporter
    assert len({t["attributes"]["pid"] for t in threads}) == 2
    assert "[scheduler [TP 1] pid:" in node1.log() and "[scheduler [TP 1] pid:" not in node0.log()

    node0.stop()  # node 1 notices its driver is gone and stops by itself
    assert node1.wait_exit(30) == 0, node1.log()
    assert node1.wait_all_gone(15) == []
