"""A client that goes away aborts its request and frees its KV, streamed or not."""

import threading

import httpx
import pytest

from harness import BUNDLED_NAME, wait_metrics

pytestmark = pytest.mark.slow  # it starts servers

ABORTS = 'loupe_requests_total{status="abort"}'
LONG = {"max_tokens": 2000, "temperature": 0, "ignore_eos": True}
STORY = [{"role": "user", "content": "Write a very long story."}]


def running(samples):
    return samples.get("loupe_num_running_reqs", 0) >= 1 and samples.get("loupe_kv_used_tokens", 0) > 0


def idle(samples):
    return samples.get("loupe_num_running_reqs") == 0 and samples.get("loupe_kv_used_tokens") == 0


def assert_aborted_and_freed(server, aborts_before):
    samples = wait_metrics(server, lambda s: idle(s) and s.get(ABORTS, 0) > aborts_before, timeout=10)
    assert samples.get("loupe_num_running_reqs") == 0, samples
    assert samples.get("loupe_num_waiting_reqs") == 0, samples
    assert samples.get("loupe_kv_used_tokens") == 0, samples
    assert samples.get(ABORTS, 0) == aborts_before + 1, samples


@pytest.fixture
def aborts_before(bundled_server):
    samples = wait_metrics(bundled_server, idle, timeout=10)
    assert idle(samples), "the shared server is not idle"
    return samples.get(ABORTS, 0)


def test_openai_stream_closed_mid_way(bundled_server, client, aborts_before):
    stream = client.chat.completions.create(model=BUNDLED_NAME, messages=STORY, stream=True,
                                            max_tokens=LONG["max_tokens"], temperature=0,
                                            extra_body={"ignore_eos": True})
    chunks = 0
    for _ in stream:
        chunks += 1
        if chunks == 5:
            break
    assert running(wait_metrics(bundled_server, running, timeout=10))
    stream.close()
    assert_aborted_and_freed(bundled_server, aborts_before)


@pytest.mark.parametrize("path", ["/v1/completions", "/generate"])
def test_raw_stream_closed_mid_way(bundled_server, aborts_before, path):
    if path == "/generate":
        body = {"text": "Once upon a time", "stream": True,
                "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}
    else:
        body = {"model": BUNDLED_NAME, "prompt": "Once upon a time", "stream": True, **LONG}
    with httpx.Client(timeout=60, trust_env=False) as http:
        with http.stream("POST", bundled_server.url(path), json=body) as r:
            assert r.status_code == 200
            lines, reader = 0, r.iter_lines()  # held: a reader dropped mid-way closes the connection
            for line in reader:
                lines += line.startswith("data: ")
                if lines == 3:
                    break
            assert running(wait_metrics(bundled_server, running, timeout=10))
    assert_aborted_and_freed(bundled_server, aborts_before)


def test_non_stream_client_timeout(bundled_server, aborts_before):
    outcome = {}

    def impatient():
        body = {"model": BUNDLED_NAME, "messages": STORY, **LONG}
        try:
            httpx.post(bundled_server.url("/v1/chat/completions"), json=body, timeout=httpx.Timeout(60, read=3),
                       trust_env=False)
            outcome["result"] = "answered"
        except httpx.ReadTimeout:
            outcome["result"] = "timed out"

    worker = threading.Thread(target=impatient)
    worker.start()
    assert running(wait_metrics(bundled_server, running, timeout=10))
    worker.join(30)
    assert outcome == {"result": "timed out"}
    assert_aborted_and_freed(bundled_server, aborts_before)
