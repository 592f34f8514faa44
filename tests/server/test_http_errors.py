"""Bad requests get the right status and OpenAI's error shape, over raw HTTP."""

import threading
import time

import httpx
import pytest
from assertions import assert_openai_error

from harness import BUNDLED_NAME, LiveServer, sse_events

pytestmark = pytest.mark.slow  # it starts servers

MODEL = BUNDLED_NAME
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
KEY = "test-key-123"
TINY_CONTEXT = 64
TINY_KV = 48


@pytest.fixture(scope="module")
def auth_server(server_logs, tiny_flags):
    """A tiny model with an API key, a small context, and a KV cache smaller still."""
    with LiveServer(*tiny_flags, "--context-length", TINY_CONTEXT, "--max-total-tokens", TINY_KV,
                    "--served-model-name", "tiny", log_dir=server_logs, api_key=KEY) as server:
        yield server


def chat_body(**kw):
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **kw}


# ---- malformed and ill-typed bodies ---------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/generate"])
def test_malformed_json_is_400(http, path):
    r = http.post(path, content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"})
    assert_openai_error(r, 400)
    r = http.post(path, content=b"not json at all", headers={"content-type": "application/json"})
    assert_openai_error(r, 400)


@pytest.mark.parametrize("missing", ["messages", "model"])
def test_missing_field_is_400_naming_it(http, missing):
    body = chat_body()
    del body[missing]
    error = assert_openai_error(http.post("/v1/chat/completions", json=body), 400)
    assert missing in (error["param"] or "") or missing in error["message"], error


def test_missing_prompt_is_400(http):
    assert_openai_error(http.post("/v1/completions", json={"model": MODEL}), 400)


@pytest.mark.parametrize("field,value", [
    ("temperature", "hot"), ("max_tokens", "5"), ("top_p", [1]), ("stream", "yes"), ("seed", 1.5),
    ("messages", "hello"), ("messages", []), ("messages", [{"role": "wizard", "content": "hi"}]),
    ("stop", 3), ("stream_options", {"include_usage": "yes"}),
])
def test_ill_typed_field_is_400(http, field, value):
    error = assert_openai_error(http.post("/v1/chat/completions", json=chat_body(**{field: value})), 400)
    assert (error["param"] or "").split(".")[0] == field, error


@pytest.mark.parametrize("max_tokens", [0, -1])
def test_non_positive_max_tokens_is_400(http, max_tokens):
    r = http.post("/v1/chat/completions", json=chat_body(max_tokens=max_tokens))
    assert_openai_error(r, 400, param="max_tokens")
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": max_tokens})
    assert_openai_error(r, 400, param="max_tokens")


def test_max_tokens_is_checked_when_max_completion_tokens_wins(http):
    """Both given: max_completion_tokens decides (OpenAI's rule), but a bad max_tokens is still a 400
    (found by the fuzz: the one not used went unchecked)."""
    for max_tokens in (-1, 10**9):
        r = http.post("/v1/chat/completions", json=chat_body(max_tokens=max_tokens, max_completion_tokens=2))
        assert_openai_error(r, 400, param="max_tokens")
    r = http.post("/v1/chat/completions", json=chat_body(max_tokens=9, max_completion_tokens=2, ignore_eos=True))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text


def test_max_tokens_beyond_context_is_400(http):
    context = http.get("/get_model_info").json()["context_length"]
    for value in (context, 10**9):
        error = assert_openai_error(http.post("/v1/chat/completions", json=chat_body(max_tokens=value)), 400,
                                    param="max_tokens")
        assert "max_new_tokens" not in error["message"], error  # OpenAI's name, not the engine's


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("top_p", 0), ("top_p", 1.5), ("top_k", 0), ("min_p", 2.0), ("n", 2),
])
def test_bad_sampling_value_is_400(http, field, value):
    assert_openai_error(http.post("/v1/chat/completions", json=chat_body(**{field: value})), 400, param=field)


def test_bad_values_in_a_stream_request_are_400_before_streaming(http):
    r = http.post("/v1/chat/completions", json=chat_body(stream=True, max_tokens=0))
    assert r.headers["content-type"].startswith("application/json")
    assert_openai_error(r, 400, param="max_tokens")


def test_request_the_engine_refuses(http):
    """A seed too large for the sampler's generator is refused by the scheduler (the last line
    of defence) unless checked earlier: a 400, or, once a stream has begun, an error event in
    OpenAI's shape followed by [DONE]."""
    body = chat_body(seed=2**70)
    assert_openai_error(http.post("/v1/chat/completions", json=body), 400)
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            r.read()
            assert_openai_error(r, 400)
            return
        events = sse_events(r)
    errors = [e["error"] for e in events if "error" in e]
    assert len(errors) == 1 and set(errors[0]) >= {"message", "type", "param", "code"}, events
    assert errors[0]["type"] == "invalid_request_error"


