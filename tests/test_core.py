"""The shared plain types (loupe/core.py): validation names the field at fault, in the
engine's words or an API's."""

import pytest

from loupe.core import InvalidRequest, RequestLimits, SamplingParams, TokenizedRequest

LIMITS = RequestLimits(vocab_size=100, context_length=32, max_total_tokens=24)


def refusal(params: dict, input_ids=(1, 2, 3)) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        TokenizedRequest.validated("r", list(input_ids), params, LIMITS)
    return caught.value


@pytest.mark.parametrize("params,param", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": 0}, "top_k"),
    ({"min_p": 2}, "min_p"), ({"seed": -1}, "seed"), ({"stop": [""]}, "stop"), ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"temperature": True}, "temperature"), ({"colour": 1}, "colour"),
])
def test_a_bad_value_names_its_field(params, param):
    assert refusal(params).param == param


def test_an_error_about_a_field_can_name_it_as_an_api_does():
    error = refusal({"max_new_tokens": 30})  # 3 + 30 > the context of 32
    assert str(error).startswith("max_new_tokens=30 plus the prompt's 3 tokens")
    message, param = error.named({"max_new_tokens": "max_tokens"})
    assert param == "max_tokens" and message == "max_tokens" + error.detail and "max_new_tokens" not in message
    ids = refusal({}, input_ids=[1, 100])
    assert ids.named({"input_ids": "prompt"}) == ("prompt must be token ids in [0, 100)", "prompt")
    empty = refusal({}, input_ids=[])  # not about a field by name: the text stays as it is
    assert empty.named({"prompt": "messages"}) == ("the prompt is empty", "messages")


def test_limits_bound_prompt_and_output_by_context_and_kv_cache():
    assert refusal({}, input_ids=[1] * 32).param == "prompt"  # no room for a token
    assert "KV cache" in str(refusal({"max_new_tokens": 22}))  # 3 + 22 > 24 tokens of KV, within the context
    request = TokenizedRequest.validated("r", [1, 2, 3], {"max_new_tokens": 21, "stop": "x"}, LIMITS)
    assert request.sampling == SamplingParams(max_new_tokens=21, stop=["x"])
