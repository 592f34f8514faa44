"""A prefill and a decode server on the bundled model behind SGLang's real router in PD mode:
the same answers as a single server, for every route, streaming or not."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from harness import BUNDLED_NAME, LiveRouter, LiveServer, free_port, read_metrics, running, sse_events

pytestmark = pytest.mark.slow  # it starts servers

CHATS = ["What is the capital of France?", "Write one sentence about a lighthouse keeper who climbs the stairs "
         "every evening, and what he sees from the top when the weather is clear."]
PROMPT = "The old lighthouse keeper climbed the stairs every evening at dusk, and from the top he saw"


@pytest.fixture(scope="module")
def pd(server_logs, bundled_server):
    """(router, prefill server, decode server). The prefill server runs prompts in chunks of 32
    tokens, so most prompts here take several chunks there."""
    bootstrap_port = free_port()
    prefill = LiveServer("--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", bootstrap_port,
                         "--chunked-prefill-size", 32, log_dir=server_logs, compile=True)
    decode = LiveServer("--disaggregation-mode", "decode", log_dir=server_logs, compile=True)  # compiled
    router = LiveRouter("--pd-disaggregation", "--prefill", prefill.base_url, bootstrap_port,
                        "--decode", decode.base_url, num_workers=2, log_dir=server_logs)
    with running(prefill, decode), router:
        yield router, prefill, decode


def both(pd, bundled_server, path: str, body: dict) -> tuple[dict, dict]:
    """The JSON answers of the router (PD pair) and of the single server to the same request."""
    router = pd[0]
    with httpx.Client(timeout=120, trust_env=False) as http:
        answers = [http.post(base + path, json=body) for base in (router.base_url, bundled_server.base_url)]
    for answer in answers:
        assert answer.status_code == 200, answer.text
    return answers[0].json(), answers[1].json()


@pytest.mark.parametrize("content", CHATS)
def test_chat_equals_a_single_servers(pd, bundled_server, content):
    body = {"model": BUNDLED_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 24,
            "temperature": 0}
    split, single = both(pd, bundled_server, "/v1/chat/completions", body)
    assert split["choices"][0]["message"] == single["choices"][0]["message"]
    assert split["usage"]["completion_tokens"] == single["usage"]["completion_tokens"]


def test_completions_and_generate_equal_a_single_servers_twice_over(pd, bundled_server):
    """The second time, the prompt is in the prefill server's prefix cache."""
    for _ in range(2):
        split, single = both(pd, bundled_server, "/v1/completions",
                             {"model": BUNDLED_NAME, "prompt": PROMPT, "max_tokens": 20, "temperature": 0})
        assert split["choices"][0]["text"] == single["choices"][0]["text"]
        split, single = both(pd, bundled_server, "/generate", {"text": PROMPT, "sampling_params": {
            "max_new_tokens": 20, "temperature": 0, "ignore_eos": True}})
        assert split["output_ids"] == single["output_ids"] and split["text"] == single["text"]
    token_kv = 2 * 30 * 3 * 64 * 4  # K and V, 30 layers, 3 KV heads of 64, float32
    for server in pd[1:]:  # each request's KV left the prefill server and reached the decode server
        metrics = read_metrics(server)
        assert metrics["loupe_kv_transfers_total"] >= 4 and metrics["loupe_kv_transfer_seconds_count"] >= 4
        assert metrics["loupe_kv_transfer_bytes_total"] >= 4 * 16 * token_kv and metrics[
            "loupe_kv_transfer_failures_total"] == 0


def test_streams_equal_a_single_servers(pd, bundled_server):
    router = pd[0]
    body = {"model": BUNDLED_NAME, "prompt": PROMPT, "max_tokens": 20, "temperature": 0, "stream": True}
    texts = []
    for base in (router.base_url, bundled_server.base_url):
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120, trust_env=False) as r:
            assert r.status_code == 200
            texts.append("".join(e["choices"][0]["text"] for e in sse_events(r) if e["choices"]))
    assert texts[0] == texts[1] and texts[0]


def test_sixteen_concurrent_streams_through_the_router_all_complete(pd):
    router = pd[0]

    def stream(i: int) -> int:
        with openai.OpenAI(base_url=router.base_url + "/v1", api_key="x", max_retries=0, timeout=120) as client:
            chunks = client.chat.completions.create(
                model=BUNDLED_NAME, messages=[{"role": "user", "content": f"Count to {i + 3}, please."}],
                max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True})
            return next(c.usage.completion_tokens for c in chunks if c.usage)

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(stream, range(16))) == [16] * 16


def test_a_decode_server_refuses_requests_without_bootstrap_fields(pd):
    decode = pd[2]
    r = httpx.post(decode.url("/v1/completions"), json={"model": BUNDLED_NAME, "prompt": "hi", "max_tokens": 2},
                   trust_env=False)
    assert r.status_code == 400 and r.json()["error"]["param"] == "bootstrap_room"
    assert "router" in r.json()["error"]["message"]