def test_bad_prompts_are_400(http):
    assert_openai_error(http.post("/v1/completions", json={"model": MODEL, "prompt": ""}), 400)
    assert_openai_error(http.post("/v1/completions", json={"model": MODEL, "prompt": [10**9]}), 400)
    assert_openai_error(http.post("/v1/completions", json={"model": MODEL, "prompt": [-1]}), 400)


def test_native_generate_bad_requests_are_400(http):
    assert_openai_error(http.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 0}}), 400,
                        param="max_new_tokens")
    assert_openai_error(http.post("/generate", json={"text": "hi", "sampling_params": {"bogus": 1}}), 400)
    assert_openai_error(http.post("/generate", json={"text": "hi", "input_ids": [1]}), 400)
    assert_openai_error(http.post("/generate", json={}), 400)


def test_unknown_model_is_404(http):
    error = assert_openai_error(http.post("/v1/chat/completions", json=chat_body(model="gpt-9")), 404, param="model")
    assert error["code"] == "model_not_found"
    r = http.post("/v1/completions", json={"model": "gpt-9", "prompt": "Hi", "max_tokens": 2})
    assert_openai_error(r, 404, param="model")


def test_the_frameworks_own_refusals_are_openai_shaped_too(http):
    assert_openai_error(http.get("/v1/nothing-here"), 404)
    assert_openai_error(http.get("/v1/chat/completions"), 405)
    deep = "[" * 100_000 + "]" * 100_000  # parsing it recurses too deep
    r = http.post("/v1/completions", content=deep, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and set(r.json()) == {"error"}, r.text


@pytest.mark.parametrize("field,value", [
    ("echo", True), ("best_of", 2), ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("response_format", {"type": "json_object"}), ("frequency_penalty", 0.5), ("logit_bias", {"50256": -100}),
])
def test_parameters_loupe_does_not_implement_are_refused_not_ignored(http, field, value):
    for path, body in (("/v1/chat/completions", chat_body(max_tokens=2)),
                       ("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2})):
        error = assert_openai_error(http.post(path, json={**body, field: value}), 400, param=field)
        assert error["code"] == "unsupported_parameter"
    # the values that ask for nothing, and fields loupe has no use for, are fine
    harmless = {"echo": False, "tools": [], "response_format": {"type": "text"}, "frequency_penalty": 0,
                "user": "someone", "store": False}
    assert http.post("/v1/chat/completions", json={**chat_body(max_tokens=2), **harmless}).status_code == 200
    r = http.post("/generate", json={"text": "Hi", "lora_path": "x", "sampling_params": {"max_new_tokens": 2}})
    assert_openai_error(r, 400, param="lora_path")


def test_oversized_bodies_and_prompts_are_refused_by_size_before_tokenizing(http):
    big = "word " * 2_000_000  # 10 MB
    started = time.perf_counter()
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": big, "max_tokens": 2})
    assert_openai_error(r, 413)
    chunked = http.post("/generate", content=(b"x" * 2**20 for _ in range(10)),
                        headers={"Content-Type": "application/json"})  # no Content-Length
    assert_openai_error(chunked, 413)
    long_text = "word " * 200_000  # 1 MB: under the body limit, far over the context
    for path, body in (("/v1/completions", {"model": MODEL, "prompt": long_text, "max_tokens": 2}),
                       ("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": long_text}])),
                       ("/generate", {"text": long_text})):
        error = assert_openai_error(http.post(path, json=body), 400)
        assert "characters" in error["message"], error
    assert time.perf_counter() - started < 5  # nothing was tokenized
    assert http.post("/v1/chat/completions", json=chat_body(max_tokens=2)).status_code == 200


