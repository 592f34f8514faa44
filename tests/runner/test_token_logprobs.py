"""Logprobs through the engine on tiny random models: the log-softmax of transformers' logits."""

import pytest
import torch
import transformers

from loupe import Engine
from loupe.core import SamplingParams
from loupe.runner.sampler import token_logprobs

from tiny_models import FAMILIES

PROMPT = "The capital of France is Paris. Hello, my name is"  # the logits parity prompt (tests/model)
GREEDY = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
# Sampled and filtered: the logprobs are still the model's own distribution's.
SAMPLED = {"max_new_tokens": 12, "temperature": 0.7, "top_k": 5, "seed": 3, "ignore_eos": True}
TOP = 5


def reference_logprobs(folder: str, prompt: list[int], output: list[int]) -> torch.Tensor:
    """log_softmax of transformers' float32 logits at each position that chose an output token."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0]
    return logits[len(prompt) - 1 : -1].log_softmax(dim=-1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logprobs_equal_log_softmax_of_transformers_logits(tiny_model_dir, family):
    folder = tiny_model_dir(family)
    engine = Engine(folder, dtype="float32", page_size=4, chunked_prefill_size=8)
    prompt = engine.tokenizer.encode(PROMPT)
    outs = engine.generate(input_ids=[prompt, prompt], sampling_params=[GREEDY, SAMPLED], return_logprob=True,
                           top_logprobs_num=TOP)
    worst = 0.0
    for out in outs:
        meta = out["meta_info"]
        chosen, top = meta["output_token_logprobs"], meta["output_top_logprobs"]
        assert [token for _, token, _ in chosen] == out["output_ids"]
        assert len(top) == len(chosen) and all(len(t) == TOP for t in top)
        expected = reference_logprobs(folder, prompt, out["output_ids"])
        for step, ((logprob, token, text), alternatives) in enumerate(zip(chosen, top, strict=True)):
            assert text is None  # the engine leaves texts out
            worst = max(worst, abs(logprob - expected[step, token].item()))
            values = [value for value, _, _ in alternatives]
            assert values == sorted(values, reverse=True)
            ref_values, ref_ids = expected[step].topk(TOP)
            assert [t for _, t, _ in alternatives][:2] == ref_ids.tolist()[:2]  # ties further down may swap
            worst = max(worst, (torch.tensor(values) - ref_values).abs().max().item())
    assert worst <= 1e-3
    greedy = outs[0]["meta_info"]
    for (logprob, token, _), alternatives in zip(greedy["output_token_logprobs"], greedy["output_top_logprobs"],
                                                 strict=True):
        assert (logprob, token) == tuple(alternatives[0][:2])  # the greedy token is the most likely one


def test_logprobs_only_for_the_requests_that_ask(tiny_model_dir):
    engine = Engine(tiny_model_dir("llama"), dtype="float32")
    plain, asked = engine.generate([PROMPT, PROMPT], [GREEDY, {**GREEDY, "logprobs": True}])
    assert "output_token_logprobs" not in plain["meta_info"]
    assert len(asked["meta_info"]["output_token_logprobs"]) == len(asked["output_ids"])
    assert "output_top_logprobs" not in asked["meta_info"]  # top_logprobs 0
    assert plain["output_ids"] == asked["output_ids"]
    # A batch where nobody asked computes none.
    runner = engine.worker.runner
    seen = []
    forward = runner.forward

    def spy(reqs, num_new):
        sampled = forward(reqs, num_new)
        seen.append(sampled.logprobs)
        return sampled

    runner.forward = spy
    try:
        engine.generate(PROMPT, {**GREEDY, "max_new_tokens": 3})
    finally:
        runner.forward = forward
    assert seen == [None] * len(seen) and seen


def test_token_logprobs_of_known_logits():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]])
    found = token_logprobs(probs.log() + 7.0, [1, 3], [2, 0])  # a constant shift changes nothing
    assert found[0].token_id == 1 and found[0].logprob == pytest.approx(torch.tensor(0.3).log().item(), abs=1e-6)
    assert [t for t, _ in found[0].top] == [0, 1]
    assert [v for _, v in found[0].top] == pytest.approx([torch.tensor(0.5).log().item(), torch.tensor(0.3).log().item()])
    assert found[1].logprob == pytest.approx(torch.tensor(0.4).log().item(), abs=1e-6) and found[1].top == []


@pytest.mark.parametrize("params,name", [
    ({"logprobs": "yes"}, "logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"), ({"top_logprobs": 3}, "top_logprobs"),
])
def test_bad_logprob_parameters_are_named(params, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams.from_dict(params)
