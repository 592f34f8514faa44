"""The official `openai` client against a live server on the bundled SmolLM2-135M-Instruct."""

import uuid

import pytest

from harness import BUNDLED_NAME

pytestmark = pytest.mark.slow  # it starts servers

MODEL = BUNDLED_NAME
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]


def chat(client, messages, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, **kw)


def stream_chat(client, messages, **kw):
    """(content, finish reasons, usage chunks, number of chunks) of a streamed chat."""
    content, reasons, usages, n = "", [], [], 0
    for chunk in chat(client, messages, stream=True, **kw):
        n += 1
        assert chunk.object == "chat.completion.chunk" and chunk.model == MODEL
        if chunk.usage is not None:
            assert chunk.choices == []
            usages.append(chunk.usage)
        for choice in chunk.choices:
            content += choice.delta.content or ""
            if choice.finish_reason is not None:
                reasons.append(choice.finish_reason)
    return content, reasons, usages, n


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"


def test_chat_greedy_knows_paris(client):
    r = chat(client, FRANCE, temperature=0, max_tokens=32)
    assert r.object == "chat.completion" and r.model == MODEL and r.id
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 5 and 0 < u.completion_tokens <= 32
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens is not None


def test_chat_stream_matches_non_stream_and_reports_usage(client):
    params = {"temperature": 0, "max_tokens": 40}
    full = chat(client, STORY, **params)
    content, reasons, usages, n = stream_chat(client, STORY, stream_options={"include_usage": True}, **params)
    assert n > 3, "expected the text to arrive in several chunks"
    assert content == full.choices[0].message.content
    assert reasons == [full.choices[0].finish_reason]
    assert len(usages) == 1
    u = usages[0]
    assert (u.prompt_tokens, u.completion_tokens) == (full.usage.prompt_tokens, full.usage.completion_tokens)
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    # Without include_usage there is no usage chunk.
    _, _, usages, _ = stream_chat(client, STORY, **params)
    assert usages == []


def test_completions_non_stream_and_stream(client):
    params = {"model": MODEL, "prompt": "The capital of France is", "temperature": 0, "max_tokens": 12,
              "extra_body": {"ignore_eos": True}}
    full = client.completions.create(**params)
    assert full.object == "text_completion"
    assert full.choices[0].text
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12
    text, reasons, usages = "", [], []
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **params):
        if chunk.usage is not None:
            usages.append(chunk.usage)
        for choice in chunk.choices:
            text += choice.text
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert text == full.choices[0].text
    assert reasons == ["length"]
    assert [(u.prompt_tokens, u.completion_tokens) for u in usages] == [(full.usage.prompt_tokens, 12)]


def test_max_completion_tokens(client):
    r = chat(client, STORY, temperature=0, max_completion_tokens=5, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5
    assert r.choices[0].finish_reason == "length"
    # It wins over max_tokens, as in OpenAI's API.
    r = chat(client, STORY, temperature=0, max_tokens=9, max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3


def test_stop_string_is_excluded_and_finishes_with_stop(client):
    params = {"temperature": 0, "max_tokens": 40, "extra_body": {"ignore_eos": True}}
    text = chat(client, STORY, **params).choices[0].message.content
    words = text.split()
    assert len(words) > 8, text
    stop = " " + words[6]  # a word in the middle, with the space before it
    cut = text.index(stop)
    r = chat(client, STORY, stop=[stop, "never-seen-stop"], **params)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[:cut]
    assert stop not in r.choices[0].message.content
    # Streamed: the stop string never shows, not even in part.
    content, reasons, _, _ = stream_chat(client, STORY, stop=stop, **params)
    assert content == text[:cut]
    assert reasons == ["stop"]


def test_seed_makes_sampling_repeatable(client):
    params = {"temperature": 1.0, "max_tokens": 16, "extra_body": {"ignore_eos": True}}
    first = chat(client, STORY, seed=1234, **params).choices[0].message.content
    again = chat(client, STORY, seed=1234, **params).choices[0].message.content
    assert first == again
    others = {chat(client, STORY, seed=s, **params).choices[0].message.content for s in (1, 2)}
    assert others != {first}, "different seeds all gave the same sampled text"


def test_repeated_long_prompt_reports_cached_tokens(client):
    # > 2 pages of 16 tokens, unique to this run so that nothing of it is cached before.
    filler = " ".join(f"item {i} is {uuid.uuid4().hex[:6]};" for i in range(30))
    messages = [{"role": "user", "content": f"{uuid.uuid4().hex} Here is a list: {filler} Which item is first?"}]
    params = {"temperature": 0, "max_tokens": 16, "logprobs": True, "top_logprobs": 2}
    first = chat(client, messages, **params)
    second = chat(client, messages, **params)
    assert first.usage.prompt_tokens > 2 * 16
    assert first.usage.prompt_tokens == second.usage.prompt_tokens
    cached_first = first.usage.prompt_tokens_details.cached_tokens
    cached_second = second.usage.prompt_tokens_details.cached_tokens
    assert cached_second > 0
    assert cached_second > cached_first  # the chat template's shared start may be cached already
    assert cached_second >= 2 * 16
    assert cached_second < second.usage.prompt_tokens  # at least the last token is computed
    # The first token is the same (prefill is exact, cached or not). The prompt's last tokens'
    # K and V were computed by another kernel (attending a cached prefix, not a causal run), so
    # the answers may part later, but only where the first answer's two likeliest were near-tied.
    tokens = [[t.token for t in answer.choices[0].logprobs.content] for answer in (first, second)]
    part = next((i for i, (a, b) in enumerate(zip(*tokens, strict=False)) if a != b), None)
    if part is not None:
        best, runner_up = first.choices[0].logprobs.content[part].top_logprobs
        assert part > 0 and tokens[1][part] == runner_up.token and best.logprob - runner_up.logprob < 0.5, \
            (part, tokens, best, runner_up)