def test_bad_requests_do_not_disturb_a_concurrent_good_one(http, bundled_server):
    params = chat_body(temperature=0, max_tokens=24, messages=[{"role": "user", "content": "Tell me about Paris."}])
    alone = http.post("/v1/chat/completions", json=params).json()["choices"][0]
    assert alone["message"]["content"]
    result = {}

    def good():  # streamed, so that errors answered meanwhile interleave with its chunks
        text, reasons = "", []
        with bundled_server.client() as c, c.stream("POST", "/v1/chat/completions", json={**params, "stream": True}) as r:
            for event in sse_events(r):
                for choice in event["choices"]:
                    text += choice["delta"].get("content") or ""
                    reasons += [choice["finish_reason"]] if choice["finish_reason"] else []
        result.update(text=text, reasons=reasons)

    bad = [
        lambda: http.post("/v1/chat/completions", content=b"{", headers={"content-type": "application/json"}),
        lambda: http.post("/v1/chat/completions", json=chat_body(max_tokens=-1)),
        lambda: http.post("/v1/chat/completions", json=chat_body(temperature="hot")),
        lambda: http.post("/v1/chat/completions", json=chat_body(model="nope")),
        lambda: http.post("/v1/completions", json={"model": MODEL, "prompt": [10**9]}),
        lambda: http.post("/generate", json={"text": "x", "sampling_params": {"top_p": 7}}),
        lambda: http.post("/generate", json={"text": "x", "input_ids": [1]}),
    ]
    worker = threading.Thread(target=good)
    worker.start()
    statuses = []
    while worker.is_alive() or not statuses:  # at least one round, more while the good one runs
        statuses += [call().status_code for call in bad]
    worker.join()
    assert set(statuses) <= {400, 404}, statuses
    # Only the good request reaches the engine, so it runs alone: the same greedy text.
    assert result == {"text": alone["message"]["content"], "reasons": [alone["finish_reason"]]}, result


# ---- a small context ------------------------------------------------------------------------


def test_prompt_longer_than_context_is_400(auth_server):
    with auth_server.client() as c:
        assert c.get("/get_model_info").json()["context_length"] == TINY_CONTEXT
        long_text = "one two three four five six seven eight nine ten " * 20
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": long_text, "max_tokens": 1})
        assert_openai_error(r, 400, param="prompt")
        r = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 1,
                                                 "messages": [{"role": "user", "content": long_text}]})
        assert_openai_error(r, 400)
        r = c.post("/generate", json={"text": long_text, "sampling_params": {"max_new_tokens": 1}})
        assert_openai_error(r, 400)
        # A prompt that fits, asking for more than the context leaves: 400 too.
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "one two", "max_tokens": TINY_CONTEXT})
        assert_openai_error(r, 400, param="max_tokens")
        # And one that fits runs.
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "one two", "max_tokens": 3})
        assert r.status_code == 200, r.text


def test_default_max_tokens_fits_the_kv_cache(auth_server):
    """Without max_tokens a request may run to the end of the context, or of the KV cache
    when that is smaller: it must not be refused for a limit the client never set."""
    with auth_server.client() as c:
        assert c.get("/get_model_info").json()["max_total_tokens"] == TINY_KV < TINY_CONTEXT
        for path, body in (("/v1/completions", {"prompt": "one two"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            r = c.post(path, json={"model": "tiny", "user": "someone", **body})
            assert r.status_code == 200, r.text
            usage = r.json()["usage"]
            assert usage["prompt_tokens"] + usage["completion_tokens"] <= TINY_KV


# ---- API key --------------------------------------------------------------------------------

PROTECTED = [("GET", "/v1/models", None), ("POST", "/v1/chat/completions", {"model": "tiny", "messages": MESSAGES}),
             ("GET", "/metrics", None), ("POST", "/generate", {"text": "hi"}), ("GET", "/get_model_info", None),
             ("POST", "/v1/completions", {"model": "tiny", "prompt": "hi"}), ("GET", "/health_generate", None)]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}], ids=["none", "wrong", "no-bearer", "basic"])
def test_api_key_required(auth_server, headers):
    with httpx.Client(base_url=auth_server.base_url, timeout=30, trust_env=False) as c:
        for method, path, body in PROTECTED:
            r = c.request(method, path, json=body, headers=headers)
            assert_openai_error(r, 401)
        assert c.get("/health", headers=headers).status_code == 200


def test_api_key_accepted(auth_server):
    with httpx.Client(base_url=auth_server.base_url, timeout=30, trust_env=False,
                      headers={"Authorization": f"Bearer {KEY}"}) as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == "tiny"
        assert c.get("/metrics").status_code == 200
        r = c.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}})
        assert r.status_code == 200, r.text


# ---- 503 while the model loads --------------------------------------------------------------


def assert_503_before_ready(server):
    """The start-up probes (see LiveServer.wait_ready) saw 503 on the API, and on /health,
    before /health turned 200."""
    api = [(t, status, body) for t, path, status, body in server.probes if path != "/health"]
    health = [status for _, path, status, _ in server.probes if path == "/health"]
    refused = [status for _, status, _ in api if status == 503]
    assert refused, f"no API call got 503 while starting: {[(round(t, 2), s) for t, s, _ in api]}"
    assert 503 in health
    assert health[-1] == 200 and set(health) <= {None, 503, 200}
    _, status, body = next(p for p in api if p[1] == 503)
    response = httpx.Response(status, content=body.encode())
    assert_openai_error(response, 503)


def test_503_while_starting(bundled_server, auth_server):
    assert_503_before_ready(bundled_server)
    assert_503_before_ready(auth_server)  # with the right API key
