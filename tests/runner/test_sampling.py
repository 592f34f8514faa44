"""Sampling parameters end to end through the engine, and their validation."""

import pytest
import torch

from loupe import Engine
from loupe.core import SamplingParams
from loupe.runner.sampler import filtered_probs, sample

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine(tiny_model_dir("llama"), dtype="float32")


def test_same_seed_same_output_in_any_batch(engine):
    params = {"max_new_tokens": 30, "temperature": 1.0, "seed": 1234, "ignore_eos": True}
    alone = engine.generate(PROMPT, params)["output_ids"]
    batched = engine.generate([PROMPT, "one two", PROMPT], [params, {**params, "seed": 7}, params])
    assert batched[0]["output_ids"] == alone == batched[2]["output_ids"]
    other = engine.generate(PROMPT, {**params, "seed": 99})["output_ids"]
    assert other != alone


def test_top_k_one_is_greedy(engine):
    greedy = engine.generate(PROMPT, {"max_new_tokens": 20, "temperature": 0, "ignore_eos": True})
    top1 = engine.generate(PROMPT, {"max_new_tokens": 20, "temperature": 0.8, "top_k": 1, "ignore_eos": True})
    assert top1["output_ids"] == greedy["output_ids"]


def test_stop_string_is_excluded_from_text(engine):
    free = engine.generate(PROMPT, {"max_new_tokens": 30, "temperature": 0, "ignore_eos": True})
    text = free["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip()
    out = engine.generate(PROMPT, {"max_new_tokens": 30, "temperature": 0, "ignore_eos": True, "stop": stop})
    assert out["meta_info"]["finish_reason"] == "stop"
    assert out["meta_info"]["matched_stop"] == stop
    assert stop not in out["text"]
    assert text.startswith(out["text"])


def test_stop_token_ids_and_eos(engine):
    free = engine.generate(PROMPT, {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True})
    target = free["output_ids"][4]
    out = engine.generate(PROMPT, {"max_new_tokens": 10, "temperature": 0, "stop_token_ids": [target]})
    assert out["output_ids"] == free["output_ids"][: free["output_ids"].index(target) + 1]
    assert out["meta_info"]["finish_reason"] == "stop" and out["meta_info"]["matched_stop"] == target
    engine.scheduler.stops.eos_ids.add(target)
    try:
        stopped = engine.generate(PROMPT, {"max_new_tokens": 10, "temperature": 0})
        ignored = engine.generate(PROMPT, {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True})
    finally:
        engine.scheduler.stops.eos_ids.discard(target)
    assert stopped["output_ids"] == out["output_ids"]
    assert ignored["output_ids"] == free["output_ids"]
    assert ignored["meta_info"]["finish_reason"] == "length"


def test_filters_drop_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda **kw: (filtered_probs(logits, [SamplingParams(**kw)])[0] > 0).tolist()  # noqa: E731
    assert keep(top_k=2) == [True, True, False, False]
    assert keep(top_p=0.7) == [True, True, False, False]
    assert keep(top_p=0.85) == [True, True, True, False]
    assert keep(min_p=0.5) == [True, True, False, False]
    assert keep() == [True, True, True, True]
    mixed = filtered_probs(logits.repeat(2, 1), [SamplingParams(top_k=1), SamplingParams(top_k=-1)])
    assert (mixed > 0).sum(dim=1).tolist() == [1, 4]


@pytest.mark.parametrize("extreme", [{"temperature": 1e-300}, {"temperature": 1e-40}, {"top_k": 2**64},
                                     {"top_p": 1e-300}])
def test_extreme_valid_values_still_draw_a_token(extreme):
    """Values validation accepts but float32 or int64 cannot hold (found by the API fuzz: each
    crashed the scheduler): a tiny temperature or top_p keeps the likeliest token, a huge top_k
    limits nothing."""
    params = SamplingParams(**extreme)
    params.validate()
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3]]))
    probs = filtered_probs(logits, [params])[0]
    assert torch.isfinite(probs).all() and probs.sum() > 0 and probs.argmax() == 1
    token = sample(logits, [params], [torch.Generator().manual_seed(0)])[0]
    assert 0 <= token < 3


@pytest.mark.parametrize("name,value", [
    ("max_new_tokens", 0), ("max_new_tokens", 1.5), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", 0), ("min_p", 2.0), ("seed", "x"), ("stop", [""]), ("stop_token_ids", [-1]), ("ignore_eos", "yes"),
    ("bogus", 1),
])
def test_invalid_values_name_the_parameter(engine, name, value):
    with pytest.raises(ValueError, match=name):
        engine.generate(["one two", PROMPT], [{"max_new_tokens": 4}, {name: value}])
    assert not engine.scheduler.has_work  # the valid request was not queued either


def test_too_long_requests_are_refused(engine):
    limit = engine.worker.context_length
    with pytest.raises(ValueError, match="context length"):
        engine.generate(input_ids=[5] * limit, sampling_params={"max_new_tokens": 1})
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate(input_ids=[5, 6], sampling_params={"max_new_tokens": limit})
    with pytest.raises(ValueError, match="input_ids"):
        engine.generate(input_ids=[10**9], sampling_params={"max_new_tokens": 1})
