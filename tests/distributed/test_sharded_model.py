"""Tensor- and pipeline-parallel models, rank by rank in spawned processes: same tokens as one
process. Covers column/row-parallel linears, the vocabulary-parallel embedding and LM head,
q/k/v biases (qwen2), per-head norms (qwen3), KV heads shared by ranks, and stages."""

import pytest
from parallel_harness import generate_on_ranks

from loupe import Engine

pytestmark = pytest.mark.slow  # a process per rank: ~95 s in all

PROMPTS = ["Hello, my name is", "one two three four five", "The capital of France is Paris."]
GREEDY = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}
SEEDED = {"max_new_tokens": 10, "temperature": 1.0, "top_p": 0.9, "seed": 7, "ignore_eos": True}


@pytest.mark.parametrize(("family", "tp_size", "pp_size"), [
    ("llama", 2, 1),
    ("qwen2", 2, 1),
    ("qwen3", 2, 1),
    ("llama", 4, 1),  # 2 KV heads over 4 ranks: each KV head held by two ranks
    ("llama", 1, 2),
])
def test_parallel_ranks_generate_what_one_process_does(tiny_model_dir, family, tp_size, pp_size):
    path = tiny_model_dir(family)
    prompts, params = PROMPTS * 2, [GREEDY] * len(PROMPTS) + [SEEDED] * len(PROMPTS)
    expected = [o["output_ids"] for o in Engine(path, dtype="float32", max_total_tokens=4096).generate(prompts, params)]
    by_rank = generate_on_ranks(path, tp_size, pp_size, prompts, params)
    assert by_rank == {rank: expected for rank in range(tp_size * pp_size)}


@pytest.mark.parametrize(("tp_size", "pp_size"), [(2, 1), (1, 2)])
def test_parallel_ranks_report_the_logprobs_one_process_does(tiny_model_dir, tp_size, pp_size):
    """With stages, the last one computes them and the driver (the first) reports them."""
    path = tiny_model_dir("llama")
    prompts, params = PROMPTS[:2], [GREEDY, SEEDED]
    single = Engine(path, dtype="float32", max_total_tokens=4096).generate(prompts, params, return_logprob=True)
    expected = [o["meta_info"]["output_token_logprobs"] for o in single]
    by_rank = generate_on_ranks(path, tp_size, pp_size, prompts, params, logprobs=True)
    assert set(by_rank) == set(range(tp_size * pp_size))
    for found in by_rank.values():
        assert not isinstance(found, str), found
        for got, want in zip(found, expected, strict=True):
            assert [token for _, token, _ in got] == [token for _, token, _ in want]
            assert [v for v, _, _ in got] == pytest.approx([v for v, _, _ in want], abs=1e-4)


def test_head_counts_that_do_not_divide_are_refused(tiny_model_dir):
    by_rank = generate_on_ranks(tiny_model_dir("llama"), 3, 1, PROMPTS[:1], GREEDY)
    assert set(by_rank) == {0, 1, 2}
    for error in by_rank.values():
        assert "--tp-size 3 must divide the model's 4 attention heads" in error
