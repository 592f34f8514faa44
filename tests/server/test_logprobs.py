"""Logprobs over HTTP on the bundled SmolLM2-135M-Instruct: equal to transformers' log-softmax,
in OpenAI's shapes (the `openai` client parses them), streamed, and /generate's return_logprob."""

import openai
import pytest
import torch
from assertions import assert_openai_error

from harness import BUNDLED_NAME, LiveServer, sse_events
from harness.reference_models import bundled_reference

pytestmark = pytest.mark.slow  # it starts servers

MODEL = BUNDLED_NAME
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]  # the parity prompt (tests/model)
GREEDY = {"temperature": 0, "max_tokens": 16}
TOP = 5


@pytest.fixture(scope="module")
def exact_server(server_logs):
    """The bundled model on its exact float32 path (its default computes from int4 weights,
    transformers from the dequantised ones): a server of this module's own."""
    with LiveServer("--quantization", "none", log_dir=server_logs) as server:
        yield server


@pytest.fixture(scope="module")
def http(exact_server):
    with exact_server.client() as c:
        yield c


@pytest.fixture(scope="module")
def client(exact_server):
    with openai.OpenAI(base_url=exact_server.url("/v1"), api_key="x", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def france(http):
    """(prompt ids, /generate's answer with logprobs) for the chat prompt, greedy."""
    reference, tokenizer = bundled_reference()
    prompt = tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True, tokenize=True)["input_ids"]
    r = http.post("/generate", json={"input_ids": prompt, "sampling_params": {"max_new_tokens": 16, "temperature": 0},
                                     "return_logprob": True, "top_logprobs_num": TOP, "return_text_in_logprobs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + body["output_ids"]])).logits[0]
    expected = logits[len(prompt) - 1 : -1].log_softmax(dim=-1)
    return body, expected


def test_generate_logprobs_equal_log_softmax_of_transformers_logits(france):
    body, expected = france
    meta = body["meta_info"]
    chosen, top = meta["output_token_logprobs"], meta["output_top_logprobs"]
    assert [token for _, token, _ in chosen] == body["output_ids"]
    assert len(chosen) == len(top) == meta["completion_tokens"]
    worst = 0.0
    for step, ((logprob, token, text), alternatives) in enumerate(zip(chosen, top, strict=True)):
        assert isinstance(text, str)
        worst = max(worst, abs(logprob - expected[step, token].item()))
        assert [alt[:2] for alt in alternatives][0] == [logprob, token]  # greedy: the most likely token
        values = [value for value, _, _ in alternatives]
        assert values == sorted(values, reverse=True) and len(values) == TOP
        worst = max(worst, (torch.tensor(values) - expected[step].topk(TOP).values).abs().max().item())
    print(f"max |logprob - transformers' log_softmax| = {worst:.2e}")
    assert worst <= 1e-3


def test_chat_logprobs_parse_in_the_openai_client(client, france):
    body, _ = france
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, logprobs=True, top_logprobs=TOP, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == len(body["output_ids"])
    for entry, (logprob, _, text), alternatives in zip(content, body["meta_info"]["output_token_logprobs"],
                                                       body["meta_info"]["output_top_logprobs"], strict=True):
        assert entry.token == text and entry.bytes == list(text.encode())
        assert entry.logprob == pytest.approx(logprob, abs=1e-5)
        assert [t.token for t in entry.top_logprobs] == [t for _, _, t in alternatives]
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy
    assert "".join(e.token for e in content).startswith(r.choices[0].message.content)
    plain = client.chat.completions.create(model=MODEL, messages=FRANCE, **GREEDY)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == r.choices[0].message.content
    bare = client.chat.completions.create(model=MODEL, messages=FRANCE, logprobs=True, **GREEDY)
    assert [e.top_logprobs for e in bare.choices[0].logprobs.content] == [[]] * len(content)


def test_streamed_chunks_carry_the_same_logprobs(client):
    whole = client.chat.completions.create(model=MODEL, messages=FRANCE, logprobs=True, top_logprobs=2, **GREEDY)
    streamed, text = [], ""
    for chunk in client.chat.completions.create(model=MODEL, messages=FRANCE, logprobs=True, top_logprobs=2,
                                                stream=True, **GREEDY):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs is not None:
                streamed += choice.logprobs.content
    expected = whole.choices[0].logprobs.content
    assert text == whole.choices[0].message.content
    assert [e.token for e in streamed] == [e.token for e in expected]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in expected], abs=1e-5)
    assert [len(e.top_logprobs) for e in streamed] == [2] * len(expected)


def test_completions_logprobs_in_the_legacy_shape(client):
    params = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0,
              "logprobs": 3, "extra_body": {"ignore_eos": True}}
    r = client.completions.create(**params)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens == 8
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 3 <= len(top) <= 4 and top[token] == logprob == max(top.values())  # the top 3 and the chosen one
    streamed = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for chunk in client.completions.create(stream=True, **params):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                for key, values in streamed.items():
                    values += getattr(choice.logprobs, key)
    assert streamed["tokens"] == lp.tokens and streamed["text_offset"] == lp.text_offset
    assert streamed["token_logprobs"] == pytest.approx(lp.token_logprobs, abs=1e-5)


def test_generate_streams_logprobs_so_far(http):
    with http.stream("POST", "/generate", json={"input_ids": [1, 2, 3], "stream": True, "return_logprob": True,
                                                "sampling_params": {"max_new_tokens": 4, "temperature": 0,
                                                                    "ignore_eos": True}}) as r:
        events = sse_events(r)
    counts = [len(e["meta_info"]["output_token_logprobs"]) for e in events]
    assert counts == [len(e["output_ids"]) for e in events] and counts[-1] == 4
    assert all(text is None for _, _, text in events[-1]["meta_info"]["output_token_logprobs"])
    assert "output_top_logprobs" not in events[-1]["meta_info"]


@pytest.mark.parametrize("path,extra,param", [
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs"),  # needs logprobs: true
    ("/v1/chat/completions", {"logprobs": 1}, "logprobs"),
    ("/v1/completions", {"logprobs": 6}, "logprobs"),  # the legacy API's limit
    ("/v1/completions", {"logprobs": True}, "logprobs"),  # a number there
    ("/generate", {"top_logprobs_num": 2}, "top_logprobs_num"),  # needs return_logprob
    ("/generate", {"return_logprob": True, "top_logprobs_num": 21}, "top_logprobs_num"),
    ("/generate", {"return_logprob": True, "logprob_start_len": 0}, "logprob_start_len"),  # prompt logprobs: no
    ("/generate", {"sampling_params": {"max_new_tokens": 2, "logprobs": True}}, "sampling_params.logprobs"),
])
def test_bad_logprob_requests_are_refused_naming_the_parameter(http, path, extra, param):
    body = {"/v1/chat/completions": {"model": MODEL, "messages": FRANCE, "max_tokens": 2},
            "/v1/completions": {"model": MODEL, "prompt": "Hi", "max_tokens": 2},
            "/generate": {"text": "Hi", "sampling_params": {"max_new_tokens": 2}}}[path]
    assert_openai_error(http.post(path, json={**body, **extra}), 400, param=param)
