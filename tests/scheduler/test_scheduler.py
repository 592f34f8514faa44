"""Continuous batching, prefix reuse, retraction and abort on a tiny random model."""

import pytest

from loupe import Engine
from loupe.core import FinishReason, SamplingParams, TokenizedRequest

PROMPTS = [
    "The capital of France is Paris. The capital of Italy is",
    "Hello, my name is loupe and I trace",
    "one two three four five six seven",
    "Where did the time of this request go? Into prefill,",
]
GREEDY = {"max_new_tokens": 40, "temperature": 0, "ignore_eos": True}


def assert_pages_conserved(s):
    """Every page but page 0 is free, in the tree, or private to exactly one running request."""
    private = [p for r in s.running for p in r.kv.pages[r.kv.num_tree_pages:]]
    tree_pages = [p for n in s.kv.tree._nodes() for p in n.pages]
    everything = s.kv.pool.free_pages + tree_pages + private
    assert sorted(everything) == list(range(1, s.kv.pool.num_pages))


def add(s, tokenizer, rid, prompt):
    return s.add_request(TokenizedRequest(rid, tokenizer.encode(prompt), SamplingParams(**GREEDY)))


@pytest.fixture(scope="module")
def folder(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def reference(folder):
    engine = Engine(folder, dtype="float32", disable_radix_cache=True)
    return [o["output_ids"] for o in engine.generate(PROMPTS, GREEDY)]


def test_prefix_cache_hit_gives_identical_output(folder, reference):
    engine = Engine(folder, dtype="float32", page_size=4)
    cold = engine.generate(PROMPTS[0], GREEDY)
    warm = engine.generate(PROMPTS[0], GREEDY)
    assert cold["meta_info"]["cached_tokens"] == 0
    assert warm["meta_info"]["cached_tokens"] > 0
    assert warm["meta_info"]["cached_tokens"] <= warm["meta_info"]["prompt_tokens"] - 1
    assert cold["output_ids"] == warm["output_ids"] == reference[0]
    assert_pages_conserved(engine.scheduler)


def test_chunked_prefill_and_batching_match_reference(folder, reference):
    engine = Engine(folder, dtype="float32", chunked_prefill_size=5, page_size=2)
    outs = engine.generate(PROMPTS, GREEDY)
    assert [o["output_ids"] for o in outs] == reference


def test_tiny_pool_retracts_and_resumes_identically(folder, reference):
    engine = Engine(folder, dtype="float32", page_size=4, max_total_tokens=80)
    s = engine.scheduler
    reqs = [add(s, engine.tokenizer, f"r{i}", p) for i, p in enumerate(PROMPTS)]
    steps = 0
    while s.has_work:
        s.step()
        assert_pages_conserved(s)
        steps += 1
        assert steps < 2000
    assert sum(r.num_retractions for r in reqs) > 0
    assert [r.output_ids for r in reqs] == reference
    assert all(r.finish_reason == FinishReason.LENGTH for r in reqs)


def test_new_requests_join_while_others_decode(folder, reference):
    engine = Engine(folder, dtype="float32")
    s = engine.scheduler
    first = add(s, engine.tokenizer, "a", PROMPTS[0])
    for _ in range(5):
        s.step()
    second = add(s, engine.tokenizer, "b", PROMPTS[1])
    decoded = len(first.output_ids)
    s.step()  # one forward: a decode step of the first and the whole prompt of the second
    assert len(first.output_ids) == decoded + 1
    assert len(second.output_ids) == 1
    while s.has_work:
        s.step()
    assert first.output_ids == reference[0]
    assert second.output_ids == reference[1]


def test_abort_frees_pages_at_once(folder):
    engine = Engine(folder, dtype="float32", page_size=2, disable_radix_cache=True)
    s = engine.scheduler
    free_before = len(s.kv.pool.free_pages)
    reqs = [add(s, engine.tokenizer, f"r{i}", p) for i, p in enumerate(PROMPTS)]
    for _ in range(3):
        s.step()
    assert len(s.kv.pool.free_pages) < free_before
    for r in reqs:
        assert s.abort(r.rid) is r
        assert r.finish_reason == FinishReason.ABORT and r.kv is None
    assert len(s.kv.pool.free_pages) == free_before
    assert not s.has_work
    assert s.abort("unknown") is None


def test_engine_lists_in_lists_out_and_input_ids(folder, reference):
    engine = Engine(folder, dtype="float32")
    ids = [engine.tokenizer.encode(p) for p in PROMPTS[:2]]
    outs = engine.generate(input_ids=ids, sampling_params=[GREEDY, {**GREEDY, "max_new_tokens": 3}])
    assert outs[0]["output_ids"] == reference[0]
    assert outs[1]["output_ids"] == reference[1][:3]
    assert outs[1]["meta_info"]["finish_reason"] == "length"
    assert outs[1]["meta_info"]["completion_tokens"] == 3
    one = engine.generate(input_ids=ids[0], sampling_params=GREEDY)
    assert isinstance(one, dict) and one["meta_info"]["prompt_tokens"] == len(ids[0])
