"""loupe servers behind SGLang's real router (`sglang-router`) in its regular mode: the router
registers them from /health, /server_info and /model_info, spreads requests over them, and
its `http_request` span is the parent of each loupe request's root."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from harness import LiveRouter, LiveServer, read_metrics, running

pytestmark = pytest.mark.slow  # it starts servers

# Now and then (SGLang's router 0.3.2, on a loaded machine) the router never exports one of its
# request spans, though it sent that request's traceparent on, even with the client's connection
# kept: the loupe side is checked for every request, the router's own span for all but one.
ROUTER_SPANS_LOST = 1
PROMPTS = ["alpha beta gamma delta", "one two three four five", "Paris is the capital of",
           "where did the time go", "zebra yak xylophone", "the quick brown fox", "hello, my name is",
           "seven eight nine ten"]


@pytest.fixture(scope="module")
def workers(tmp_path_factory, tiny_model_dir, receiver):
    """Two traced loupe servers on a tiny model, exporting to the module's OTLP receiver."""
    logs = str(tmp_path_factory.mktemp("router-workers"))
    flags = ["--model-path", tiny_model_dir("llama"), "--max-total-tokens", 4096, "--enable-tracing",
             "--otlp-endpoint", f"http://127.0.0.1:{receiver.port}"]
    servers = [LiveServer(*flags, log_dir=logs) for _ in range(2)]
    with running(*servers):
        yield servers


def test_server_info_and_model_info_say_what_a_router_reads(workers):
    server = workers[0]
    model = httpx.get(server.url("/v1/models"), trust_env=False).json()["data"][0]["id"]
    for path in ("/server_info", "/get_server_info"):
        info = httpx.get(server.url(path), trust_env=False).json()
        assert info["served_model_name"] == model
        assert info["tp_size"] == 1 and info["dp_size"] == 1 and info["page_size"] == 16
        assert info["max_total_tokens"] == 4096 and info["context_length"] > 0 and info["version"]
        assert "api_key" not in info
    for path in ("/model_info", "/get_model_info"):
        info = httpx.get(server.url(path), trust_env=False).json()
        assert info["is_generation"] is True and info["served_model_name"] == model
        assert info["model_path"] == server.command[server.command.index("--model-path") + 1]


# With its default thresholds (a load gap of 64 requests) the cache-aware policy keeps a light
# load on one worker, by design; lowered, it balances the concurrent requests here.
POLICIES = {"round_robin": [], "cache_aware": ["--balance-abs-threshold", 1, "--balance-rel-threshold", 1.0]}



def send(client: openai.OpenAI, model: str, i: int, prompt: str) -> list[str]:
    """One request through the router, alternately chat and completions; the trace id and root
    span id of loupe's response traceparent."""
    if i % 2:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=24)
        assert raw.parse().choices[0].message.content is not None
    else:
        raw = client.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=24,
                                                          extra_body={"ignore_eos": True})
        assert raw.parse().usage.completion_tokens == 24
    return raw.headers["traceparent"].split("-")[1:3]


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_the_router_spreads_requests_over_loupe_servers_under_its_own_span(workers, receiver, server_logs, policy):
    urls = [server.base_url for server in workers]
    router = LiveRouter("--worker-urls", *urls, "--policy", policy, *POLICIES[policy], "--enable-trace",
                        "--otlp-traces-endpoint", f"127.0.0.1:{receiver.port}", num_workers=2, log_dir=server_logs)
    model = httpx.get(workers[0].url("/v1/models"), trust_env=False).json()["data"][0]["id"]
    before = [sum(v for k, v in read_metrics(s).items() if k.startswith("loupe_requests_total")) for s in workers]
    started = time.time_ns()  # the router spans of this test start after this
    with router:
        assert {w["url"] for w in router.workers} == set(urls)
        assert {w["model_id"] for w in router.workers} == {model}  # from /server_info: no fallback needed
        # The client's connections stay open until the spans are in: the router ends its span of a
        # request whose client has hung up only some seconds later, and now and then never.
        with openai.OpenAI(base_url=router.base_url + "/v1", api_key="x", max_retries=0, timeout=60) as client:
            with ThreadPoolExecutor(len(PROMPTS)) as pool:
                roots = list(pool.map(lambda args: send(client, model, *args), enumerate(PROMPTS)))

            def complete(spans):  # every root, and the router's span above all but at most one
                by_id = {s["span_id"]: s for s in spans}
                if not all(span_id in by_id for _, span_id in roots):
                    return False
                return sum(by_id[span_id]["parent_id"] in by_id for _, span_id in roots) >= len(roots) - ROUTER_SPANS_LOST

            spans = receiver.wait_for(complete, timeout=60)  # before the router stops: it sends its spans every few seconds
    after = [sum(v for k, v in read_metrics(s).items() if k.startswith("loupe_requests_total")) for s in workers]
    served = [b - a for a, b in zip(before, after, strict=True)]
    assert sum(served) == len(PROMPTS) and min(served) >= 1, served  # both servers served
    by_id = {s["span_id"]: s for s in spans}
    router_posts = [s for s in spans if s["name"] == "http_request" and s["attributes"].get("method") == "POST"
                    and s["start"] > started]
    for trace_id, span_id in roots:
        root = by_id[span_id]
        assert root["name"].startswith("Req ") and root["trace_id"] == trace_id
        assert root["parent_id"] is not None  # the router's traceparent, whether or not its span arrived
        if root["parent_id"] in by_id:
            parent = by_id[root["parent_id"]]
            assert parent["name"] == "http_request" and parent["trace_id"] == trace_id
            assert parent["resource"]["service.name"] != root["resource"]["service.name"]
    # Every router request span that arrived is the parent of exactly one loupe root.
    parents = [by_id[span_id]["parent_id"] for _, span_id in roots]
    assert sorted(s["span_id"] for s in router_posts) == sorted(p for p in parents if p in by_id)
