"""Overload: a bounded queue (503 with Retry-After beyond it, at once), 500 connections at
once, and clients that read their streams slowly."""

import asyncio
import json
import statistics
import time
from contextlib import ExitStack

import httpx
import psutil
import pytest
from assertions import assert_openai_error

from harness import LiveServer, read_metrics, wait_metrics

pytestmark = pytest.mark.slow  # it starts servers

# Each event of /generate's stream holds the text and ids so far: 1000 tokens make megabytes,
# more than the sockets buffer, so a client that does not read holds its stream up.
LONG = {"text": "one two three", "stream": True, "sampling_params": {"max_new_tokens": 1000, "ignore_eos": True}}


def open_streams(stack: ExitStack, server, count: int) -> list:
    """`count` streamed 1000-token /generate requests, their headers received, nothing read."""
    return [stack.enter_context(httpx.stream("POST", server.url("/generate"), json=LONG, timeout=60,
                                             trust_env=False)).iter_lines() for _ in range(count)]


def completion_tokens(lines) -> int:
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    return events[-1]["meta_info"]["completion_tokens"]


def test_requests_beyond_the_queue_are_refused_at_once_with_retry_after(launch, tiny_flags):
    server = launch(*tiny_flags, "--max-running-requests", 2, "--max-queued-requests", 1).wait_ready()
    refusals = 'loupe_requests_total{status="http_503"}'
    before = read_metrics(server).get(refusals, 0)  # the start-up probes got some
    with ExitStack() as stack:
        held = open_streams(stack, server, 3)  # two running, one queued: the server is full
        start = time.monotonic()
        refused = [httpx.post(server.url(path), json=body, timeout=10, trust_env=False) for path, body in [
            ("/generate", {"text": "hi"}),
            ("/v1/completions", {"model": "x", "prompt": "hi"}),  # refused before its body is even read
            ("/v1/chat/completions", {"model": "x", "messages": [{"role": "user", "content": "hi"}]})]]
        elapsed = time.monotonic() - start
        for r in refused:
            error = assert_openai_error(r, 503, param=None)
            assert error["code"] == "overloaded" and "3 requests" in error["message"]
            assert r.headers["retry-after"] == "1"
        assert elapsed < 3, f"refusing three requests took {elapsed:.1f} s: they waited instead"
        # What is not generation is still answered.
        assert httpx.get(server.url("/health"), trust_env=False).status_code == 200
        assert httpx.get(server.url("/v1/models"), trust_env=False).status_code == 200
        assert [completion_tokens(lines) for lines in held] == [1000] * 3  # the held ones are served in full
    r = httpx.post(server.url("/generate"), json={"text": "hi", "sampling_params": {"max_new_tokens": 2}},
                   timeout=30, trust_env=False)
    assert r.status_code == 200, r.text  # room again
    assert read_metrics(server)[refusals] == before + 3


async def one_of_many(http: httpx.AsyncClient, i: int) -> tuple[int, float, dict]:
    body = {"text": f"Request {i} says", "sampling_params": {"max_new_tokens": 8, "ignore_eos": True}}
    start = time.monotonic()
    r = await http.post("/generate", json=body)
    return r.status_code, time.monotonic() - start, r.json()


async def many_at_once(server, count: int) -> list:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=120, limits=limits, trust_env=False) as http:
        return await asyncio.gather(*(one_of_many(http, i) for i in range(count)))


def tree_rss(server) -> int:
    procs = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
    return sum(p.memory_info().rss for p in procs)


@pytest.fixture(scope="module")
def sized_server(server_logs, tiny_flags):
    """Sized for 64 running requests and 64 queued."""
    with LiveServer(*tiny_flags, "--max-running-requests", 64, "--max-queued-requests", 64,
                    log_dir=server_logs) as server:
        yield server


def test_500_connections_each_complete_or_are_refused(sized_server):
    """500 at once, twice. Every one is answered, either in full or with a 503 that says so;
    memory does not grow with them."""
    server = sized_server
    rounds = []
    for _ in range(2):
        start = time.monotonic()
        results = asyncio.run(many_at_once(server, 500))
        rounds.append((time.monotonic() - start, results, tree_rss(server)))
    for _, results, _ in rounds:
        admitted = [(seconds, body) for status, seconds, body in results if status == 200]
        refused = [body for status, _, body in results if status != 200]
        assert len(admitted) + len(refused) == 500
        assert all(body["meta_info"]["completion_tokens"] == 8 for _, body in admitted)
        assert all(body["error"]["code"] == "overloaded" for body in refused), refused[:3]
        assert len(admitted) >= 128  # at least what fits: 64 running + 64 queued
    (first_s, first, first_rss), (second_s, second, second_rss) = rounds
    latencies = sorted(seconds for status, seconds, _ in first + second if status == 200)
    p50, p99 = statistics.median(latencies), latencies[int(0.99 * (len(latencies) - 1))]
    print(f"\n500 at once, twice: admitted {len(latencies)} of 1000, refused {1000 - len(latencies)}; "
          f"admitted latency p50 {p50:.2f} s, p99 {p99:.2f} s; rounds {first_s:.1f} s, {second_s:.1f} s; "
          f"server RSS {first_rss / 2**20:.0f} MB after the first, {second_rss / 2**20:.0f} MB after the second")
    assert second_rss < first_rss * 1.1, "the server's memory grew with the second burst"
    samples = wait_metrics(server, lambda s: s["loupe_open_requests"] == 0)
    assert samples["loupe_open_requests"] == 0 and samples["loupe_num_running_reqs"] == 0


def test_a_slow_reader_holds_up_nobody(sized_server):
    """Streams whose clients read nothing: the engine finishes them anyway (the server holds
    their text), others are served meanwhile, and the slow ones still get every token."""
    server = sized_server
    finished = 'loupe_requests_total{status="length"}'
    done_before = read_metrics(server).get(finished, 0)
    with ExitStack() as stack:
        slow = open_streams(stack, server, 3)
        r = httpx.post(server.url("/generate"), json={"text": "hi", "sampling_params": {"max_new_tokens": 16,
                       "ignore_eos": True}}, timeout=30, trust_env=False)
        assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 16
        samples = wait_metrics(server, lambda s: s.get(finished, 0) == done_before + 4, timeout=60)
        assert samples.get(finished) == done_before + 4, "the engine waited for the slow readers"
        assert [completion_tokens(lines) for lines in slow] == [1000] * 3
