"""The in-process engine (loupe/engine.py) on a tiny model: one prompt or many, validation
before anything runs, and /generate's answer shape."""

import pytest

from loupe import Engine
from loupe.core import InvalidRequest
from loupe.server.native import GenerateResponse

GREEDY = {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    with Engine(tiny_model_dir("llama"), dtype="float32") as e:
        yield e


def test_one_prompt_gives_generates_answer_shape(engine):
    out = engine.generate("Hello there", GREEDY)
    GenerateResponse.model_validate(out)  # the shape /generate answers, in /openapi.json
    assert len(out["output_ids"]) == 5 and out["meta_info"]["finish_reason"] == "length"
    assert "output_token_logprobs" not in out["meta_info"]  # not asked for


def test_many_prompts_come_back_in_order_with_logprobs_when_asked(engine):
    single = [engine.generate(p, GREEDY)["output_ids"] for p in ("a b c", "one two")]
    both = engine.generate(["a b c", "one two"], GREEDY, return_logprob=True, top_logprobs_num=2)
    assert [o["output_ids"] for o in both] == single
    meta = both[0]["meta_info"]
    assert len(meta["output_token_logprobs"]) == 5 and all(len(top) == 2 for top in meta["output_top_logprobs"])
    assert [lp[1] for lp in meta["output_token_logprobs"]] == both[0]["output_ids"]


def test_a_bad_request_among_many_runs_none(engine):
    steps = engine.scheduler.num_forward_steps
    with pytest.raises(InvalidRequest) as caught:
        engine.generate(["fine", "not fine"], [GREEDY, {**GREEDY, "top_p": 0}])
    assert caught.value.param == "top_p" and engine.scheduler.num_forward_steps == steps
    with pytest.raises(ValueError, match="exactly one of prompt and input_ids"):
        engine.generate()
