"""Native routes: /generate (text and input_ids, plain and streamed), /health_generate,
/get_model_info and the Prometheus /metrics, on the bundled model."""

import pytest

from harness import BUNDLED_NAME, read_metrics, sse_events

pytestmark = pytest.mark.slow  # it starts servers

GREEDY = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}


def generate(http, **body):
    r = http.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def generate_stream(http, **body):
    with http.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r)


def check_stream_matches(events, full):
    assert len(events) >= 2
    texts = [e["text"] for e in events]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False)), texts  # cumulative
    last = events[-1]
    assert last["text"] == full["text"]
    assert last["output_ids"] == full["output_ids"]
    assert [e["meta_info"]["finish_reason"] for e in events[:-1]] == [None] * (len(events) - 1)
    assert last["meta_info"]["finish_reason"] == full["meta_info"]["finish_reason"]
    assert last["meta_info"]["completion_tokens"] == full["meta_info"]["completion_tokens"]


def test_generate_text_and_input_ids(http):
    full = generate(http, text="The capital of France is", sampling_params=GREEDY)
    meta = full["meta_info"]
    assert isinstance(full["text"], str) and full["text"]
    assert len(full["output_ids"]) == 8 and meta["completion_tokens"] == 8
    assert meta["finish_reason"] == "length" and meta["prompt_tokens"] > 0
    check_stream_matches(generate_stream(http, text="The capital of France is", sampling_params=GREEDY), full)

    # Continuing from ids: the prompt is exactly those ids.
    ids = full["output_ids"]
    by_ids = generate(http, input_ids=ids, sampling_params=GREEDY)
    assert by_ids["meta_info"]["prompt_tokens"] == len(ids)
    assert len(by_ids["output_ids"]) == 8
    check_stream_matches(generate_stream(http, input_ids=ids, sampling_params=GREEDY), by_ids)


def test_generate_with_own_rid_and_stop(http):
    full = generate(http, text="Count: one, two, three,", sampling_params={**GREEDY, "max_new_tokens": 16},
                    rid="my-request-1")
    assert full["meta_info"]["id"] == "my-request-1"
    text = full["text"]
    if len(text.strip()) > 4:
        stop = text.strip()[2:4]
        stopped = generate(http, text="Count: one, two, three,", sampling_params={**GREEDY, "max_new_tokens": 16,
                                                                                    "stop": stop})
        assert stopped["meta_info"]["finish_reason"] == "stop"
        assert stopped["meta_info"]["matched_stop"] == stop
        assert stopped["text"] == text[: text.index(stop)]


def test_health_generate(http):
    assert http.get("/health_generate").status_code == 200
    assert http.get("/health").status_code == 200


def test_get_model_info(http):
    info = http.get("/get_model_info").json()
    assert isinstance(info["context_length"], int) and info["context_length"] > 0
    assert info["served_model_name"] == BUNDLED_NAME
    assert info["model_path"].endswith(".gguf")


def test_metrics(bundled_server, http):
    before = read_metrics(bundled_server)
    full = generate(http, text="The capital of France is", sampling_params=GREEDY)
    after = read_metrics(bundled_server)

    def delta(key):
        return after.get(key, 0) - before.get(key, 0)

    r = http.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    for family in ("loupe_requests_total", "loupe_prompt_tokens_total", "loupe_generation_tokens_total",
                   "loupe_time_to_first_token_seconds", "loupe_e2e_request_latency_seconds",
                   "loupe_queue_time_seconds", "loupe_num_running_reqs", "loupe_num_waiting_reqs",
                   "loupe_kv_used_tokens", "loupe_kv_cache_usage", "loupe_kv_cached_tokens",
                   "loupe_tracing_spans_queued"):
        assert f"# TYPE {family} " in r.text or f"# TYPE {family.removesuffix('_total')} " in r.text, family
    assert delta('loupe_requests_total{status="length"}') == 1
    assert delta("loupe_prompt_tokens_total") == full["meta_info"]["prompt_tokens"]
    assert delta("loupe_generation_tokens_total") == 8
    for hist in ("loupe_time_to_first_token_seconds", "loupe_e2e_request_latency_seconds",
                 "loupe_queue_time_seconds"):
        assert delta(f"{hist}_count") == 1, hist
        assert after[f'{hist}_bucket{{le="+Inf"}}'] == after[f"{hist}_count"]
    assert after["loupe_time_to_first_token_seconds_sum"] > before.get("loupe_time_to_first_token_seconds_sum", 0)
    assert after["loupe_num_running_reqs"] == 0 and after["loupe_num_waiting_reqs"] == 0
    assert after["loupe_kv_used_tokens"] == 0 and after["loupe_kv_cache_usage"] == 0
    # An HTTP error is counted by its status.
    http.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert read_metrics(bundled_server).get('loupe_requests_total{status="http_404"}', 0) >= 1
