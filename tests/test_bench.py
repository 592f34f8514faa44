"""`loupe bench`'s two loads against the shared bundled-model server."""

import asyncio

import pytest

from harness import BUNDLED_NAME
from loupe.bench import make_prompts, run


def test_prompt_words_bound_each_prompt_and_a_seed_repeats_its_prompts():
    prompts = make_prompts(5, seed=3, words=(100, 120))
    assert all(100 <= len(p.split()) <= 120 for p, _ in prompts)
    assert prompts == make_prompts(5, seed=3, words=(100, 120))
    assert make_prompts(3, seed=1) == make_prompts(3, seed=1, words=(20, 60))


@pytest.mark.slow
def test_streamed_completions_time_the_first_token_and_the_prefill(bundled_server):
    summary = asyncio.run(run(bundled_server.url(""), BUNDLED_NAME, 2, 2, 0, None, max_tokens=4,
                              words=(200, 220)))
    assert summary["failed"] == 0 and summary["wrong_lengths"] == 0, summary
    assert summary["prompt_tokens_mean"] >= 200
    assert 0 < summary["ttft_p50_s"] < summary["e2e_p50_s"]
    assert summary["prefill_tokens_per_s_p50"] > 0


@pytest.mark.slow
def test_chat_answered_whole_counts_its_tokens_and_times_no_first_token(bundled_server):
    summary = asyncio.run(run(bundled_server.url(""), BUNDLED_NAME, 2, 3, 0, None, max_tokens=5, chat=True))
    assert summary["failed"] == 0 and summary["wrong_lengths"] == 0, summary
    assert summary["output_tokens_per_s"] > 0 and summary["e2e_p50_s"] > 0
    assert summary["ttft_p50_s"] is None and summary["prefill_tokens_per_s_p50"] is None
